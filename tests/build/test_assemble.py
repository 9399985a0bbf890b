"""Assembly: the target MoE of every family loads in transformers with no missing or unexpected key, N identical
sources give the dense model's function, experts are the (permuted) source FFNs bit for bit, and the
streaming safetensors writer round-trips."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from symphony.build import pipeline
from symphony.build.router_init import router_weights
from symphony.build.targets import target_config, unsupported
from symphony.build.writer import Entry, replace_tensors, write_shards
from symphony.errors import SymphonyError
from symphony.build.pipeline import build
from symphony.testing import domain_text, make_family, tiny_config

ARCH_CLASS = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "llama": "MixtralForCausalLM",
              "mistral": "MixtralForCausalLM"}


def load(path, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems  # any missing / unexpected / mismatched key is an error
    return model.eval()


def saved(path):
    """Every tensor of a checkpoint folder, by its saved name."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module", params=list(ARCH_CLASS))
def copies(request, tmp_path_factory):
    """One tiny dense source of each family and two exact copies of it."""
    root = tmp_path_factory.mktemp(f"same-{request.param}")
    (path,) = make_family(root, arch=request.param, domains=("prose",), steps=3, base_steps=3, n_lines=100)
    for name in ("copy1", "copy2"):
        shutil.copytree(path, root / name)
    return request.param, [path, root / "copy1", root / "copy2"]


def config(paths, **kw):
    return {"sources": [str(p) for p in paths], "experts": {"router_init": "random"},
            "router_training": {"steps": 0}, "device": "cpu", **kw}


@torch.no_grad()
def test_identical_sources_give_the_dense_model(copies, tmp_path):
    arch, paths = copies
    build(config(paths), tmp_path / "moe", progress=False)
    moe, dense = load(tmp_path / "moe"), load(paths[0])
    assert type(moe).__name__ == ARCH_CLASS[arch] and moe.config.num_experts_per_tok == 2
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = dense(input_ids=ids).logits
    for seed in range(2):  # any router weights
        g = torch.Generator().manual_seed(seed)
        for layer in moe.model.layers:
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g) * 3)
        assert torch.allclose(moe(input_ids=ids).logits, want, atol=2e-5, rtol=0)
    # the backbone of identical sources is the source's, bit for bit
    src, out = saved(paths[0]), saved(tmp_path / "moe")
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(src[name], out[name]), name
    generated = moe.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_per_expert_layout_is_what_transformers_writes(copies, tmp_path):
    arch, paths = copies
    build(config(paths), tmp_path / "moe", progress=False)
    build(config(paths, output={"expert_layout": "fused"}), tmp_path / "fused", progress=False)
    model = load(tmp_path / "moe")
    model.save_pretrained(tmp_path / "resaved")
    ours, theirs = saved(tmp_path / "moe"), saved(tmp_path / "resaved")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    fused = load(tmp_path / "fused")
    assert any(k.endswith("experts.gate_up_proj") for k in saved(tmp_path / "fused"))
    a, b = model.state_dict(), fused.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _perms(layers, f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(f, generator=g) for _ in range(layers)])


