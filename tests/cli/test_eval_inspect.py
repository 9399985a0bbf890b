"""`symphony eval` / `symphony inspect`: perplexity, expert load, config summary, and their CLI."""
import json
import math

import pytest
import torch

from symphony.cli import main
from symphony.data import load_model
from symphony.evaluate import perplexity
from symphony.evaluate import config_summary, expert_load


def test_perplexity_is_exp_of_the_mean_nll_by_hand(moe_dir, texts):
    model = load_model(moe_dir)
    from symphony.data import load_tokenizer

    tokenizer = load_tokenizer(moe_dir)
    ids = tokenizer(texts["code"], add_special_tokens=False)["input_ids"]
    seq_len = 50
    assert len(ids) % seq_len > 1  # a shorter last window is counted too
    nlls = []
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = torch.tensor([ids[start:start + seq_len]])
            logp = model(window).logits[0, :-1].log_softmax(-1)
            nlls += (-logp.gather(1, window[0, 1:, None])[:, 0]).tolist()
    result = perplexity(model, tokenizer, [texts["code"]], seq_len=seq_len, batch_size=3, progress=False)
    assert result["tokens"] == len(nlls) == len(ids) - math.ceil(len(ids) / seq_len)
    assert result["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    # the batch size does not change the result
    again = perplexity(model, tokenizer, [texts["code"]], seq_len=seq_len, batch_size=1, progress=False)
    assert again["nll"] == pytest.approx(result["nll"], rel=1e-5)


def test_expert_load_counts_the_models_own_routing(moe_dir, texts):
    model = load_model(moe_dir)
    from symphony.data import load_tokenizer

    counts = torch.zeros(2, 4)

    def count(i):
        def hook(module, args, out):  # the router returns (logits, top-k weights, top-k experts)
            counts[i].index_add_(0, out[2].flatten(), torch.ones(out[2].numel()))
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(count(i)) for i, layer in enumerate(model.model.layers)]
    load = expert_load(model, load_tokenizer(moe_dir), [texts["prose"]], seq_len=40, batch_size=2, progress=False)
    for h in hooks:
        h.remove()
    assert load.shape == (2, 4)
    assert torch.allclose(load, counts / counts.sum(1, keepdim=True))
    assert (load - 0.25).abs().max() > 0.05  # the routers in this model are not uniform


def test_config_summary_counts_parameters(moe_dir):
    s = config_summary(moe_dir)
    assert (s["architecture"], s["experts"], s["top_k"], s["moe_layers"]) == ("Qwen2MoeForCausalLM", 4, 2, 2)
    model = load_model(moe_dir)
    assert s["params"] == sum(p.numel() for p in model.parameters())
    expert = 3 * 32 * 16  # gate, up and down of one expert
    assert s["active_params"] == s["params"] - 2 * (4 - 2) * expert
    assert s["shared_expert_intermediate_size"] == 24


def test_eval_cli(moe_dir, files, tmp_path, capsys, texts):
    out = tmp_path / "ppl.json"
    assert main(["eval", str(moe_dir), "--text", *map(str, files), "--seq-len", "32", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(str(f) in table for f in files) and "all files" in table
    result = json.loads(out.read_text())
    model = load_model(moe_dir)
    from symphony.data import load_tokenizer

    prose = perplexity(model, load_tokenizer(moe_dir), [texts["prose"]], seq_len=32, progress=False)
    assert result["files"][str(files[0])] == pytest.approx(prose)
    tokens = sum(r["tokens"] for r in result["files"].values())
    assert result["all"]["tokens"] == tokens
    assert result["all"]["nll"] == pytest.approx(sum(r["nll"] * r["tokens"] for r in result["files"].values()) / tokens)


def test_inspect_cli(moe_dir, files, tmp_path, capsys):
    report = {"expert_sources": ["prose", "prose", "code", "math"],
              "layers": [{"layer": 0, "before": 0.12, "after": 0.51}, {"layer": 1, "before": 0.1, "after": 0.47}]}
    (moe_dir / "alignment_report.json").write_text(json.dumps(report))
    try:
        out = tmp_path / "inspect.json"
        assert main(["inspect", str(moe_dir), "--text", str(files[0]), "--seq-len", "32", "--json", str(out)]) == 0
    finally:
        (moe_dir / "alignment_report.json").unlink()
    shown = capsys.readouterr().out
    assert "Qwen2MoeForCausalLM" in shown and "load per source" in shown and "0.51" in shown
    result = json.loads(out.read_text())
    load = torch.tensor(result["expert_load"])
    assert torch.allclose(load.sum(1), torch.ones(2))
    per_source = result["source_load"]
    assert list(per_source) == ["prose", "code", "math"]
    assert per_source["prose"] == pytest.approx((load[:, 0] + load[:, 1]).tolist())
    assert result["alignment_report"] == report

    assert main(["inspect", str(moe_dir)]) == 0  # config only, no text
    assert "expert load" not in capsys.readouterr().out


def test_bad_input_gives_one_line_errors(moe_dir, files, tmp_path, capsys):
    from symphony.testing import make_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(tiny_config("qwen2", 300)).save_pretrained(dense)
    make_tokenizer(["a b c"], vocab_size=300).save_pretrained(dense)
    cases = [
        (["eval", str(tmp_path / "nope"), "--text", str(files[0])], "model folder not found"),
        (["eval", str(moe_dir), "--text", str(empty)], "text file is empty"),
        (["eval", str(moe_dir), "--text", str(tmp_path / "missing.txt")], "text file not found"),
        (["eval", str(moe_dir), "--text", str(files[0]), "--seq-len", "1"], "--seq-len must be at least 2"),
        (["eval", str(moe_dir), "--text", str(files[0]), "--dtype", "fp8"], "unknown dtype"),
        (["eval", str(moe_dir), "--text", str(files[0]), "--json", str(tmp_path / "no" / "x.json")], "does not exist"),
        (["inspect", str(tmp_path)], "no config.json"),
        (["inspect", str(dense), "--text", str(files[0])], "not a mixture-of-experts model"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert main(["eval", str(dense), "--text", str(files[0]), "--seq-len", "32"]) == 0  # dense models evaluate too
