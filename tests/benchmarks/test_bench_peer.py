"""tools/make_peer.py, benchmarks/peer_moe.py and benchmarks/bench_peer.py on CPU: the extraction from each kind of
source (a fake vLLM tree, wheel and git repository: no vLLM here), the alignment against a plain-Python
reference, the tuned-table lookup, silu_and_mul and the arguments; with a real extracted peer in .carry/peer
(tools/make_peer.py), its kernel through Triton's interpreter against the reference and the whole harness at
a tiny shape (skipped without it). No timing assertions."""
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_moe  # noqa: E402
from benchmarks import bench_peer as bp  # noqa: E402
from benchmarks import peer_moe as pm  # noqa: E402
from symphony_kernels.reference import moe_experts_reference  # noqa: E402
from tools import make_peer as mp  # noqa: E402

PEER = ROOT / ".carry" / "peer"
CFG = "vllm/model_executor/layers/fused_moe/configs"

FAKE_KERNEL_FILE = '''"""A fake vLLM fused_moe.py."""
import torch

from vllm.triton_utils import tl, triton

SCALE = 3


@triton.jit
def _unused(x_ptr):
    tl.store(x_ptr, 0)


@triton.jit
def double(x):
    return x * 2


def invoke(x):
    return x


@triton.jit
def fused_moe_kernel(
    x_ptr,
    n,
    BLOCK: tl.constexpr,  # a comment kept verbatim
):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, double(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)
'''


