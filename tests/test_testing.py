"""The fixture factory makes real, loadable, diverging and deterministic source checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from symphony.testing import ARCHS, DOMAIN_TOKENS, domain_text, make_family


def _state(path):
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def test_family_loads_and_generates(source_family):
    for path in source_family:
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("def parse", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4)
        assert tok.decode(ids[0]) == "def parse"


def test_family_shares_a_base_but_diverges(source_family):
    states = [_state(p) for p in source_family]
    key = "model.layers.0.mlp.up_proj.weight"
    a, b = states[0][key], states[1][key]
    rel = ((a - b).norm() / a.norm()).item()
    assert 0.01 < rel < 1.0, rel  # related (one base), yet trained apart
    # Each source is best on its own domain.
    tok = AutoTokenizer.from_pretrained(source_family[0])
    losses = torch.zeros(3, 3)
    for i, path in enumerate(source_family):
        model = AutoModelForCausalLM.from_pretrained(path)
        for j, domain in enumerate(("prose", "code", "math")):
            ids = tok("\n".join(domain_text(domain, 20, seed=99)), return_tensors="pt").input_ids[:, :256]
            with torch.no_grad():
                losses[i, j] = model(input_ids=ids, labels=ids).loss
    assert torch.equal(losses.argmin(dim=0), torch.arange(3)), losses


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_sharded_and_deterministic(tmp_path, arch):
    a = make_family(tmp_path / "a", arch=arch, domains=("prose", "code"), steps=3, base_steps=2,
                    n_lines=60, max_shard_size="40KB")
    b = make_family(tmp_path / "b", arch=arch, domains=("prose", "code"), steps=3, base_steps=2, n_lines=60)
    assert (a[0] / "model.safetensors.index.json").exists()
    sa, sb = _state(a[1]), _state(b[1])
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    model = AutoModelForCausalLM.from_pretrained(a[0])
    assert model.config.model_type == arch


def test_differing_vocabularies(tmp_path):
    paths = make_family(tmp_path, domains=("prose", "code"), vocab="differing", steps=3, base_steps=2, n_lines=60)
    toks = [AutoTokenizer.from_pretrained(p) for p in paths]
    for tok, domain in zip(toks, ("prose", "code")):
        assert all(t in tok.get_vocab() for t in DOMAIN_TOKENS[domain])
    assert "<|fim_prefix|>" not in toks[0].get_vocab()
    model = AutoModelForCausalLM.from_pretrained(paths[1])
    assert model.get_input_embeddings().weight.shape[0] == len(toks[1])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown domain"):
        domain_text("poetry", 3)
    with pytest.raises(ValueError, match="unknown arch"):
        make_family(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="vocab"):
        make_family(tmp_path, vocab="mixed")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fixture_tokenizer_tokenizes_as_trained_once_loaded(tmp_path, arch):
    """A fixture checkpoint's tokenizer, loaded the way sources are loaded, gives the ids it was trained with
    (transformers rebuilds a qwen2 folder's pre-tokenizer from Qwen2's regex: the fixture uses that one)."""
    from symphony.data import load_tokenizer
    from symphony.testing import domain_text, make_tokenizer, tiny_config

    texts = domain_text("code", 60, 0) + domain_text("math", 60, 0)
    tok = make_tokenizer(texts)
    folder = tmp_path / arch
    tiny_config(arch, len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = load_tokenizer(folder)
    for text in texts[:40] + ["x = 12345 + 67  # digits", "  indented\n\tTabs and CamelCase"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
