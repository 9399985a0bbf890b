"""Stage 2 on 2 processes (symphony.train.distributed, FSDP2 over gloo on the CPU, float32): the loss curve and
the trained weights follow the one-process run (within 1e-4), checkpoints resume on another number of
processes, and `symphony train --nproc 2` launches it all through torchrun."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train import CONFIGS, TINY, cfg, weights

import symphony.train.distributed  # noqa: F401 - imported here once, not in every forked process
from symphony.train import train_router

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(steps=6, train="full", lr=1e-3, batch_size=4, seq_len=32, aux_loss_coef=0.1, checkpoint_every=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny MoE, its text and the one-process run every test compares with."""
    from symphony.testing import domain_text, make_tokenizer

    root = tmp_path_factory.mktemp("dist")
    text = "\n".join(domain_text("prose", 300))
    (root / "text.txt").write_text(text)
    moe = _random_moe(root / "moe", make_tokenizer([text], vocab_size=300))
    straight = train_router(moe, [text], cfg(**SETTINGS), root / "straight", progress=False)
    return root, moe, text, straight


def _random_moe(path, tokenizer):
    """A tiny Qwen2-MoE with random weights (4 experts, a shared expert), float32."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), **TINY, **CONFIGS["qwen2_moe"][1])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _crash_at(step):
    import symphony.train.distributed as distributed
    import symphony.train.loop as loop

    real = loop._train_step

    def crash(*args):
        if args[5] == step:
            raise KeyboardInterrupt
        return real(*args)

    return crash, (loop, distributed)


def _fsdp_worker(rank, world, moe, text, out, crash_step, resume):
    from symphony.train.distributed import train_fsdp

    if crash_step is not None:
        crash, modules = _crash_at(crash_step)
        for m in modules:
            m._train_step = crash
        try:
            train_fsdp(moe, [text], cfg(**SETTINGS), out, progress=False)
        except KeyboardInterrupt:
            return "crashed"
    return train_fsdp(moe, [text], cfg(**SETTINGS), out, resume=resume, progress=False)


def _same_model(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_processes_crash_and_one_resumes(setup, gloo, tmp_path):
    root, moe, text, straight = setup
    out = tmp_path / "out"
    assert gloo(_fsdp_worker, 2, moe, text, out, 3, False) == ["crashed", "crashed"]
    assert [p.name for p in (tmp_path / "out.checkpoints").iterdir()] == ["step-000000002"]
    resumed = train_router(moe, [text], cfg(**SETTINGS), out, resume=True, progress=False)
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-4)
    assert _same_model(root / "straight", out) < 1e-4
    assert not (tmp_path / "out.checkpoints").exists()


def test_one_process_crashes_and_two_resume(setup, gloo, tmp_path, monkeypatch):
    import symphony.train.loop as loop

    root, moe, text, straight = setup
    out = tmp_path / "out"
    crash, _ = _crash_at(3)
    monkeypatch.setattr(loop, "_train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train_router(moe, [text], cfg(**SETTINGS), out, progress=False)
    monkeypatch.undo()
    results = gloo(_fsdp_worker, 2, moe, text, out, None, True)
    for summary in results:
        assert summary["losses"] == pytest.approx(straight["losses"], abs=1e-4)
        assert torch.allclose(torch.tensor(summary["expert_load"]), torch.tensor(straight["expert_load"]), atol=1e-6)
    assert _same_model(root / "straight", out) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # checkpoints gone, no temporary folder


def test_symphony_train_nproc_2_matches_one_process(setup, tmp_path):
    """The whole path: the CLI launches torchrun, whose 2 processes train with FSDP2 and write the model."""
    root, moe, text, straight = setup
    args = ["--train", "full", "--steps", "6", "--lr", "1e-3", "--batch-size", "4", "--seq-len", "32"]
    config = tmp_path / "settings.yaml"
    config.write_text("aux_loss_coef: 0.1\nlog_every: 10\n")
    cmd = [sys.executable, "-m", "symphony", "train", str(moe), "--text", str(root / "text.txt"), "--out",
           str(tmp_path / "out"), *args, "--config", str(config), "--nproc", "2", "--quiet", "--json",
           str(tmp_path / "summary.json")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["losses"] == pytest.approx(straight["losses"], abs=1e-4)
    assert _same_model(root / "straight", tmp_path / "out") < 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "settings.yaml", "summary.json"]
