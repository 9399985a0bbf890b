"""The study's model family: one tokenizer, a base Qwen2 causal LM pre-trained on the mix of the training
domains, and one specialist per training domain, continued-pretrained from the base on that domain alone.

    make_family(data_dir, out_dir, FamilyConfig.preset("gpu")) -> family.json + base/ + <domain>/ checkpoints

Recipe (everything seeded; the same code at toy size on a CPU):
- tokenizer: byte-level BPE (`tokenizers`) with Qwen2's pre-tokenization (digits one per token), trained on up
  to `tokenizer_bytes` of each training domain's train split, saved to `tokenizer/` and used as loaded from there
  (what every evaluation and stage 2 use; `saved_tokenizer` checks that it tokenizes as trained);
- base: random init (seed), AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine
  decay to 10% of the peak, `base_tokens` tokens of windows drawn in equal numbers from every training domain;
- specialists: each starts from the base exactly as saved (bf16-rounded weights) and trains `specialist_tokens`
  tokens on its own domain with a fresh AdamW and its own schedule;
- on CUDA: bf16 autocast, fused AdamW, optional torch.compile (one compiled module reused for every model).
Checkpoints are ordinary transformers folders (safetensors in `save_dtype`, with the tokenizer).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from benchmarks.quality import data as qdata


def from_preset(cls, what: str, name: str, overrides: dict):
    """An instance of the settings dataclass `cls` from its PRESETS[name] with `overrides` (known fields only)."""
    if name not in cls.PRESETS:
        raise ValueError(f"unknown {what} preset {name!r}; choose from {', '.join(cls.PRESETS)}")
    known = [f.name for f in fields(cls)]
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ValueError(f"unknown {what} setting {unknown[0]!r}; known: {', '.join(known)}")
    return cls(**{**cls.PRESETS[name], **overrides})

SPECIALS = ["<|endoftext|>", "<|pad|>"]
# 2: the tokenizer is trained with Qwen2's pre-tokenization and used as loaded from a checkpoint folder (1, the
# issue-6 family, trained on another tokenization than the one every evaluation used); read_family refuses others
FAMILY_FORMAT = 2


@dataclass
class FamilyConfig:
    """Sizes and budgets of the family (see the module docstring). Token budgets count input tokens."""

    vocab_size: int = 8192
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1536
    seq_len: int = 512
    batch_size: int = 64
    base_tokens: int = 24_000_000
    specialist_tokens: int = 6_000_000
    base_lr: float = 2e-3
    specialist_lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    tokenizer_bytes: int = 2_000_000  # per training domain
    eval_bytes: int = 200_000         # validation text per domain for the family report
    log_every: int = 25
    seed: int = 0
    compile: bool = False
    save_dtype: str = "bfloat16"

    PRESETS = {
        # ~34M parameters; sized for about 2 minutes of an H100 (see README.md in this folder)
        "gpu": {},
        # ~0.2M parameters, seconds on a CPU
        "toy": dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=192, seq_len=64, batch_size=16, base_tokens=16 * 64 * 100,
                    specialist_tokens=16 * 64 * 50, base_lr=5e-3, specialist_lr=3e-3, warmup=0.1,
                    weight_decay=0.0, tokenizer_bytes=200_000, eval_bytes=20_000, log_every=50),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "FamilyConfig":
        return from_preset(cls, "family", name, overrides)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                               or not math.isfinite(value) or value < 0):
                raise ValueError(f"family.{f.name} must be a non-negative number, not {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"family.{f.name} must be an integer, not {value!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "batch_size", "base_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"family.{name} must be at least 1")
        if self.seq_len < 2:
            raise ValueError("family.seq_len must be at least 2")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("family.hidden_size must be a multiple of num_heads, and num_heads of num_kv_heads")
        if self.vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"family.vocab_size must be at least {256 + len(SPECIALS)} (the byte alphabet)")
        if self.save_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"family.save_dtype must be bfloat16, float16 or float32, not {self.save_dtype!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -------------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE fast tokenizer, deterministic for the same texts, with the pre-tokenization of
    transformers' Qwen2Tokenizer (NFC, Qwen2's split regex, which makes every digit its own pre-token, then bytes).

    Why Qwen2's: transformers 5's AutoTokenizer loads the tokenizer of a qwen2 / qwen2_moe checkpoint folder as
    Qwen2Tokenizer, which rebuilds the pre-tokenizer from its own regex whatever tokenizer.json says. A tokenizer
    trained with another pre-tokenizer therefore tokenizes differently once saved and loaded: the issue-6 family
    (digits + GPT-2 byte level) was trained on one tokenization and evaluated on another, with 10% more tokens for
    code (RESULTS.md, "Why full post-training lowered the code loss so much"). `saved_tokenizer` checks it."""
    from symphony.testing import qwen2_pretokenization

    return bpe_tokenizer(texts, vocab_size, *qwen2_pretokenization())