def _fake_tree(root: Path, kernel_text=FAKE_KERNEL_FILE, license_at="LICENSE") -> Path:
    files = {mp.KERNEL_FILE: kernel_text, license_at: "Apache License 2.0 (fake)\n",
             mp.VERSION_FILE: "__version__ = version = '9.9.9'\n__commit_id__ = commit_id = 'gabcdef1'\n",
             f"{CFG}/E=8,N=16,device_name=NVIDIA_H200.json": '{"1": {"BLOCK_SIZE_M": 16}}',
             f"{CFG}/E=8,N=16,device_name=NVIDIA_H200,dtype=fp8_w8a8.json": "{}",
             f"{CFG}/E=8,N=16,device_name=NVIDIA_H100.json": "{}"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("fake_peer_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ make_peer
def test_make_peer_from_tree_wheel_and_git(tmp_path):
    tree = _fake_tree(tmp_path / "tree")
    m = mp.make_peer(tree, tmp_path / "a")
    text = (tmp_path / "a" / mp.OUT_KERNEL).read_text()
    assert m["functions"] == ["double", "fused_moe_kernel"] and m["kernel_params"] == ["x_ptr", "n", "BLOCK"]
    assert (m["vllm_version"], m["commit"], m["licence"]) == ("9.9.9", "abcdef1", "Apache-2.0")
    assert "vLLM 9.9.9, commit abcdef1" in text and "SPDX-License-Identifier: Apache-2.0" in text
    for name in ("double", "fused_moe_kernel"):  # verbatim, decorator and comments included
        start = FAKE_KERNEL_FILE.index(f"@triton.jit\ndef {name}")
        assert FAKE_KERNEL_FILE[start:FAKE_KERNEL_FILE.index("\n\n", start) if name == "double" else None] in text
    assert "_unused" not in text and "SCALE" not in text and "vllm.triton_utils" not in text
    assert sorted(p.name for p in (tmp_path / "a" / "configs").iterdir()) == ["E=8,N=16,device_name=NVIDIA_H200.json"]
    assert (tmp_path / "a" / "LICENSE").read_text() == "Apache License 2.0 (fake)\n"
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m
    assert set(m["files"]) == {mp.OUT_KERNEL, "LICENSE", "configs/E=8,N=16,device_name=NVIDIA_H200.json"}
    module = _import(tmp_path / "a" / mp.OUT_KERNEL)
    x = torch.arange(5.0)
    module.fused_moe_kernel[(1,)](x, 3, BLOCK=8)  # the extracted kernel runs (interpreter)
    assert x.tolist() == [0, 2, 4, 3, 4]

    # a wheel: the licence in the dist-info, no root LICENSE
    wheel_root = _fake_tree(tmp_path / "w", license_at="vllm-9.9.9.dist-info/licenses/LICENSE")
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for p in sorted(wheel_root.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(wheel_root).as_posix())
    mw = mp.make_peer(wheel, tmp_path / "b")
    assert mw["source_kind"] == "archive" and set(mw["files"]) == set(m["files"])
    assert (tmp_path / "b" / mp.OUT_KERNEL).read_text() == text.replace("(tree)", "(archive)")

    # a git repository: the commit is git's; another --rev is another commit
    repo = _fake_tree(tmp_path / "repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
    first = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / mp.KERNEL_FILE).write_text(FAKE_KERNEL_FILE.replace("x * 2", "x * 5"))
    subprocess.run(git + ["commit", "-q", "-am", "two"], check=True)
    mg = mp.make_peer(repo / ".git", tmp_path / "c", rev="HEAD~1")
    assert mg["source_kind"] == "git" and mg["commit"] == first
    assert (tmp_path / "c" / mp.OUT_KERNEL).read_text() == text.replace("abcdef1", first).replace("(tree)", "(git)")
    mp.make_peer(repo / ".git", tmp_path / "c")  # replaces its own earlier output
    assert "x * 5" in (tmp_path / "c" / mp.OUT_KERNEL).read_text()


def test_make_peer_refusals(tmp_path, capsys):
    bad = _fake_tree(tmp_path / "bad", FAKE_KERNEL_FILE.replace("x * 2", "x * SCALE"))
    with pytest.raises(mp.PeerError, match="double uses 'SCALE'"):
        mp.make_peer(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tree = _fake_tree(tmp_path / "tree")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert mp.main([str(tree), "--out", str(other)]) == 1
    assert "not a folder this script wrote" in capsys.readouterr().err and (other / "keep.txt").exists()
    assert mp.main([str(tree), "--out", str(tmp_path / "p"), "--devices", "NVIDIA_B200"]) == 1
    assert "no tuned tables for NVIDIA_B200" in capsys.readouterr().err
    assert mp.main([str(tmp_path / "nowhere")]) == 1 and "does not exist" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


# -------------------------------------------------------------------------------------------- peer launcher
def _align_reference(ids, block, E):
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    sorted_ids, experts = [], []
    for e in range(E):
        run = [p for p in range(n) if flat[p] == e]
        run += [n] * (-len(run) % block)
        sorted_ids += run
        experts += [e] * (len(run) // block)
    return sorted_ids, experts


@pytest.mark.parametrize("T,k,E,block", [(7, 2, 4, 4), (3, 2, 8, 16), (50, 3, 5, 8), (1, 1, 3, 16)])
def test_align_matches_reference(T, k, E, block):
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, max(E - 1, 1), (T, k), generator=g, dtype=torch.int32)  # expert E-1 stays empty
    sorted_ids, expert_ids, post = pm.align(ids, block, E)
    ref_ids, ref_experts = _align_reference(ids, block, E)
    size, blocks = pm.align_sizes(T * k, block, E)
    assert sorted_ids.shape == (size,) and expert_ids.shape == (blocks,) and post.tolist() == [len(ref_ids)]
    assert sorted_ids[:len(ref_ids)].tolist() == ref_ids and (sorted_ids[len(ref_ids):] == T * k).all()
    assert expert_ids[:len(ref_experts)].tolist() == ref_experts
    assert all(t.dtype == torch.int32 for t in (sorted_ids, expert_ids, post))


def test_align_sizes_and_assignment():
    assert pm.align_sizes(12, 4, 4) == (24, 6)
    assert pm.align_sizes(6, 16, 8) == (96, 6)  # fewer pairs than experts: at most one block per pair
    ids = torch.tensor([[5, 3]], dtype=torch.int32)
    sorted_ids, expert_ids, post = pm.assignment(ids, 16, 7)  # 2 * 4 > 7: aligned
    assert sorted_ids[[0, 16]].tolist() == [1, 0] and post.tolist() == [32] and expert_ids[:2].tolist() == [3, 5]
    sorted_ids, expert_ids, post = pm.assignment(ids, 16, 8)  # 2 * 4 <= 8: one block per pair
    assert sorted_ids is None and expert_ids.tolist() == [5, 3] and post.tolist() == [32]


def test_tuned_tables(tmp_path):
    tile = {key: 16 for key in pm.TILE_KEYS}
    path = tmp_path / pm.table_name(8, 14336, "NVIDIA H200")
    assert path.name == "E=8,N=14336,device_name=NVIDIA_H200.json"
    path.write_text(json.dumps({"triton_version": "3.6.0", "1": dict(tile, BLOCK_SIZE_M=1),
                                "16": dict(tile, BLOCK_SIZE_M=2), "64": dict(tile, BLOCK_SIZE_M=3)}))
    table = pm.read_table(path)
    assert list(table) == [1, 16, 64]
    assert [pm.nearest(table, M)[0] for M in (1, 8, 9, 20, 40, 41, 5000)] == [1, 1, 16, 16, 16, 64, 64]
    assert pm.device_file_name("NVIDIA H200 NVL") == "NVIDIA_H200"
    assert pm.device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    with pytest.raises(pm.PeerError, match=r"no tuned table E=8,N=1,device_name=X\.json in .* \(it has 1: E=8,N=14336"):
        pm.read_table(tmp_path / pm.table_name(8, 1, "X"))
    (tmp_path / "bad.json").write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(pm.PeerError, match="entry 1 lacks BLOCK_SIZE_K, BLOCK_SIZE_N, GROUP_SIZE_M"):
        pm.read_table(tmp_path / "bad.json")
    # bench_moe's floor: Mixtral at T=1 with 2 experts touched is bound by their weights' bytes
    assert bench_moe.floor_ms((4096, 14336, 8, 2), 1, 2, 1e12, 1e15) == pytest.approx(
        (2 * 3 * 4096 * 14336 + 2 * 4096) * 2 / 1e12 * 1e3)


@pytest.mark.parametrize("S,f", [(5, 40), (2, 1100)])
def test_silu_and_mul(S, f):
    x = torch.randn(S, 2 * f)
    assert torch.allclose(pm.silu_and_mul(x), F.silu(x[:, :f]) * x[:, f:], rtol=1e-5, atol=1e-6)


def test_peer_folder_checks(tmp_path):
    with pytest.raises(pm.PeerError, match="is not a peer folder"):
        pm.Peer(tmp_path)
    (tmp_path / pm.KERNEL_FILE).write_text("")
    (tmp_path / "manifest.json").write_text(json.dumps({"kernel_params": list(pm.PARAMS[:-1]) + ["NEW"]}))
    with pytest.raises(pm.PeerError, match="takes parameters NEW, USE_TD other than"):
        pm.Peer(tmp_path)


def test_bench_peer_arguments(tmp_path, monkeypatch):
    out = ["--out", str(tmp_path)]
    assert tuple(bp.parse_args(out).tokens) == bench_moe.TOKENS == (1, 8, 64, 512, 4096, 16384)
    assert tuple(bp.parse_args(out + ["--quick"]).tokens) == bench_moe.QUICK_TOKENS
    args = bp.parse_args(out + ["--tiny", "--device", "cpu", "--shapes", "qwen3-next"])
    assert args.tokens == bp.TINY_TOKENS and args.shapes == ["qwen3-next"] and args.peer == Path(".carry/peer")
    with pytest.raises(SystemExit):
        bp.parse_args(out + ["--tokens", "0"])
    with pytest.raises(SystemExit):
        bp.parse_args(out + ["--shapes", "llama"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            bp.main(out)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="set TRITON_INTERPRET=1"):
        bp.main(out + ["--device", "cpu", "--tiny"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="is not a peer folder"):
        bp.main(out + ["--device", "cpu", "--tiny", "--peer", str(tmp_path / "none")])


# ------------------------------------------------------------------------------- with a real extracted peer
needs_peer = pytest.mark.skipif(not (PEER / "manifest.json").is_file(),
                                reason="no .carry/peer (python tools/make_peer.py VLLM_SOURCE makes it)")


@needs_peer
@pytest.mark.parametrize("T,E,k,tile", [(9, 6, 3, (16, 32, 32)), (2, 16, 2, (16, 64, 16)), (33, 4, 2, (32, 16, 64))])
def test_peer_kernel_matches_reference(T, E, k, tile):
    """vLLM's extracted kernel through the launcher (aligned, and one block per pair for T=2 over 16 experts)."""
    d, f = 24, 40
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, d, generator=g)
    w1, w2 = torch.randn(E, 2 * f, d, generator=g) / d ** 0.5, torch.randn(E, d, f, generator=g) / f ** 0.5
    weights, ids = pm.route(torch.randn(T, E, generator=g), k)
    config = dict(zip(pm.TILE_KEYS, tile + (1,)), num_warps=4, num_stages=2)
    out = pm.experts(pm.Peer(PEER), x, w1, w2, weights, ids, config)
    ref = moe_experts_reference(x.double(), w1.double(), w2.double(), weights.double(), ids.long(), "silu")
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)


@needs_peer
def test_bench_peer_end_to_end_tiny(tmp_path):
    bp.main(["--peer", str(PEER), "--out", str(tmp_path), "--device", "cpu", "--tiny", "--shapes", "qwen3-next",
             "--tokens", "1", "5"])
    data = json.loads((tmp_path / "peer.json").read_text())
    assert data["peer"]["vllm_version"] and data["dtype"] == "float32"
    rows = {r["T"]: r for r in data["rows"]}
    assert set(rows) == {1, 5} and rows[1]["one_block_per_pair"] and not rows[5]["one_block_per_pair"]
    for r in rows.values():
        assert r["match"] and r["rel_err"] < 1e-4 and r["config"] == bp.TINY_CONFIG
        for v in bp.VARIANTS:
            assert r[v]["best"] == r[v]["eager"] > 0
            assert r[v + "_over_floor"] == pytest.approx(r[v]["best"] / r["floor"])
        assert r["ours_over_peer_planned"] == pytest.approx(r["ours_planned"]["best"] / r["peer_planned"]["best"])
    text = (tmp_path / "peer.md").read_text()
    assert f"| qwen3-next (32, 8, 16, 4) | 5 | {rows[5]['floor']:.4f} | {rows[5]['peer_over_floor']:.2f} |" in text
