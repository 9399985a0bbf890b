"""benchmarks/bench_train.py, bench_distributed.py and scaling.py at tiny sizes on the CPU (gloo), so that the
GPU runs are known to start and finish; no timing assertions."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train  # noqa: E402
from benchmarks.scaling import model_facts, paper_paragraph, paper_scale  # noqa: E402


def test_bench_train_tiny(tmp_path):
    results = bench_train.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                                "--batch-size", "2", "--seq-len", "8"])
    rows = {r["impl"]: r for r in results["rows"]}
    assert set(rows) == {"symphony", "grouped_mm", "batched_mm"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 2 and torch.isfinite(torch.tensor(r["losses"])).all()
    assert json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]["impl"] == "symphony"
    assert "| tiny |" in (tmp_path / "bench_train.md").read_text()


def test_moe_config_is_what_build_makes():
    config = bench_train.moe_config("1.5b")
    assert type(config).__name__ == "Qwen2MoeConfig"
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.shared_expert_intermediate_size) == (4, 2, 8960, 0)
    facts = model_facts("7b", 1024)
    assert 24e9 < facts["params"] < 25.5e9  # "about 24B parameters" (issue 12)


def test_paper_scale_follows_the_measurement():
    a = paper_scale(10_000, 60e9, 2, 1024, 8)
    b = paper_scale(20_000, 60e9, 2, 1024, 8)
    assert b["tokens_per_s_per_gpu"] == pytest.approx(2 * a["tokens_per_s_per_gpu"])
    assert [p["days"] for p in b["plans"]] == pytest.approx([p["days"] / 2 for p in a["plans"]])
    plan = a["plans"][0]
    assert plan["gpus"] == a["gpus_needed"] and plan["memory_per_gpu_bytes"] <= a["usable_bytes"]
    # one GPU fewer would not fit; days = tokens / (GPUs * rate)
    from benchmarks.scaling import memory_per_gpu

    assert memory_per_gpu(a["big"], a["gpus_needed"] - 1, a["activation_bytes"]) > a["usable_bytes"]
    assert plan["days"] == pytest.approx(5e9 / (plan["gpus"] * a["tokens_per_s_per_gpu"]) / 86400)
    assert f"at least {a['gpus_needed']} H200s" in paper_paragraph(a)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_bench_distributed_tiny_on_1_and_2_processes(tmp_path, monkeypatch):
    """1 process here, 2 through the script's own torchrun launch (its children on the CPU reference kernels,
    without Triton's interpreter)."""
    from benchmarks import bench_distributed

    args = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--micro-batch", "2", "--seq-len", "16",
            "--tokens", "24"]
    results = bench_distributed.main(["--out", str(tmp_path / "one"), "--gpus", "1", *args])
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET", raising=False)
        two = bench_distributed.main(["--out", str(tmp_path), "--gpus", "2", *args])
    assert not results["errors"] and not two["errors"]
    results["train"] += two["train"]
    results["ep"] += two["ep"]
    assert [r["nproc"] for r in results["train"]] == [1, 2] and [r["nproc"] for r in results["ep"]] == [1, 2]
    one, two = results["train"]
    assert one["params"] == two["params"] and two["tokens_per_s"] > 0
    # the same initial model and step: the first losses agree (FSDP on 2 processes vs plain on 1)
    assert two["losses"][0] == pytest.approx(one["losses"][0], abs=0.05)
    assert "| (32, 16, 8, 2) | 2 | 24 |" in (tmp_path / "bench_distributed.md").read_text()
