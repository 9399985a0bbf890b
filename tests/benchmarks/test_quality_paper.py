"""The paper-protocol study (benchmarks/quality/paper*.py): its parts on small inputs, and the whole chain
(data, family, every contender, report) at the micro size end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import cka, papercontenders as pc  # noqa: E402


# --------------------------------------------------------------------------------------------------------- CKA

def test_linear_cka_is_blind_to_permutations_and_neuron_pairing_is_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g)
    y = x @ torch.randn(12, 12, generator=g) + 0.5 * torch.randn(200, 12, generator=g)
    perm = torch.randperm(12, generator=g)
    assert cka.linear_cka(x, x) == pytest.approx(1.0)
    assert cka.linear_cka(x, 3 * x + 1) == pytest.approx(1.0)  # isotropic scaling and shifts
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = cka.linear_cka(x, y)
    assert 0 < base < 1
    assert cka.linear_cka(x[:, perm], y) == pytest.approx(base, abs=1e-12)
    assert cka.linear_cka(x.double() @ q, y) == pytest.approx(base, abs=1e-12)
    # same-index neuron correlation does depend on the order: 1 in place, lower once shuffled
    assert cka.neuron_corr(x, x) == pytest.approx(1.0)
    assert cka.neuron_corr(x, x[:, perm]) < 0.5
    with pytest.raises(ValueError):
        cka.linear_cka(x, y[:10])


# ------------------------------------------------------------------------------------------ contenders' parts

def _moe_state(layers=2, experts=3, f=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(30, d, generator=g)}
    for layer in range(layers):
        for e in range(experts):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            state[p + "gate_proj.weight"] = torch.randn(f, d, generator=g) + 2.0
            state[p + "up_proj.weight"] = torch.randn(f, d, generator=g)
            state[p + "down_proj.weight"] = 0.1 * torch.randn(d, f, generator=g)
    return state


def test_drop_reinit_redraws_half_of_each_experts_neurons():
    state = _moe_state()
    out = pc.drop_reinit(state, num_layers=2, num_experts=3, ratio=0.5, seed=1)
    assert out["model.embed_tokens.weight"] is state["model.embed_tokens.weight"]
    for layer in range(2):
        for e in range(3):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            rows = (out[p + "gate_proj.weight"] != state[p + "gate_proj.weight"]).all(1)
            assert rows.sum() == 20  # exactly half of the 40 neurons, all of their weights redrawn
            assert torch.equal(rows, (out[p + "up_proj.weight"] != state[p + "up_proj.weight"]).all(1))
            assert torch.equal(rows, (out[p + "down_proj.weight"] != state[p + "down_proj.weight"]).all(0))
            new = out[p + "gate_proj.weight"][rows]
            old = state[p + "gate_proj.weight"][rows]
            assert abs(new.mean() - old.mean()) < 0.3 and abs(new.std() - old.std()) < 0.3  # the replaced stats
    again = pc.drop_reinit(state, num_layers=2, num_experts=3, ratio=0.5, seed=2)
    assert not torch.equal(again["model.layers.0.mlp.experts.0.up_proj.weight"],
                           out["model.layers.0.mlp.experts.0.up_proj.weight"])
    same = pc.drop_reinit(state, num_layers=2, num_experts=3, ratio=0.0, seed=1)
    assert all(torch.equal(same[k], state[k]) for k in state)


def test_plain_embeddings_average_rows_index_by_index():
    a, b = {"model.embed_tokens.weight": torch.ones(4, 2)}, {"model.embed_tokens.weight": 3 * torch.ones(4, 2)}
    out = pc.plain_embeddings({"model.embed_tokens.weight": torch.zeros(4, 2)}, [a, b])
    assert torch.equal(out["model.embed_tokens.weight"], 2 * torch.ones(4, 2))
    with pytest.raises(ValueError, match="vocabularies"):
        pc.plain_embeddings(a, [a, {"model.embed_tokens.weight": torch.ones(5, 2)}])


def test_contender_configs_parse_with_the_paper_preset(tmp_path):
    from symphony.build.config import parse_config

    roles = {"general": "prose", "math": "math", "code": "code", "fourth": "notes"}
    files = {d: tmp_path / f"{d}.txt" for d in roles.values()}
    parsed = {}
    for c in pc.contenders(roles):
        if c.kind == "moe":
            parsed[c.name] = parse_config(pc.moe_config(c, family_dir=tmp_path, roles=roles, calib_files=files,
                                                        align_tokens=64, seq_len=8, batch_size=2, device="cpu",
                                                        seed=3))
    sym = parsed["symphony"]
    assert sym.preset == "paper" and sym.alignment.enabled is True and sym.experts.router_init == "random"
    assert sym.router_training.lr == 5e-5 and sym.router_training.train == "full" and sym.seed == 3
    assert parsed["btx"].fusion.attention == "linear" and parsed["btx"].alignment.enabled is False
    assert parsed["no-align"].alignment.enabled is False and parsed["no-align"].fusion.attention == "slerp"
    assert parsed["calib-general"].calibration_files() == [files["prose"]]
    assert parsed["router-only"].router_training.train == "router" and parsed["router-only"].alignment.enabled
    assert sym.calibration_files() == list(files.values())
    with pytest.raises(ValueError, match="unknown contender"):
        pc.by_name(roles, "moe-of-everything")


def test_bam_of_identical_sources_is_that_source():
    from transformers import AutoModelForCausalLM

    from benchmarks.quality.bam import BamModel
    from symphony.testing import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("qwen2", 50)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    state = dense.state_dict()
    ids = torch.randint(0, 50, (2, 9))
    bam = BamModel.from_sources(cfg, [state] * 3, top_k=2, seed=0)
    assert torch.allclose(bam(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    out = BamModel.from_sources(cfg, [state, other, state], top_k=2, seed=0)(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == cfg.num_hidden_layers and out.router_logits[0].shape == (18, 3)


def test_posttrain_is_train_routers_recipe(tmp_path):
    """posttrain.train_model on an MoE gives train_router's losses and weights (both full, on the CPU)."""
    from benchmarks.quality.posttrain import train_model
    from symphony.build.pipeline import build
    from symphony.data import load_model, load_tokenizer, token_stream, windows
    from symphony.testing import domain_text, make_family
    from symphony.train import RouterTrainingConfig, train_router

    srcs = make_family(tmp_path / "fam", steps=2, base_steps=2, n_lines=60)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(domain_text("prose", 60) + domain_text("code", 60)))
    build({"preset": "paper", "sources": [{"path": str(s), "calibration": [str(text)]} for s in srcs],
           "alignment": {"max_tokens": 256, "seq_len": 16}, "router_training": {"steps": 0}, "device": "cpu"},
          tmp_path / "moe", progress=False)
    texts = [text.read_text()]
    cfg = RouterTrainingConfig(steps=3, lr=1e-3, batch_size=2, seq_len=16, train="full", seed=1, device="cpu",
                               schedule="constant")
    ref = train_router(tmp_path / "moe", texts, cfg, tmp_path / "trained", progress=False)
    model = load_model(tmp_path / "moe", device="cpu", dtype="float32")
    data, _ = windows(token_stream(load_tokenizer(tmp_path / "moe"), texts), 16)
    got = train_model(model, data, cfg, top_k=model.config.num_experts_per_tok)
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    trained = load_model(tmp_path / "trained", device="cpu", dtype="float32")
    ids = data[:2]
    assert torch.allclose(model(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)


def test_parts_and_missing_only_selection():
    from benchmarks.quality import paper_run

    roles = {"general": "prose", "math": "math", "code": "code", "fourth": "notes"}
    everything = pc.contenders(roles)
    names = [c.name for part in paper_run.PARTS for c in paper_run.chosen(part, everything)]
    assert sorted(names) == sorted(c.name for c in everything)  # every contender in exactly one part
    assert [c.name for c in paper_run.chosen(1, everything)][:2] == ["base_a", "base_b"]
    previous = {"symphony": {"kind": "moe", "runs": [{"seed": 0}, {"seed": 1}]},  # a seed short
                "no-align": {"kind": "moe", "runs": [{"seed": s} for s in range(3)]},
                "plain-embed": {"kind": "moe", "same_as": "symphony", "runs": []}}
    left = paper_run.chosen(0, everything, previous=previous, seeds=3)
    assert "symphony" in {c.name for c in left} and not {"no-align", "plain-embed"} & {c.name for c in left}
    with pytest.raises(ValueError, match="unknown contender"):
        paper_run.chosen(0, everything, only=["gpt"])


# ------------------------------------------------------------------------------------------------- end to end

def _run(args, env):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_paper_chain_end_to_end(tmp_path):
    """Every contender at the micro size (part 0), part 9 again on a family trained afresh in another folder
    (it must come out bit for bit the same), and the report over both."""
    from benchmarks.quality import paperdata

    data = tmp_path / "data"
    paperdata.prepare(data, toy=True, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = "benchmarks/quality/paper_run.py"
    _run([run, "--part", "0", "--preset", "micro", "--data", str(data), "--work", str(tmp_path / "w0"),
          "--out", str(tmp_path / "out"), "--quiet"], env)
    _run([run, "--part", "9", "--preset", "micro", "--data", str(data), "--work", str(tmp_path / "w9"),
          "--out", str(tmp_path / "out"), "--quiet", "--study-set", "stage2_lr=2e-3"], env)
    _run(["benchmarks/quality/paper_report.py", str(tmp_path / "out/results-part0.json"),
          str(tmp_path / "out/results-part9.json"), "--out", str(tmp_path / "report")], env)

    r0 = json.loads((tmp_path / "out/results-part0.json").read_text())
    c = r0["contenders"]
    assert set(c) == {x.name for x in pc.contenders(r0["roles"])} and not r0["failed"]
    for name, e in c.items():
        if e.get("same_as"):
            continue
        s = e["summary"]
        assert all(0 < v < 20 for v in s["loss"].values()), name
        assert s["seeds"] == (2 if e["kind"] != "checkpoint" and e["kind"] != "merge" else 1), name
    # alignment permutes whole-FFN experts: the same function, the same training (fp32 on a CPU)
    assert c["no-align"]["summary"]["loss"] == pytest.approx(c["symphony"]["summary"]["loss"], abs=1e-6)
    assert c["plain-embed"]["same_as"] == "symphony" and c["plain-embed"]["check"]["identical"]
    assert c["drop-upcycling"]["summary"]["loss"] != c["btx"]["summary"]["loss"]
    assert c["symphony"]["runs"][0]["stage2"]["tokens"] == 2 * 2 * r0["family_config"]["seq_len"]
    assert c["symphony"]["runs"][0]["stage2"]["lr"] == 5e-5  # preset: paper's, unless the study sets another
    router_only = c["router-only"]["runs"][0]["stage2"]  # the contender's `train: router` survives the recipe
    assert 0 < router_only["trainable_params"] < c["symphony"]["runs"][0]["stage2"]["trainable_params"] / 10
    r9 = json.loads((tmp_path / "out/results-part9.json").read_text())
    assert all(r["stage2"]["lr"] == 2e-3 for r in r9["contenders"]["calib-general"]["runs"])
    # the fourth source (base B) has its neurons in another order: matching moves (nearly) all of them
    moved = {d: n["mean_moved"] for d, n in r0["drift"]["neurons"].items()}
    fourth = r0["roles"]["fourth"]
    assert moved[fourth] > 0.9 and all(moved[fourth] > v for d, v in moved.items() if d != fourth)
    assert r0["drift"]["to_base_a"]["to_base"][fourth]["all"] > 3 * r0["drift"]["to_own_base"][fourth]["all"]
    # CKA of activations is the same with and without alignment; a neuron-paired measure is not
    sym, una = r0["cka"]["symphony"]["vs_anchor"], r0["cka"]["no-align"]["vs_anchor"]
    for e in sym:
        assert sym[e]["cka_intermediate"] == pytest.approx(una[e]["cka_intermediate"], abs=1e-9)
        assert sym[e]["cka_output"] == pytest.approx(una[e]["cka_output"], abs=1e-9)
    assert any(abs(sym[e]["weight_cos"] - una[e]["weight_cos"]) > 1e-3 for e in sym)

    merged = json.loads((tmp_path / "report/paper-results.json").read_text())
    assert merged["families_agree"]  # part 9 trained its own family: bit for bit the same weights
    assert merged["settings_differ"] == {"9": {"stage2_lr": 2e-3}}
    assert merged["contenders"]["calib-general"]["part"] in (0, 9)
    md = (tmp_path / "report/paper-results.md").read_text()
    assert "part 9: stage2_lr = 0.002" in md
    assert "| `symphony` beats `btx` |" in md and "## The issue's goal" in md and "no such control" in md
    assert (tmp_path / "report/paper-results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