@pytest.mark.parametrize("per_source", [1, 2])
def test_experts_are_the_permuted_source_ffns(source_family, tmp_path, monkeypatch, per_source):
    """Experts hold the aligned FFNs exactly; with per_source = 2, routing to both halves with weight 1/2 gives
    the FFN back."""
    paths = source_family
    perms = {1: _perms(2, 128, 1), 2: _perms(2, 128, 2)}
    monkeypatch.setattr(pipeline, "_run_alignment", lambda cfg, c, progress: (perms, None))
    for p in paths:
        (tmp_path / f"{p.name}.txt").write_text("\n".join(domain_text("prose", 40)))
    cfg = config(paths, alignment={"enabled": True, "calibration": [str(tmp_path / f"{paths[0].name}.txt")]},
                 experts={"router_init": "zeros", "per_source": per_source})
    build(cfg, tmp_path / "moe", progress=False)
    experts = [layer.mlp.experts for layer in load(tmp_path / "moe").model.layers]
    report = json.loads((tmp_path / "moe" / "alignment_report.json").read_text())
    assert report["expert_sources"] == [n for n in ("qwen2-prose", "qwen2-code", "qwen2-math") for _ in
                                        range(per_source)]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    for s, path in enumerate(paths):
        src = saved(path)
        for layer in range(2):
            gate, up, down = (src[f"model.layers.{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            if s in perms:
                p = perms[s][layer]
                gate, up, down = gate[p], up[p], down[:, p]
            gu, dn = experts[layer].gate_up_proj, experts[layer].down_proj
            f = 128 // per_source
            total = 0
            for j in range(per_source):
                e = s * per_source + j
                assert torch.equal(gu[e], torch.cat([gate[j * f:(j + 1) * f], up[j * f:(j + 1) * f]]))
                assert torch.equal(dn[e], down[:, j * f:(j + 1) * f] * per_source)
                h = F.silu(x @ gu[e, :f].T) * (x @ gu[e, f:].T)
                total = total + h @ dn[e].T / per_source
            assert torch.allclose(total, (F.silu(x @ gate.T) * (x @ up.T)) @ down.T, atol=1e-5)


def test_qwen2_shared_expert(source_family, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_run_alignment", lambda cfg, c, progress: ({}, None))
    text = tmp_path / "mix.txt"
    text.write_text("\n".join(domain_text("code", 40)))
    build(config(source_family), tmp_path / "none", progress=False)
    out = saved(tmp_path / "none")
    assert out["model.layers.0.mlp.shared_expert.gate_proj.weight"].shape == (0, 64)
    cfg = config(source_family, experts={"router_init": "zeros", "shared_expert": "mean"},
                 alignment={"calibration": [str(text)]})
    build(cfg, tmp_path / "mean", progress=False)
    out = saved(tmp_path / "mean")
    srcs = [saved(p) for p in source_family]
    name = "model.layers.1.mlp.up_proj.weight"
    mean = torch.stack([s[name] for s in srcs]).double().mean(0).float()
    assert torch.allclose(out["model.layers.1.mlp.shared_expert.up_proj.weight"], mean, atol=1e-7)
    assert torch.equal(out["model.layers.1.mlp.shared_expert_gate.weight"], torch.zeros(1, 64))
    load(tmp_path / "mean")


def test_target_config_and_unsupported_sources():
    cfg = target_config(tiny_config("qwen2", 100), num_experts=3, top_k=2, expert_size=64, shared_expert_size=0,
                        vocab_size=110, dtype=torch.bfloat16, max_position_embeddings=256)
    assert cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 0 and cfg.mlp_only_layers == []
    assert cfg.vocab_size == 110 and cfg.architectures == ["Qwen2MoeForCausalLM"] and cfg.dtype == torch.bfloat16
    cfg = target_config(tiny_config("mistral", 100, sliding_window=32), num_experts=4, top_k=1, expert_size=32,
                        shared_expert_size=0, vocab_size=100, dtype=torch.float32, max_position_embeddings=512)
    assert cfg.num_local_experts == 4 and cfg.intermediate_size == 32 and cfg.sliding_window == 32
    assert "Mixtral" in unsupported(tiny_config("llama", 100, attention_bias=True))
    assert unsupported(tiny_config("llama", 100)) is None
    with pytest.raises(SymphonyError, match="no biases"):
        target_config(tiny_config("llama", 100, mlp_bias=True), num_experts=2, top_k=1, expert_size=8,
                      shared_expert_size=0, vocab_size=100, dtype=torch.float32, max_position_embeddings=64)


def test_router_weights():
    z = router_weights("zeros", num_layers=2, num_experts=3, hidden_size=8, per_source=1, seed=0)
    assert len(z) == 2 and all(torch.equal(w, torch.zeros(3, 8)) for w in z)
    r1 = router_weights("random", num_layers=2, num_experts=64, hidden_size=64, per_source=1, seed=5, std=0.02)
    r2 = router_weights("random", num_layers=2, num_experts=64, hidden_size=64, per_source=1, seed=5, std=0.02)
    assert torch.equal(r1[1], r2[1]) and not torch.equal(r1[0], r1[1])
    assert abs(r1[0].std().item() - 0.02) < 0.002
    rows = torch.randn(2, 4, 8).repeat_interleave(2, dim=1)  # 2 experts per source, tied rows
    h = router_weights("hidden", num_layers=2, num_experts=8, hidden_size=8, per_source=2, seed=0, hidden_rows=rows)
    assert not torch.equal(h[0][0], h[0][1])  # ties broken
    assert torch.allclose(h[0], rows[0], rtol=0.05, atol=0.05)
    h1 = router_weights("hidden", num_layers=2, num_experts=8, hidden_size=8, per_source=1, seed=0, hidden_rows=rows)
    assert torch.equal(h1[1], rows[1])


def test_writer_shards_chunks_and_checks(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 7, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.randn(40, 5, generator=g).half(), "d": torch.zeros(0, 4), "e": torch.tensor(2.5)}
    entries = [Entry(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    entries[2] = Entry("c", (40, 5), torch.float16, lambda: iter(tensors["c"].split(7)))  # row chunks
    written = write_shards(tmp_path, entries, max_shard_size=300, progress=False)
    assert len(written["files"]) > 1 and written["total_size"] == 280 + 6 + 400 + 0 + 4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == written["total_size"]
    got = saved(tmp_path)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    for f in written["files"]:
        raw = (tmp_path / f).read_bytes()
        assert int.from_bytes(raw[:8], "little") % 8 == 0
    one = tmp_path / "one"
    one.mkdir()
    assert write_shards(one, entries[:2], max_shard_size=10**9, progress=False)["files"] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(RuntimeError, match="planned"):
        write_shards(bad, [Entry("x", (2, 3), torch.float32, lambda: torch.zeros(3, 2))], 10**9, progress=False)


def test_tied_embeddings(tmp_path):
    paths = make_family(tmp_path / "fam", arch="qwen3", domains=("prose", "code"), steps=2, base_steps=2,
                        n_lines=60, tie_word_embeddings=True)
    build(config(paths, experts={"router_init": "zeros"}), tmp_path / "moe", progress=False)
    assert "lm_head.weight" not in saved(tmp_path / "moe")
    model = load(tmp_path / "moe")
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == \
        model.model.embed_tokens.weight.data_ptr()


def test_replace_tensors_streams_a_router_update(copies, tmp_path):
    """What stage 2 needs to save a router-trained MoE without loading it whole: every shard copied tensor by
    tensor, the routers (in-memory names) replaced."""
    arch, paths = copies
    cfg = config(paths, output={"max_shard_size": "60KB"})
    build(cfg, tmp_path / "moe", progress=False)
    model = load(tmp_path / "moe")
    new = {n: torch.randn(p.shape) for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    dst = tmp_path / "out"
    shutil.copytree(tmp_path / "moe", dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    replaced = replace_tensors(tmp_path / "moe", dst, new)
    assert len(replaced) == 2 and (arch not in ("llama", "mistral") or "block_sparse_moe" in replaced[0])
    after = load(dst).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(after[k], new[k] if k in new else v), k
    with pytest.raises(ValueError, match="not a tensor"):
        replace_tensors(tmp_path / "moe", dst, {"nope": torch.zeros(1)})