def bpe_tokenizer(texts: list[str], vocab_size: int, pre_tokenizer, normalizer=None):
    """A byte-level BPE fast tokenizer with the study's special tokens, trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1])


def saved_tokenizer(tokenizer, model_cfg, folder, probes: list[str]):
    """Save `tokenizer` with `model_cfg` into `folder` (a checkpoint folder without weights), load it back the way
    the study and stage 2 load every checkpoint's tokenizer (symphony.data.load_tokenizer) and return the loaded
    one. ValueError if the loaded tokenizer tokenizes one of the `probes` differently: then the models would be
    trained on one tokenization and evaluated on another."""
    from symphony.data import load_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_tokenizer(folder)
    for i, text in enumerate(probes):
        a = tokenizer(text, add_special_tokens=False)["input_ids"]
        b = loaded(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise ValueError(f"the tokenizer loaded from {folder} ({type(loaded).__name__}) tokenizes probe {i} "
                             f"differently from the trained one ({len(b)} vs {len(a)} tokens)")
    return loaded


def model_config(cfg: FamilyConfig, vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=max(512, cfg.seq_len),
                       tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1, use_sliding_window=False)


# --------------------------------------------------------------------------------------------------- training

def lr_at(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warmup over `warmup` of the steps, then cosine decay to peak / 10."""
    warm = max(1, math.ceil(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class WindowSampler:
    """Random windows of `seq_len` tokens from several token streams, window i of a batch from stream
    i mod len(streams) (equal shares per stream). Starts come from a seeded CPU generator, so the batches are
    the same on every device."""

    def __init__(self, streams: list[torch.Tensor], seq_len: int, seed: int, device):
        for s in streams:
            if s.numel() <= seq_len:
                raise ValueError(f"a training stream has {s.numel()} tokens, not more than seq_len={seq_len}")
        self.streams = [s.to(device) for s in streams]
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(seq_len, device=device)

    def batch(self, batch_size: int) -> torch.Tensor:
        rows = []
        for i, s in enumerate(self.streams):
            n = len(range(i, batch_size, len(self.streams)))
            if n:
                starts = torch.randint(0, s.numel() - self.seq_len, (n,), generator=self.gen).to(s.device)
                rows.append(s[starts[:, None] + self.offsets])
        return torch.cat(rows)


def _param_groups(model, weight_decay: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_lm(model, forward, sampler: WindowSampler, *, tokens: int, lr: float, cfg: FamilyConfig, device,
             label: str, progress: bool = True) -> dict:
    """Train `model` (through `forward`, the same module or its compiled version) for tokens // (batch * seq)
    AdamW steps. Returns {"steps", "tokens", "seconds", "tokens_per_s", "losses": [[step, loss], ...]}."""
    steps = max(1, tokens // (cfg.batch_size * cfg.seq_len))
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            **({"fused": True} if cuda else {}))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    model.train()
    losses, running = [], []
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup)
        batch = sampler.batch(cfg.batch_size)
        with autocast:
            loss = forward(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running.append(loss.detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            value = torch.stack(running).float().mean().item()
            running = []
            losses.append([step + 1, value])
            if progress:
                rate = (step + 1) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)
                print(f"  {label}: step {step + 1}/{steps} loss {value:.4f} ({rate / 1e3:.0f}k tok/s)", flush=True)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    done = steps * cfg.batch_size * cfg.seq_len
    return {"steps": steps, "tokens": done, "seconds": seconds, "tokens_per_s": done / seconds, "losses": losses}


def _round_to(model, dtype: torch.dtype):
    """Round every parameter to `dtype` and back, in place (so the saved checkpoint is what training continues)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def _save(model, tokenizer, out: Path, dtype: torch.dtype):
    clone = copy.deepcopy(model).to("cpu", dtype)
    clone.config.dtype = dtype
    clone.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del clone


@torch.no_grad()
def validation_loss(model, tokenizer, docs_by_domain: dict[str, list[str]], cfg: FamilyConfig, device) -> dict:
    """Mean next-token NLL per domain on its validation documents (symphony.evaluate.perplexity)."""
    from symphony.evaluate import perplexity

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return {d: perplexity(model, tokenizer, docs, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                              progress=False)["nll"] for d, docs in docs_by_domain.items()}


def tokenize_domains(data_dir, domains: list[str], cfg: FamilyConfig, out_dir: Path, progress: bool = True):
    """(tokenizer, {domain: train split as one token stream}, {domain: validation documents}): the tokenizer is
    trained on up to `tokenizer_bytes` of each domain's train split, saved to `out_dir`/tokenizer and used as
    loaded from there (saved_tokenizer)."""
    from symphony.data import token_stream

    t0 = time.perf_counter()
    train_docs = {d: qdata.load_split(data_dir, d, "train") for d in domains}
    val_docs = {d: qdata.load_split(data_dir, d, "val", max_bytes=cfg.eval_bytes) for d in domains}
    sample = [doc for d in domains for doc in qdata.load_split(data_dir, d, "train", max_bytes=cfg.tokenizer_bytes)]
    tokenizer = saved_tokenizer(train_tokenizer(sample, cfg.vocab_size), model_config(cfg, cfg.vocab_size),
                                out_dir / "tokenizer", sample[::10])
    streams = {d: token_stream(tokenizer, docs) for d, docs in train_docs.items()}
    if progress:
        print(f"tokenizer: {len(tokenizer)} tokens; train tokens "
              + ", ".join(f"{d} {s.numel() / 1e6:.2f}M" for d, s in streams.items())
              + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    return tokenizer, streams, val_docs


def print_summary(summary: dict, out_dir):
    print(f"family written to {out_dir} in {summary['seconds']:.1f} s", flush=True)
    for name, m in summary["models"].items():
        print(f"  {name:>8}: {m['tokens'] / 1e6:.1f}M tokens, {m['tokens_per_s'] / 1e3:.0f}k tok/s, val loss "
              + ", ".join(f"{d} {v:.3f}" for d, v in m["val_loss"].items()), flush=True)


def make_family(data_dir, out_dir, cfg: FamilyConfig, *, device="auto", progress: bool = True) -> dict:
    """Train the tokenizer, the base and one specialist per training domain of the data in `data_dir`; write
    them to `out_dir`/{base,<domain>} and the summary to `out_dir`/family.json; return the summary."""
    from transformers import AutoModelForCausalLM

    from symphony.data import resolve_device

    if not isinstance(cfg, FamilyConfig):
        raise TypeError(f"cfg must be a FamilyConfig, not {type(cfg).__name__}")
    manifest = qdata.read_manifest(data_dir)
    domains = qdata.domains_with_role(manifest, "train")
    if len(domains) < 2:
        raise qdata.DataError(f"{data_dir} has {len(domains)} training domains; the family needs at least 2")
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = getattr(torch, cfg.save_dtype)
    t0 = time.perf_counter()

    tokenizer, streams, val_docs = tokenize_domains(data_dir, domains, cfg, out_dir, progress)
    prep_s = time.perf_counter() - t0

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg, len(tokenizer)), attn_implementation="sdpa")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if cfg.compile else model
    if progress:
        print(f"model: Qwen2, {n_params / 1e6:.1f}M parameters, on {device}", flush=True)

    summary = {"format": FAMILY_FORMAT, "config": cfg.to_dict(), "device": str(device), "params": n_params,
               "vocab": len(tokenizer), "domains": domains, "data": data_fingerprint(manifest),
               "train_tokens": {d: s.numel() for d, s in streams.items()}, "prep_seconds": prep_s, "models": {}}
    sampler = WindowSampler(list(streams.values()), cfg.seq_len, cfg.seed, device)
    log = train_lm(model, forward, sampler, tokens=cfg.base_tokens, lr=cfg.base_lr, cfg=cfg, device=device,
                   label="base", progress=progress)
    _round_to(model, save_dtype)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _save(model, tokenizer, out_dir / "base", save_dtype)
    log["val_loss"] = validation_loss(model, tokenizer, val_docs, cfg, device)
    summary["models"]["base"] = log

    for i, domain in enumerate(domains):
        model.load_state_dict(base_state)
        sampler = WindowSampler([streams[domain]], cfg.seq_len, cfg.seed + 1 + i, device)
        log = train_lm(model, forward, sampler, tokens=cfg.specialist_tokens, lr=cfg.specialist_lr, cfg=cfg,
                       device=device, label=domain, progress=progress)
        _round_to(model, save_dtype)
        _save(model, tokenizer, out_dir / domain, save_dtype)
        log["val_loss"] = validation_loss(model, tokenizer, val_docs, cfg, device)
        summary["models"][domain] = log
    summary["seconds"] = time.perf_counter() - t0
    if progress:
        print_summary(summary, out_dir)
    (out_dir / "family.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def data_fingerprint(manifest: dict) -> dict[str, str]:
    """sha256 of every training domain's train and validation split: what the family was made from."""
    return {f"{d}/{s}": v["splits"][s]["sha256"] for d, v in manifest["domains"].items() if v["role"] == "train"
            for s in ("train", "val")}


def read_family(out_dir) -> dict | None:
    """family.json of a finished family in `out_dir`, or None when there is none (or it is incomplete)."""
    path = Path(out_dir) / "family.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("format") != FAMILY_FORMAT:
        return None
    for name in summary.get("models", {}):
        if not (Path(out_dir) / name / "config.json").is_file():
            return None
    return summary
