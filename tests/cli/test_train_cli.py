"""`symphony train` (one process) and the `--nproc` switches of train and build: settings from flags and
--config, the summary, one-line errors for bad input with nothing written. (2 processes: tests/train.)"""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from symphony.cli import main


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny random Qwen2-MoE and a training text."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from symphony.testing import domain_text, make_tokenizer

    root = tmp_path_factory.mktemp("train-cli")
    text = "\n".join(domain_text("prose", 120))
    (root / "text.txt").write_text(text)
    tokenizer = make_tokenizer([text], vocab_size=300)
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, bos_token_id=0,
                            eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "moe")
    tokenizer.save_pretrained(root / "moe")
    return root / "moe", root / "text.txt"


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_one_process(moe, tmp_path, capsys):
    model, text = moe
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump({"lr": 0.05, "steps": 50, "seq_len": 64}))
    rc, out, err = run(capsys, "train", model, "--text", text, "--out", tmp_path / "out", "--steps", 3,
                       "--seq-len", 16, "--batch-size", 2, "--config", tmp_path / "settings.yaml", "--quiet",
                       "--json", tmp_path / "summary.json")
    assert rc == 0, err
    assert out.startswith(f"wrote {tmp_path / 'out'}: 3 steps, 96 tokens")  # the flags over --config
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    before, after = load_file(model / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for k in changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "settings.yaml", "summary.json"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "-1"], "steps must be >= 0"),
    (["--lr", "0"], "lr must be > 0"),
    (["--nproc", "0"], "--nproc must be a positive integer"),
    (["--nproc", "2", "--batch-size", "3", "--device", "cpu"], "batch_size=3 is not a multiple of the 2 processes"),
    (["--config", "missing.yaml"], "cannot read --config"),
    (["--config", "{bad}"], "unknown setting 'warmups'"),
    (["--text", "missing.txt"], "text file not found"),
])
def test_bad_input_is_one_line(moe, tmp_path, capsys, monkeypatch, args, message):
    model, text = moe
    monkeypatch.chdir(tmp_path)
    if "{bad}" in args:
        (tmp_path / "bad.yaml").write_text("warmups: 0.2\n")
        args = [a.replace("{bad}", "bad.yaml") for a in args]
    rc, out, err = run(capsys, "train", model, "--text", text, "--out", tmp_path / "out", *args)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("symphony train: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["bad.yaml"])


def test_bad_model_output_and_launch(moe, tmp_path, capsys, monkeypatch):
    model, text = moe
    rc, _, err = run(capsys, "train", tmp_path / "nothing", "--text", text, "--out", tmp_path / "out")
    assert rc == 1 and "model folder not found" in err
    (tmp_path / "out").mkdir()
    rc, _, err = run(capsys, "train", model, "--text", text, "--out", tmp_path / "out")
    assert rc == 1 and "already exists (use --force" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = run(capsys, "train", model, "--text", text, "--out", tmp_path / "new", "--nproc", 2, "--device", "cpu")
    assert rc == 1 and "do not combine it with torchrun" in err


def test_build_nproc_runs_stage_2_through_the_launcher(tmp_path, capsys, monkeypatch):
    """`symphony build --nproc 2` hands stage 2 to symphony.train.launch with the build's settings and text
    files (the launcher itself runs in tests/train/test_distributed.py; here it trains in this process)."""
    from symphony.build import pipeline
    from symphony.testing import domain_text, make_family
    from symphony.train import train_router

    sources = make_family(tmp_path / "src", arch="qwen2", domains=("prose", "code"), steps=2, base_steps=2,
                          n_lines=40)
    (tmp_path / "text.txt").write_text("\n".join(domain_text("prose", 80)))
    calls = []

    def launcher(model_dir, text_files, cfg, out_dir, *, nproc, **kw):
        calls.append((nproc, [str(p) for p in text_files], cfg.steps, cfg.batch_size))
        return train_router(model_dir, [p.read_text() for p in text_files], cfg, out_dir, **kw)

    monkeypatch.setattr(pipeline, "launch", launcher)
    config = {"sources": [str(p) for p in sources], "device": "cpu", "experts": {"router_init": "zeros"},
              "router_training": {"steps": 2, "batch_size": 4, "seq_len": 16, "text": [str(tmp_path / "text.txt")]}}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(config))
    rc, out, err = run(capsys, "build", tmp_path / "build.yaml", "--out", tmp_path / "moe", "--nproc", 2, "--quiet")
    assert rc == 0, err
    assert calls == [(2, [str(tmp_path / "text.txt")], 2, 4)]
    assert json.loads((tmp_path / "moe" / "alignment_report.json").read_text())["stage2"]["steps"] == 2
    rc, _, err = run(capsys, "build", tmp_path / "build.yaml", "--out", tmp_path / "moe2", "--nproc", 3)
    assert rc == 1 and "batch_size=4 is not a multiple of the 3 processes" in err
