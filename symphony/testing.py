"""Small real source checkpoints, made on the fly: the fixture factory for tests, demos and examples.

`make_family` writes N transformers causal LMs of one architecture (Qwen2, Qwen3, Llama or Mistral) that
share one random initialisation; each is then trained a few steps on its own kind of synthetic text, so
they drift apart like fine-tuned relatives of one base. Everything is offline and deterministic by seed,
and takes seconds on a CPU.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

DOMAINS = ("prose", "code", "math", "legal")

# Tokens that a source adds to the shared base vocabulary with vocab="differing"
# (as code models add fill-in-the-middle tokens to their base model's vocabulary).
DOMAIN_TOKENS = {
    "prose": ["<|quote|>"],
    "code": ["<|fim_prefix|>", "<|fim_suffix|>"],
    "math": ["<|calc|>"],
    "legal": ["<|clause|>"],
}

_WORDS = {
    "noun": "river king garden stone night city letter child forest window song road mother ship".split(),
    "verb": "carried watched found opened followed remembered built crossed answered lost".split(),
    "adj": "old quiet bright small golden cold distant gentle broken ancient".split(),
    "fn": "parse load merge split count render encode update reset scale".split(),
    "var": "x y items data node key value total index buf".split(),
    "party": "the Licensee the Licensor the Contributor any person the recipient".split(" "),
    "act": "distribute modify sublicense copy use reproduce".split(),
}


def _prose(rng):
    w = lambda k: rng.choice(_WORDS[k])  # noqa: E731
    return f"The {w('adj')} {w('noun')} {w('verb')} the {w('noun')} near the {w('adj')} {w('noun')}."


def _code(rng):
    w = lambda k: rng.choice(_WORDS[k])  # noqa: E731
    a, b = w("var"), w("var")
    op = rng.choice("+-*")
    return f"def {w('fn')}_{rng.randint(0, 99)}({a}, {b}):\n    return {a} {op} {b} * {rng.randint(1, 9)}"


def _math(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {value}"


def _legal(rng):
    party = rng.choice(["the Licensee", "the Licensor", "the Contributor", "any person"])
    return (f"Subject to section {rng.randint(1, 12)}, {party} may {rng.choice(_WORDS['act'])} the Work "
            f"provided that {rng.choice(['notice', 'attribution', 'this license'])} is retained.")


_GENERATORS = {"prose": _prose, "code": _code, "math": _math, "legal": _legal}


def domain_text(domain: str, n_lines: int, seed: int = 0) -> list[str]:
    """`n_lines` lines of synthetic text of one domain ("prose", "code", "math" or "legal")."""
    if domain not in _GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    rng = random.Random(f"{domain}:{seed}")
    return [_GENERATORS[domain](rng) for _ in range(n_lines)]


def qwen2_pretokenization():
    """(pre_tokenizer, normalizer) of transformers' Qwen2Tokenizer: NFC, Qwen2's split regex (every digit its own
    pre-token), then bytes. transformers 5 loads the tokenizer of a qwen2 / qwen2_moe checkpoint folder as
    Qwen2Tokenizer, which rebuilds the pre-tokenizer from that regex whatever tokenizer.json says; a tokenizer
    trained with these tokenizes the same in memory and once saved and loaded, in any architecture's folder."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            normalizers.NFC())


def make_tokenizer(texts: list[str], vocab_size: int = 320):
    """A byte-level BPE fast tokenizer trained offline on `texts` (deterministic for the same texts), with
    Qwen2's pre-tokenization (`qwen2_pretokenization`), so that a fixture checkpoint tokenizes as it was trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.normalizer = qwen2_pretokenization()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|pad|>")


ARCHS = ("qwen2", "qwen3", "llama", "mistral")


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A tiny config of one dense family: hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads."""
    import transformers

    classes = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig", "mistral": "MistralConfig"}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6, bos_token_id=0,
                  eos_token_id=0, pad_token_id=1)
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return getattr(transformers, classes[arch])(**kwargs)


def _batches(ids: torch.Tensor, seq_len: int, batch_size: int, steps: int, gen: torch.Generator):
    n = ids.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"training text too short: {ids.numel()} tokens for seq_len {seq_len}")
    for _ in range(steps):
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def train_steps(model, tokenizer, texts: list[str], *, steps: int, seed: int, lr: float = 3e-3,
                seq_len: int = 64, batch_size: int = 8) -> list[float]:
    """Train `model` on `texts` for `steps` AdamW steps (CPU-sized); returns the losses."""
    ids = torch.tensor(tokenizer("\n".join(texts))["input_ids"], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in _batches(ids, seq_len, batch_size, steps, gen):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def make_family(root, arch: str = "qwen2", domains=("prose", "code", "math"), seed: int = 0, steps: int = 30,
                vocab: str = "shared", max_shard_size=None, base_steps: int = 20, n_lines: int = 400,
                **config_overrides) -> list[Path]:
    """Write one source checkpoint per domain under `root` and return their folders.

    All sources start from one base: a shared random init trained `base_steps` steps on the mix of the
    domains. Each source is then trained `steps` more steps on its own domain. With vocab="differing",
    each source adds its domain's tokens (DOMAIN_TOKENS) to the shared base vocabulary, as fine-tuned
    relatives do. `max_shard_size` (e.g. "50KB") writes sharded safetensors with an index.
    """
    from transformers import AutoModelForCausalLM

    if vocab not in ("shared", "differing"):
        raise ValueError(f"vocab must be 'shared' or 'differing', not {vocab!r}")
    if len(domains) < 1:
        raise ValueError("make_family needs at least one domain")
    root = Path(root)
    texts = {d: domain_text(d, n_lines, seed) for d in domains}
    mix = [line for d in domains for line in texts[d]]
    base_tok = make_tokenizer(mix)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, len(base_tok), **config_overrides))
    if base_steps:
        train_steps(base, base_tok, random.Random(seed).sample(mix, len(mix)), steps=base_steps, seed=seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    paths = []
    for i, domain in enumerate(domains):
        tok = make_tokenizer(mix)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(base.config))
        model.load_state_dict(base_state)
        lines = texts[domain]
        if vocab == "differing":
            extra = DOMAIN_TOKENS[domain]
            tok.add_tokens(extra)
            torch.manual_seed(seed + 1000 + i)
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            rng = random.Random(seed + i)
            lines = [f"{rng.choice(extra)} {line}" if rng.random() < 0.5 else line for line in lines]
        train_steps(model, tok, lines, steps=steps, seed=seed + 1 + i, lr=1e-3)
        out = root / f"{arch}-{domain}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kwargs)
        tok.save_pretrained(out)
        paths.append(out)
    return paths
