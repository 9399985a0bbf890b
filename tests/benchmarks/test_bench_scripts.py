"""benchmarks/bench_generate.py and benchmarks/sweep_shapes.py at test sizes on CPU (the Triton kernels through
the interpreter): their outputs, the ratios computed from the timed values, the skip / cap / budget rules, the
fresh processes of the cold and compiled measurements, and the random shapes. No timing assertions."""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_generate as bg  # noqa: E402
from benchmarks import bench_moe  # noqa: E402
from benchmarks import generate_models as gm  # noqa: E402
from benchmarks import generate_report as gr  # noqa: E402
from benchmarks import sweep_shapes as ss  # noqa: E402
from benchmarks.run_info import Budget  # noqa: E402

TINY = ["--device", "cpu", "--tiny"]


def _load(folder, name):
    for ext in ("md", "png"):
        assert (folder / f"{name}.{ext}").stat().st_size > 0, ext
    return json.loads((folder / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------- bench_generate
def test_generate_in_process_phases(tmp_path):
    bg.main(TINY + ["--out", str(tmp_path), "--models", "qwen3-moe", "--impls", "symphony", "grouped_mm",
                    "--batch-sizes", "1", "--new-tokens", "3", "--prefill-tokens", "16", "--cold-impls",
                    "--compile-impls"])
    data = _load(tmp_path, "bench_generate")
    assert data["settings"]["dtype"] == "float32" and data["models"]["qwen3-moe"]["E"] == gm.TINY["qwen3-moe"]["E"]
    warm = {(r["impl"], r["B"]): r for r in data["warm"]}
    assert set(warm) == {("symphony", 1), ("grouped_mm", 1)}
    for (impl, B), r in warm.items():
        assert r["new_tokens"] == 3 and r["first_call_s"] > 0
        assert r["tok_s"] == pytest.approx(B * 3 / statistics.median(r["times_s"]))
        assert r["x_grouped_mm"] == pytest.approx(r["tok_s"] / warm["grouped_mm", B]["tok_s"])
    prefill = {r["impl"]: r for r in data["prefill"]}
    assert prefill["symphony"]["x_grouped_mm"] == pytest.approx(prefill["grouped_mm"]["ms"] / prefill["symphony"]["ms"])
    check = {r["impl"]: r for r in data["check"]}
    assert check["symphony"]["rel_err_vs_grouped_mm"] < 1e-4  # float32: the same experts output
    assert data["cold"] == [] and data["compiled"] == []
    text = (tmp_path / "bench_generate.md").read_text()
    ours = warm["symphony", 1]
    assert f"| qwen3-moe | symphony | {ours['tok_s']:.1f} ({ours['x_grouped_mm']:.2f}x)" in text


@pytest.mark.slow
def test_generate_fresh_processes(tmp_path):
    """Two fresh processes (cold eager, then static cache + compile) with empty compile caches; ~25 s here."""
    bg.main(TINY + ["--out", str(tmp_path), "--models", "qwen3-moe", "--impls", "grouped_mm", "--batch-sizes", "1",
                    "--cold-impls", "symphony", "--cold-batch-sizes", "1", "2", "--compile-impls", "symphony",
                    "--compile-batch-sizes", "1"])
    data = _load(tmp_path, "bench_generate")
    cold = {r["B"]: r for r in data["cold"]}
    assert set(cold) == {1, 2}, data["cold"]
    for B, r in cold.items():
        assert r["impl"] == "symphony" and r["first_tok_s"] == pytest.approx(B * 3 / r["first_s"])
        assert r["cache_entries_at_start"] == {"TRITON_CACHE_DIR": 0, "TORCHINDUCTOR_CACHE_DIR": 0}
        assert r["compile_mode"] == os.environ.get("SYMPHONY_COMPILE", "background")
        assert 0 < r["started_s"] <= r["imported_s"] < r["process_s"]
    [compiled] = data["compiled"]
    assert compiled["compiled"] and compiled["fullgraph"] and "fullgraph_error" not in compiled, compiled
    assert compiled["new_tokens"] == 3 and compiled["tok_s"] > 0 and compiled["first_s"] > 0


class _FakeModel:
    """generate() that takes step_s per new token and records how many it was asked for."""

    def __init__(self, step_s):
        self.step_s, self.asked = step_s, []

    def generate(self, ids, max_new_tokens, **kw):
        assert kw["min_new_tokens"] == max_new_tokens and kw["do_sample"] is False
        self.asked.append(max_new_tokens)
        time.sleep(self.step_s * max_new_tokens)
        return torch.zeros(ids.shape[0], ids.shape[1] + max_new_tokens, dtype=torch.long)


def test_generate_cell_cap_skips_and_budget(tmp_path):
    args = bg.parse_args(TINY + ["--out", str(tmp_path), "--new-tokens", "50", "--reps", "3"])
    ids = torch.zeros(2, 4, dtype=torch.long)
    model = _FakeModel(0.01)
    row = bg.timed_tokens(model, ids, args, budget_s=0.1)  # 50 tokens would take 0.5 s: capped
    assert model.asked[0] == 2 and 2 <= row["new_tokens"] < 50 and "cell budget" in row["note"]
    assert all(n == row["new_tokens"] for n in model.asked[1:])
    assert row["tok_s"] == pytest.approx(2 * row["new_tokens"] / statistics.median(row["times_s"]))
    model = _FakeModel(0.0)
    row = bg.timed_tokens(model, ids, args, budget_s=10, cc=object())  # compiled: no probe, no other length
    assert model.asked == [50, 50, 50] and "note" not in row
    # batched_mm's copy of expert weights per layer (decode only for grouped_mm, and only on accelerators)
    mixtral = dict(gm.spec_of("mixtral", tiny=False), name="mixtral")
    pair = 3 * 4096 * 14336 * 2
    assert bg.weight_copy_bytes("batched_mm", mixtral, 16, 16, "cuda") == 16 * 16 * 2 * pair
    assert bg.weight_copy_bytes("grouped_mm", mixtral, 16, 16, "cuda") == 16 * 2 * pair
    assert bg.weight_copy_bytes("grouped_mm", mixtral, 16, 16, "cpu") == 0
    assert bg.weight_copy_bytes("symphony", mixtral, 256, 16, "cuda") == 0
    cuda_args = bg.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    cuda_args.device = "cuda"
    row = bg.warm_cell(None, mixtral, "grouped_mm", 256, cuda_args, Budget(1e9))
    assert row["skipped"].startswith("would copy 180 GB of expert weights per layer (batched_mm decode")
    row = bg.warm_cell(None, mixtral, "symphony", 1, cuda_args, Budget(100), reserve=95)  # left for fresh processes
    assert row["skipped"] == "run budget spent"
    assert bg.run_fresh("cold", "mixtral", "symphony", cuda_args, Budget(0), str(tmp_path)) == [
        {"model": "mixtral", "impl": "symphony", "skipped": "run budget spent"}]


def test_generate_models_build_the_named_shapes():
    for name in ("mixtral", "qwen3-next"):
        spec = gm.spec_of(name, tiny=True)
        model = gm.build_model(spec, "eager", "cpu", torch.float32, seed=0, max_positions=64)
        experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
        assert tuple(experts.gate_up_proj.shape) == (spec["E"], 2 * spec["f"], spec["d"])
        assert model.config.num_experts_per_tok == spec["k"] and model.config.num_hidden_layers == spec["layers"]
        again = gm.build_model(spec, "grouped_mm", "cpu", torch.float32, seed=0, max_positions=64)
        assert torch.equal(next(m for m in again.modules() if hasattr(m, "gate_up_proj")).down_proj, experts.down_proj)
    assert gm.MODELS["qwen3-next"]["E"] == 512 and gm.MODELS["qwen3-next"]["k"] == 10
    with pytest.raises(SystemExit, match="unknown model"):
        gm.spec_of("llama", tiny=False)


def _result(model, rows):
    base = {"device": "cpu", "torch": "t", "triton": "tr", "transformers": "tf", "command": f"run {model}",
            "settings": {}, "models": {model: dict(gm.spec_of("qwen3-moe", True), name=model, params=123)},
            "check": [], "warm": [], "prefill": [], "cold": [], "compiled": []}
    for phase, row in rows:
        base[phase].append(dict(row, model=model))
    return base


def test_generate_report_ratios_and_merge(tmp_path):
    a = _result("m1", [("warm", {"impl": "grouped_mm", "B": 1, "tok_s": 10.0}),
                       ("warm", {"impl": "symphony", "B": 1, "tok_s": 15.0}),
                       ("cold", {"impl": "grouped_mm", "B": 1, "first_s": 2.0, "first_tok_s": 8.0}),
                       ("cold", {"impl": "symphony", "B": 1, "first_s": 8.0, "first_tok_s": 2.0}),
                       ("compiled", {"impl": "grouped_mm", "B": 1, "first_s": 20.0, "tok_s": 100.0}),
                       ("compiled", {"impl": "symphony", "error": "fresh process exit 1: boom"})])
    b = _result("m2", [("prefill", {"impl": "grouped_mm", "tokens": 64, "ms": 3.0}),
                       ("prefill", {"impl": "symphony", "tokens": 64, "ms": 2.0})])
    merged = gr.merge([a, b])
    assert [r["command"] for r in merged["runs"]] == ["run m1", "run m2"] and set(merged["models"]) == {"m1", "m2"}
    gr.finish(merged, tmp_path)
    data = _load(tmp_path, "bench_generate")
    ratio = {(p, r["model"], r["impl"]): r.get("x_grouped_mm") for p in ("warm", "prefill") for r in data[p]}
    assert ratio["warm", "m1", "symphony"] == 1.5 and ratio["prefill", "m2", "symphony"] == 1.5
    assert [r["x_grouped_mm"] for r in data["cold"]] == [1.0, 0.25]
    text = (tmp_path / "bench_generate.md").read_text()
    assert "| m1 | symphony | 15.0 (1.50x) |" in text and "| m1 | symphony | 8.00 s (0.25x), 2.0 tok/s |" in text
    assert "| m1 | symphony | error; error |" in text and "- compiled m1 symphony: fresh process exit 1: boom" in text
    out = tmp_path / "merged"
    bg.main(["--merge", str(tmp_path), str(tmp_path), "--out", str(out)])
    assert len(_load(out, "bench_generate")["warm"]) == 4


# ------------------------------------------------------------------------------------------------ sweep_shapes
def test_draw_shapes():
    shapes = ss.draw_shapes(30, seed=3)
    assert shapes == ss.draw_shapes(30, seed=3) and shapes != ss.draw_shapes(30, seed=4)
    for i, (d, f, E, k) in enumerate(shapes):
        assert 256 <= d <= 8192 and 256 <= f <= 8192 and d % 8 == 0 and f % 8 == 0
        assert 2 <= E <= 512 and 1 <= k <= min(10, E) and E * 3 * d * f * 2 <= 6e9
        assert (d % 16 == 0 and f % 16 == 0) == (i % 2 == 0)  # every second shape is 16-aligned
    assert max(E for _, _, E, _ in shapes) > 100 and len({k for *_, k in shapes}) > 4


def test_sweep_tiny(tmp_path):
    before = os.environ.get("TRITON_CACHE_DIR")
    ss.main(TINY + ["--out", str(tmp_path), "--shapes", "2", "--tokens", "1", "9", "--seed", "1"])
    assert os.environ.get("TRITON_CACHE_DIR") == before  # the fresh cache folder was this run's only
    data = _load(tmp_path, "sweep_shapes")
    assert data["shapes"] == [list(s) for s in ss.draw_shapes(2, 1, **{k: ss.PROFILES["tiny"][k] for k in
                                                                      ("lo", "hi", "e_max", "k_max")})]
    assert len(data["cells"]) == 4
    assert data["settings"]["fresh_caches"] == ["TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"]
    for c in data["cells"]:
        assert c["peer"] == "grouped_mm" and c["ratio"] == pytest.approx(c["peer_ms"] / c["ours_ms"])
        assert c["rel_err"] < 1e-4 and c["first_ms_ours"] > 0 and c["aligned16"] == (c["d"] % 16 == c["f"] % 16 == 0)
    s = data["summary"]
    assert s["cells"] == 4 and s["failed"] == 0 and s["below_0.9x"] == sum(c["ratio"] < 0.9 for c in data["cells"])
    assert s["median_ratio"] == pytest.approx(statistics.median(c["ratio"] for c in data["cells"]))
    assert s["median_ratio_T_ge_4096"] is None and s["cells_aligned16"] + s["cells_not_aligned16"] == 4
    assert "below 0.9x" in (tmp_path / "sweep_shapes.md").read_text()


def test_sweep_peer_falls_back_when_grouped_mm_refuses(monkeypatch, tmp_path):
    real = bench_moe.hf_module

    def refusing(gate_up, down, impl, k, trainable=False):
        if impl == "grouped_mm":
            raise RuntimeError("grouped_mm refuses this shape")
        return real(gate_up, down, impl, k, trainable)

    monkeypatch.setattr(bench_moe, "hf_module", refusing)
    args = ss.parse_args(TINY + ["--out", str(tmp_path)])
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(3, 2 * 24, 40, generator=g), torch.randn(3, 40, 24, generator=g)
    row = ss.run_cell((40, 24, 3, 2), 5, gate_up, down, args, torch.float32, quick=True)
    assert row["peer"] == "batched_mm" and "refuses" in row["grouped_mm_error"] and row["rel_err"] < 1e-4
    assert not row["aligned16"] and row["ratio"] == pytest.approx(row["peer_ms"] / row["ours_ms"])
    assert ss.peer_candidates(16384, 8192, 8192, 10) == ["grouped_mm", "eager"]


def test_sweep_records_cells_that_fail(monkeypatch, tmp_path):
    import symphony_kernels

    def refuse(*a, **kw):
        raise ValueError("the number of experts must be in [1, 256], got 300")

    monkeypatch.setattr(symphony_kernels, "moe_experts", refuse)
    data = ss.main(TINY + ["--out", str(tmp_path), "--shapes", "1", "--tokens", "1", "3"])
    message = "ValueError: the number of experts must be in [1, 256], got 300"
    assert [c["ours_error"] for c in data["cells"]] == [message] * 2
    assert data["summary"] == {"cells": 0, "failed": 2}
    assert "2 cells without a ratio" in (tmp_path / "sweep_shapes.md").read_text()
