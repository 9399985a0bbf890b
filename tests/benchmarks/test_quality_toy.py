"""The quality study (benchmarks/quality): its parts on small inputs, and the whole toy run end to end."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import data as qdata  # noqa: E402
from benchmarks.quality import mathgen, merges, metrics  # noqa: E402


# ------------------------------------------------------------------------------------------------------- data

def test_split_is_deterministic_disjoint_and_capped():
    docs = [f"document {i} " + "word " * (i % 37 + 5) for i in range(400)]
    docs += docs[:50]  # duplicates
    kept = qdata.dedup_documents(docs)
    assert len(kept) == 400
    a = qdata.split_documents(kept, "d", seed=1, max_bytes=20_000, val_fraction=0.1, test_fraction=0.1)
    b = qdata.split_documents(list(reversed(kept)), "d", seed=1, max_bytes=20_000, val_fraction=0.1,
                              test_fraction=0.1)
    assert a == b  # independent of the input order
    sets = [set(a[s]) for s in qdata.SPLITS]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    total = sum(len(d.encode()) for s in qdata.SPLITS for d in a[s])
    assert total <= 20_000
    assert 0.05 < sum(len(d.encode()) for d in a["test"]) / total < 0.2
    c = qdata.split_documents(kept, "d", seed=2, max_bytes=20_000, val_fraction=0.1, test_fraction=0.1)
    assert c["test"] != a["test"]  # the seed matters


def test_paragraph_dedup_and_normalise():
    first = "intro\n\n" + "A" * 50 + "\n\nend one"
    docs = [first, "other\n\n" + "A" * 50 + "\n\nend two", first.replace("end one", "end   one")]
    assert qdata.dedup_documents(docs) == docs[:2]  # the third differs from the first in whitespace only
    # paragraphs of 40+ characters seen before are dropped; short ones (and the documents left) stay
    assert qdata.dedup_documents(docs, paragraphs=True) == [first, "other\n\nend two", "intro\n\nend   one"]
    assert qdata.normalise("a\t b  \r\n\n\n\nc\n") == "a    b\n\nc"
    with pytest.raises(ValueError):
        qdata.split_documents(["x"] * 3, "d", seed=0, max_bytes=10, val_fraction=0.6, test_fraction=0.5)


def test_mathgen_answers_are_exact_and_distinct():
    docs = mathgen.problems(3000, seed=3)
    assert docs == mathgen.problems(3000, seed=3) and len(set(docs)) == 3000
    checked = 0
    for doc in docs:
        prompt, answer = mathgen.split_problem(doc)
        assert prompt.endswith("Answer:") and re.fullmatch(r"-?\d+", answer)
        m = re.fullmatch(r"Problem: What is (\d+) ([-+*/]) (\d+)\?\nAnswer:", prompt)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert int(answer) == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            checked += 1
        m = re.fullmatch(r"Problem: Solve for (\w): (\d+)\w ([-+]) (\d+) = (-?\d+)\.\nAnswer:", prompt)
        if m:
            a, sign, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            assert a * int(answer) + (b if sign == "+" else -b) == c
            checked += 1
    assert checked > 200
    with pytest.raises(ValueError):
        mathgen.split_problem("no answer here")


@pytest.mark.skipif(shutil.which("bible") is None or not Path("/usr/share/dictd/foldoc.index").is_file(),
                    reason="needs the Debian packages bible-kjv and dict-foldoc")
def test_debian_sources_extract():
    chapters = qdata.kjv_chapters()
    assert len(chapters) == 1189
    assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert chapters[-1].startswith("Revelation 22\n")
    entries = qdata.dictd_entries("foldoc")
    assert len(entries) > 10_000 and not any(e.startswith("00-database") for e in entries[:50])
    assert qdata._b64("B") == 1 and qdata._b64("BA") == 64


# ----------------------------------------------------------------------------------------------------- merges

def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)}
    return base, [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


def test_merges():
    base, states = _states()
    lin = merges.linear(states)
    ta = merges.task_arithmetic(base, states, 1 / 3)
    assert all(torch.allclose(lin[k], ta[k]) for k in base)  # task arithmetic at 1/N is the average
    full = merges.ties(base, states[:1], 1.0, density=1.0)  # one source, nothing trimmed: the source itself
    assert all(torch.allclose(full[k], states[0][k].double()) for k in base)
    # TIES by hand: the sign of the sum elects (0.2 + 0.4 - 0.9 < 0, so -0.9 alone; 0.2 + 0.4 - 0.5 > 0, so
    # the mean of 0.2 and 0.4), then the scale
    b = {"w": torch.zeros(2)}
    s = [{"w": torch.tensor([x, y])} for x, y in ((0.2, 0.2), (0.4, 0.4), (-0.9, -0.5))]
    assert torch.allclose(merges.ties(b, s, 2.0, density=1.0)["w"], torch.tensor([-1.8, 0.6], dtype=torch.float64))
    trimmed = merges.ties(base, states, 1.0, density=0.2)
    nonzero = sum(int((trimmed[k] - base[k].double()).ne(0).sum()) for k in base)
    assert 0 < nonzero <= sum(v.numel() for v in base.values())
    with pytest.raises(ValueError):
        merges.linear([base, {"w": base["w"]}])


def test_permute_to_anchor_keeps_the_function(tmp_path):
    from transformers import AutoModelForCausalLM

    from symphony.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", 50)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perms = torch.stack([torch.randperm(128) for _ in range(2)])
    permuted = merges.permute_to_anchor(state, perms)
    assert not torch.equal(permuted["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"])
    ids = torch.randint(0, 50, (2, 9))
    before = model(input_ids=ids).logits
    model.load_state_dict(permuted)
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- metrics

class _LookupLM(torch.nn.Module):
    """A causal LM that continues a known prompt with a fixed answer and end-of-text, and says 'x' otherwise."""

    def __init__(self, continuations: dict, vocab: int, wrong: int):
        super().__init__()
        self.continuations, self.vocab, self.wrong = continuations, vocab, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {})()

    def next_token(self, prefix: tuple) -> int:
        for prompt, cont in self.continuations.items():
            n = len(prompt)
            if prefix[:n] == prompt and len(prefix) - n < len(cont) and prefix[n:] == cont[:len(prefix) - n]:
                return cont[len(prefix) - n]
        return self.wrong

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                logits[r, t, self.next_token(tuple(row[:t + 1]))] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_is_greedy_decoding():
    from symphony.testing import make_tokenizer

    docs = mathgen.problems(12, seed=5)
    tok = make_tokenizer(docs + ["x"], vocab_size=300)
    eos = tok.eos_token_id
    known = {}
    for i, doc in enumerate(docs):
        prompt, answer = mathgen.split_problem(doc)
        p = tuple(tok(prompt, add_special_tokens=False)["input_ids"])
        full = tuple(tok(prompt + " " + answer, add_special_tokens=False)["input_ids"])
        cont = full[len(p):] + (eos,)
        if i % 3 == 1:  # right digits, but no end-of-text: greedy decoding goes on, so not an exact match
            cont = full[len(p):] + (full[-1],)
        if i % 3 != 2:
            known[p] = cont
    model = _LookupLM(known, len(tok), tok.convert_tokens_to_ids("x"))

    def greedy(prompt_ids):
        seq = list(prompt_ids)
        for _ in range(12):
            nxt = model.next_token(tuple(seq))
            if nxt == eos:
                return seq[len(prompt_ids):]
            seq.append(nxt)
        return None

    expected = 0
    for doc in docs:
        prompt, answer = mathgen.split_problem(doc)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        out = greedy(p)
        expected += out is not None and tok.decode(out).strip() == answer
    got = metrics.exact_match(model, tok, docs, batch_size=5)
    assert got["total"] == 12 and got["correct"] == expected == 4


# ------------------------------------------------------------------------------------------------ end to end

def test_toy_study_end_to_end(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/quality/run.py"), "--toy", "--out", str(out),
                           "--export", str(export)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| `symphony` |" in md and "## Goals" in md
    assert {p.name for p in export.iterdir()} >= {"results.json", "results.md", "results.png", "family-family.json"}

    train, ood = results["data"]["train"], results["data"]["ood"]
    assert train == ["prose", "code", "math"] and ood == ["legal"]
    c = results["contenders"]
    for name, entry in c.items():
        s = entry["summary"]
        assert all(math.isfinite(v) and 0 < v < 10 for v in s["loss"].values()), name
        assert 0 <= s["math_em"] <= 1
    # each specialist beats the base on its own domain, and is the best single model there
    for d in train:
        assert c[f"spec-{d}"]["summary"]["loss"][d] < c["base"]["summary"]["loss"][d]
    # seeds: the trained contenders ran twice, and the spread is reported
    sym = c["symphony"]
    assert sym["summary"]["seeds"] == 2 and sym["summary"]["in_domain_std"] is not None
    assert [r["seed"] for r in sym["runs"]] == [0, 1] and all(r["stage2"]["steps"] == 6 for r in sym["runs"])
    # routing: every expert's load per layer sums to 1; per-source shares name the training domains
    routing = sym["runs"][0]["routing"]
    assert set(routing) == set(train + ood)
    for r in routing.values():
        assert all(abs(sum(layer) - 1) < 1e-6 for layer in r["load"])
        assert set(r["source_share"]) == set(train)
    assert c["split2"]["build"]["expert_sources"] == [d for d in train for _ in range(2)]
    assert c["shared"]["summary"]["params"]["total"] > sym["summary"]["params"]["total"]
    assert c["mergekit-moe"]["train"] is None and c["mergekit-moe"]["summary"]["seeds"] == 1
    assert c["merge-ties"]["merge"]["scale"] in (0.5, 1.0)
    drift = results["family"]["drift"]
    assert set(drift["neurons"]) == {"code", "math"}
    assert all(0 <= n["mean_moved"] <= 1 and n["mean_after"] >= n["mean_before"] - 1e-6
               for n in drift["neurons"].values())
    assert set(results["verdicts"]) == {"goal1", "goal2", "goal3"}
    assert not (out / "work").exists()  # built models are removed after evaluation
