"""`symphony build` end to end on the fixture factory's small sources: the CLI, the stages, differing
vocabularies, sharded sources, and every bad input of issue 5 (a one-line error, a non-zero exit, nothing
left behind)."""
import json
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from symphony import cli
from symphony.build import correlate as align
from symphony.build import pipeline
from symphony.build.config import parse_config
from symphony.data import ZERO_SIZE_INIT_WARNING, load_model, quiet_zero_size_init
from symphony.build.pipeline import alignment_decision, build
from symphony.build.report import format_summary
from symphony.testing import domain_text, make_family

DOMAINS = ("prose", "code", "math")


def run_cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def texts(folder, domains=DOMAINS, lines=120):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for d in domains:
        paths[d] = folder / f"{d}.txt"
        paths[d].write_text("\n".join(domain_text(d, lines, seed=11)))
    return paths


def write_config(path, sources, calib, **extra):
    data = {"sources": [{"name": n, "path": str(p), "calibration": [str(calib[n])]} for n, p in sources.items()],
            "router_training": {"steps": 0}, "device": "cpu", **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def load(path):
    with quiet_zero_size_init():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def family(source_family, tmp_path_factory):
    calib = texts(tmp_path_factory.mktemp("text"))
    return dict(zip(DOMAINS, source_family)), calib


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two quick sharded Qwen2 sources (prose, code) with their texts: the base for the bad-input cases."""
    root = tmp_path_factory.mktemp("small")
    paths = make_family(root, arch="qwen2", domains=("prose", "code"), steps=3, base_steps=3, n_lines=80,
                        max_shard_size="60KB")
    return dict(zip(("prose", "code"), paths)), texts(root / "text", ("prose", "code"), 60)


def test_build_cli_end_to_end(family, tmp_path, capsys):
    sources, calib = family
    cfg = write_config(tmp_path / "build.yaml", sources, calib,
                       router_training={"steps": 6, "seq_len": 32, "batch_size": 4, "lr": 1e-2})
    out = tmp_path / "moe"
    rc, stdout, err = run_cli(capsys, "build", cfg, "--out", out, "--quiet")
    assert rc == 0, err
    for words in ("built", "checks", "alignment (stage 1b)", "skipped", "router training (stage 2)", "6 steps",
                  "peak memory"):
        assert words in stdout, stdout
    model = load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 3
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def parse", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)
    report = json.loads((out / "alignment_report.json").read_text())
    assert report["expert_sources"] == list(DOMAINS) and report["alignment"]["ran"] is False
    assert report["stage2"]["steps"] == 6 and report["experts"]["router_init"] == "hidden"
    # stage 2 trains routers only: the experts are the source FFNs bit for bit, the backbone is the fusion
    experts = [layer.mlp.experts for layer in model.model.layers]
    src = [weights(p) for p in sources.values()]
    for e, w in enumerate(src):
        for layer in range(2):
            gate, up, down = (w[f"model.layers.{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            assert torch.equal(experts[layer].gate_up_proj[e], torch.cat([gate, up]))
            assert torch.equal(experts[layer].down_proj[e], down)
    norm = torch.stack([w["model.norm.weight"] for w in src]).double().mean(0).float()
    assert torch.allclose(model.model.norm.weight, norm, atol=1e-7)
    assert oct(os.stat(out / "model.safetensors").st_mode & 0o777) == "0o644"
    # inspect reads the report
    rc, text, err = run_cli(capsys, "inspect", out, "--text", calib["code"], "--seq-len", "32")
    assert rc == 0 and "load per source" in text and "qwen2-code" not in err


def test_existing_output_needs_force(small, tmp_path, capsys):
    sources, calib = small
    cfg = write_config(tmp_path / "b.yaml", sources, calib, experts={"router_init": "zeros"})
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    rc, _, err = run_cli(capsys, "build", cfg, "--out", out, "--quiet")
    assert rc == 1 and "already exists" in err and "--force" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == before
    rc, _, err = run_cli(capsys, "build", cfg, "--out", out, "--force", "--quiet")  # not a model: not replaced
    assert rc == 1 and "no model (no config.json)" in err and (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")  # an earlier output
    rc, _, err = run_cli(capsys, "build", cfg, "--out", out, "--force", "--quiet")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary or old folder left
    # sharded sources in, sharded output out
    load(out)
    rc, _, err = run_cli(capsys, "build", cfg, "--out", sources["code"].parent, "--force", "--quiet")
    assert rc == 1 and "would replace source 'prose'" in err and sources["code"].is_dir()


def test_sharded_output(small, tmp_path):
    sources, calib = small
    cfg = parse_config({"sources": [str(p) for p in sources.values()], "experts": {"router_init": "random"},
                        "router_training": {"steps": 0}, "device": "cpu", "output": {"max_shard_size": "100KB"}})
    summary = build(cfg, tmp_path / "moe", progress=False)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "moe" / f).stat().st_size < 100_000 + 20_000 for f in files)
    assert summary["total_size"] == index["metadata"]["total_size"] and summary["peak_rss_bytes"] > 0
    assert "fusion + assembly" in format_summary(summary)
    load(tmp_path / "moe")


def test_differing_vocabularies(tmp_path):
    paths = make_family(tmp_path / "fam", arch="llama", domains=("prose", "code", "math"), steps=3, base_steps=3,
                        n_lines=80, vocab="differing")
    cfg = {"sources": [str(p) for p in paths], "experts": {"router_init": "random", "per_source": 2},
           "alignment": {"calibration": [str(texts(tmp_path / "t", ("code",), 40)["code"])], "seq_len": 64},
           "router_training": {"steps": 0}, "device": "cpu"}
    summary = build(cfg, tmp_path / "moe", progress=False)
    assert summary["alignment"]["ran"] and "neuron correlation" in summary["alignment"]["table"]
    aligned = json.loads((tmp_path / "moe" / "alignment_report.json").read_text())["alignment"]
    assert [s["name"] for s in aligned["sources"]] == ["llama-code", "llama-math"]
    assert len(aligned["layers"]) == 2 and 0 <= aligned["layers"][1]["llama-math moved"] <= 1
    assert aligned["layers"][0]["llama-code after"] >= aligned["layers"][0]["llama-code before"] - 1e-9
    toks = [AutoTokenizer.from_pretrained(p) for p in paths]
    union = AutoTokenizer.from_pretrained(tmp_path / "moe")
    base = len(toks[0]) - 1  # the shared base vocabulary; each source adds its own tokens after it
    assert len(union) == base + 4
    out, src = weights(tmp_path / "moe"), [weights(p) for p in paths]
    emb = out["model.embed_tokens.weight"]
    assert emb.shape[0] == base + 4
    shared = torch.stack([s["model.embed_tokens.weight"][:base] for s in src]).double().mean(0).float()
    assert torch.allclose(emb[:base], shared, atol=1e-7)
    for tok, s in (("<|quote|>", 0), ("<|fim_prefix|>", 1), ("<|fim_suffix|>", 1), ("<|calc|>", 2)):
        u, local = union.convert_tokens_to_ids(tok), toks[s].convert_tokens_to_ids(tok)
        assert u >= base and torch.equal(emb[u], src[s]["model.embed_tokens.weight"][local]), tok
        assert torch.equal(out["lm_head.weight"][u], src[s]["lm_head.weight"][local])
        assert union(f"x {tok} y", add_special_tokens=False).input_ids.count(u) == 1
    model = load(tmp_path / "moe")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.vocab_size == base + 4


def test_alignment_decision():
    base = {"sources": ["a", "b"], "experts": {"router_init": "zeros"}, "router_training": {"steps": 0}}
    run, why = alignment_decision(parse_config(base))
    assert not run and "does not change its function" in why
    run, why = alignment_decision(parse_config({**base, "alignment": {"enabled": True}}))
    assert run and "cannot change" in why
    run, why = alignment_decision(parse_config({**base, "experts": {"router_init": "zeros", "per_source": 2}}))
    assert run and "finer experts" in why
    run, why = alignment_decision(parse_config({**base, "alignment": {"enabled": False},
                                                "experts": {"router_init": "zeros", "shared_expert": "mean"}}))
    assert not run and "disabled" in why


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _nan(path):
    file = sorted(path.glob("*.safetensors"))[-1]
    w = load_file(file)
    name = next(k for k in w if "mlp" in k)
    w[name][0, 0] = float("nan")
    save_file(w, file, metadata={"format": "pt"})


BAD = {
    "architectures differ": (lambda root, s: make_family(root, arch="qwen2", domains=("math",), steps=1, base_steps=1,
                                                          n_lines=40, intermediate_size=96)[0],
                             ["differ in intermediate_size", "128 vs 96"]),
    "families differ": (lambda root, s: make_family(root, arch="llama", domains=("math",), steps=1, base_steps=1,
                                                     n_lines=40)[0], ["model_type", "'qwen2' vs 'llama'"]),
    "missing shard": (lambda root, s: (lambda p: (sorted(p.glob("*.safetensors"))[1].unlink(), p)[1])(
        _copy(s, root / "m")), ["safetensors file missing", "model-00002"]),
    "truncated": (lambda root, s: (lambda p: (os.truncate(sorted(p.glob("*.safetensors"))[0], 1000), p)[1])(
        _copy(s, root / "m")), ["truncated or corrupt", "model-00001"]),
    "nan": (lambda root, s: (lambda p: (_nan(p), p)[1])(_copy(s, root / "m")), ["NaN", "mlp"]),
    "not a checkpoint": (lambda root, s: (root.mkdir(), root)[1], ["no config.json"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sources_fail_cleanly(small, tmp_path, capsys, case):
    sources, calib = small
    make, words = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    third = make(tmp_path / "bad", sources["code"])
    cfg = write_config(tmp_path / "b.yaml", {**sources, "third": third}, {**calib, "third": calib["code"]},
                       experts={"router_init": "zeros"})
    before = sorted(os.listdir(work))
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--quiet")
    assert rc == 1 and err.count("\n") == 1 and err.startswith("symphony build: error:"), err
    for w in words:
        assert w in err, err
    assert sorted(os.listdir(work)) == before  # nothing left behind, not even a temporary folder


def test_bad_text_and_output_fail_cleanly(small, tmp_path, capsys):
    sources, calib = small
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    work = tmp_path / "work"
    work.mkdir()
    cases = [
        (write_config(tmp_path / "a.yaml", sources, {**calib, "code": empty}), work / "moe", ["text file is empty"]),
        (write_config(tmp_path / "b.yaml", sources, calib, experts={"router_init": "zeros"},
                      router_training={"steps": 5, "seq_len": 4096}), work / "moe", ["fewer than", "seq_len"]),
        (write_config(tmp_path / "c.yaml", sources, calib), work / "no" / "moe", ["not an existing folder"]),
        (write_config(tmp_path / "d.yaml", sources, calib), empty / "moe", ["not an existing folder"]),
    ]
    for cfg, out, words in cases:
        before = sorted(os.listdir(work))
        rc, _, err = run_cli(capsys, "build", cfg, "--out", out, "--quiet")
        assert rc == 1 and err.count("\n") == 1, err
        for w in words:
            assert w in err, err
        assert sorted(os.listdir(work)) == before


def test_interrupt_leaves_nothing(small, tmp_path, capsys, monkeypatch):
    sources, calib = small
    import symphony.build.assemble

    def interrupted(plan, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(symphony.build.assemble, "write_model", interrupted)
    cfg = write_config(tmp_path / "b.yaml", sources, calib, experts={"router_init": "zeros"})
    work = tmp_path / "work"
    work.mkdir()
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--quiet")
    assert rc == 130 and "interrupted" in err
    assert os.listdir(work) == []


def test_stage2_failure_leaves_nothing(small, tmp_path, monkeypatch):
    sources, calib = small
    import symphony.train
    from symphony.errors import SymphonyError

    def failing(*args, **kwargs):
        raise SymphonyError("stage 2 broke")

    monkeypatch.setattr(symphony.train, "train_router", failing)
    monkeypatch.setattr(pipeline, "publish", lambda *a: pytest.fail("published a failed build"))
    cfg = parse_config({"sources": [str(p) for p in sources.values()], "experts": {"router_init": "zeros"},
                        "router_training": {"steps": 2, "seq_len": 16, "text": [str(calib["prose"])]},
                        "device": "cpu"})
    with pytest.raises(SymphonyError, match="stage 2 broke"):
        build(cfg, tmp_path / "moe", progress=False)
    assert os.listdir(tmp_path) == []


def test_alignment_undoes_a_neuron_permutation(small, tmp_path):
    """A source and a neuron-permuted copy of it: after alignment the copy's experts are the source's, bit for
    bit, and the matched correlation is 1."""
    sources, calib = small
    w = weights(sources["prose"])
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        p = torch.randperm(128, generator=g)
        for n in ("gate", "up"):
            w[f"model.layers.{layer}.mlp.{n}_proj.weight"] = w[f"model.layers.{layer}.mlp.{n}_proj.weight"][p]
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        w[name] = w[name][:, p].contiguous()
    copy = tmp_path / "permuted"
    copy.mkdir()
    for f in sources["prose"].iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, copy / f.name)
    save_file(w, copy / "model.safetensors", metadata={"format": "pt"})
    cfg = {"sources": [str(sources["prose"]), str(copy)], "alignment": {"enabled": True, "seq_len": 64,
                                                                          "calibration": [str(calib["prose"])],
                                                                          "layers_per_pass": 1},
           "experts": {"router_init": "zeros"}, "router_training": {"steps": 0}, "device": "cpu"}
    build(cfg, tmp_path / "moe", progress=False)
    out = weights(tmp_path / "moe")
    for layer in range(2):
        for n in ("gate", "up", "down"):
            base = f"model.layers.{layer}.mlp.experts."
            assert torch.equal(out[f"{base}1.{n}_proj.weight"], out[f"{base}0.{n}_proj.weight"])
    aligned = json.loads((tmp_path / "moe" / "alignment_report.json").read_text())["alignment"]
    assert aligned["sources"][0]["mean_after"] > 0.999 and aligned["sources"][0]["mean_before"] < 0.5
    assert aligned["layers_per_pass"] == 1 and aligned["passes"].startswith("2 passes of <= 1 layers")


def test_layers_per_pass_auto_fits_the_budget(monkeypatch):
    """alignment.layers_per_pass: auto takes the most layers whose pass fits the budget, spread evenly; N is
    taken as given (at most the number of layers)."""
    cfg = parse_config({"sources": ["a", "b"], "experts": {"router_init": "zeros"}, "router_training": {"steps": 0},
                        "alignment": {"batch_size": 8, "seq_len": 512}})
    anchor = SimpleNamespace(num_layers=32, intermediate_size=11008)
    kw = dict(batch_tokens=4096, update_tokens=1, itemsize=4, device="cpu")
    budget = align.pass_memory(12, 11008, **kw)
    monkeypatch.setattr(pipeline, "memory_budget", lambda device: budget)
    k, note = pipeline._layers_per_pass(cfg, anchor, torch.device("cpu"))
    assert k == 11 and note.startswith("3 passes of <= 11 layers") and "auto" in note
    assert align.pass_memory(k, 11008, **kw) <= budget < align.pass_memory(13, 11008, **kw)
    monkeypatch.setattr(pipeline, "memory_budget", lambda device: 0)
    k, note = pipeline._layers_per_pass(cfg, anchor, torch.device("cpu"))
    assert k == 1 and "one layer alone exceeds the budget" in note
    cfg.alignment.layers_per_pass = 40
    assert pipeline._layers_per_pass(cfg, anchor, torch.device("cpu"))[0] == 32


def test_zero_size_shared_expert_loads_quietly(small, tmp_path):
    """torch's "Initializing zero-element tensors" warning (the disabled shared expert) is hidden in build and
    in load_model, and only that warning."""
    sources, calib = small
    cfg = write_config(tmp_path / "b.yaml", sources, calib, experts={"router_init": "zeros"},
                       router_training={"steps": 1, "seq_len": 16, "batch_size": 2})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build(cfg, tmp_path / "moe", progress=False)
        model = load_model(tmp_path / "moe", device="cpu")
        with quiet_zero_size_init():
            warnings.warn("another warning")
    assert model.config.shared_expert_intermediate_size == 0
    messages = [str(w.message) for w in seen]
    assert "another warning" in messages and not any(ZERO_SIZE_INIT_WARNING in m for m in messages), messages
    with warnings.catch_warnings(record=True) as seen:  # what transformers says without the filter
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert any(ZERO_SIZE_INIT_WARNING in str(w.message) for w in seen)


def test_demo_builds_evaluates_and_checks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "demo", "--steps", "5", "--device", "cpu")
    assert rc == 0, err
    for words in ("kernel check: OK", "load + experts check: OK", "quality check:", "all demo checks: OK"):
        assert words in out, out
    assert (tmp_path / "symphony-demo" / "moe" / "config.json").is_file()
    assert (tmp_path / "symphony-demo" / "build.yaml").is_file()
    (tmp_path / "mine").mkdir()
    rc, _, err = run_cli(capsys, "demo", "--out", "mine")
    assert rc == 1 and "not made by `symphony demo`" in err and os.listdir(tmp_path / "mine") == []
