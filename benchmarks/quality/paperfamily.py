"""The paper-protocol family (issue 13): two independently pre-trained bases of one architecture, and four sources
with the histories of the paper's four (Qwen2.5 general and math, Qwen2.5-Coder, Qwen2 science).

    make_paper_family(data_dir, out_dir, PaperFamilyConfig.preset("gpu"))     # data: paperdata.py's layout

Models (every one a transformers Qwen2 checkpoint in `out_dir`, with the tokenizer):
- base_a: random init from `seed`, pre-trained on `base_tokens` of windows drawn in equal numbers from the four
  training domains in the order of a sampler seeded with `seed`;
- base_b: random init and data order from `seed_b`, the same mix and `base_b_tokens`: the same architecture with
  another pre-training history, so its FFN neurons are in no relation to base_a's order (the Qwen2 case);
- coder: base_a continued on code alone for `coder_tokens` (peak `base_lr` / 2): the Coder case;
- the four sources, each `specialist_tokens` on its own domain at `specialist_lr`: general = base_a + the general
  domain (the anchor), math = base_a + math, code = coder + code, and the fourth = base_b + the fourth domain.
Every run is warmup + cosine to 10% (family.lr_at), AdamW as in family.py, a fresh optimizer per model; a model
continues from its parent exactly as saved (weights rounded to `save_dtype`).

`deterministic` (default on): torch's deterministic algorithms and the math attention kernel while training, so
that a run on the same GPU, software and data gives the same family bit for bit (family.json records a hash of the
weights; paper_run.py compares it across parts). The GPU runs keep no files between them, so every part builds
the family again unless it finds it in its --family folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.quality import data as qdata
from benchmarks.quality import paperdata
from benchmarks.quality.family import (FAMILY_FORMAT, FamilyConfig, WindowSampler, _round_to, _save, data_fingerprint,
                                       from_preset, model_config, print_summary, tokenize_domains, train_lm,
                                       validation_loss)

BASES = ("base_a", "base_b", "coder")


@dataclass
class PaperFamilyConfig(FamilyConfig):
    """FamilyConfig's fields (base_tokens: base_a's budget) and the paper family's own."""

    base_b_tokens: int = 20_000_000
    coder_tokens: int = 5_000_000
    seed_b: int = 1
    deterministic: bool = True

    PRESETS = {
        # 57.2M parameters (hidden 640, 10 layers, FFN 1792, context 2048), 55M training tokens in all; about
        # 3 minutes of an H200 (README.md, "Paper-protocol study")
        "gpu": dict(hidden_size=640, num_layers=10, num_heads=10, num_kv_heads=5, intermediate_size=1792,
                    seq_len=2048, batch_size=16, base_tokens=20_000_000, base_b_tokens=20_000_000,
                    coder_tokens=5_000_000, specialist_tokens=2_500_000, base_lr=1.5e-3, specialist_lr=5e-4,
                    warmup=0.05, tokenizer_bytes=2_000_000, eval_bytes=200_000, log_every=50),
        # 1.3M parameters (hidden 128, 4 layers, FFN 384, context 256), 10M training tokens in all: the study at
        # a size two CPU cores train in about 15 minutes (where no GPU time is left)
        "cpu": dict(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                    seq_len=256, batch_size=16, base_tokens=4_000_000, base_b_tokens=4_000_000,
                    coder_tokens=1_000_000, specialist_tokens=500_000, base_lr=3e-3, specialist_lr=1e-3,
                    warmup=0.05, tokenizer_bytes=1_000_000, eval_bytes=100_000, log_every=50),
        # seconds on a CPU
        "toy": dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    seq_len=64, batch_size=8, base_tokens=8 * 64 * 60, base_b_tokens=8 * 64 * 60,
                    coder_tokens=8 * 64 * 20, specialist_tokens=8 * 64 * 20, base_lr=5e-3, specialist_lr=2e-3,
                    warmup=0.1, weight_decay=0.0, tokenizer_bytes=60_000, eval_bytes=8_000, log_every=100),
        # the smallest that exercises every path (the end-to-end test)
        "micro": dict(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=48,
                      seq_len=32, batch_size=4, base_tokens=4 * 32 * 12, base_b_tokens=4 * 32 * 12,
                      coder_tokens=4 * 32 * 4, specialist_tokens=4 * 32 * 4, base_lr=5e-3, specialist_lr=2e-3,
                      warmup=0.1, weight_decay=0.0, tokenizer_bytes=20_000, eval_bytes=3_000, log_every=100),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "PaperFamilyConfig":
        return from_preset(cls, "paper family", name, overrides)


@contextlib.contextmanager
def _deterministic(on: bool, device: torch.device):
    """Deterministic algorithms (warn-only) and, on CUDA, the math attention kernel, for the block."""
    if not on:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def weights_hash(folder) -> str:
    """A short hash of every checkpoint's weights in a family folder."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        h.update(path.parent.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def plan(roles: dict[str, str]) -> list[tuple[str, str | None, list[str], str]]:
    """The models in training order: (name, parent or None for a fresh init, domains it trains on, budget kind)."""
    return [("base_a", None, list(roles.values()), "base"), ("base_b", None, list(roles.values()), "base_b"),
            ("coder", "base_a", [roles["code"]], "coder"),
            (roles["general"], "base_a", [roles["general"]], "specialist"),
            (roles["math"], "base_a", [roles["math"]], "specialist"),
            (roles["code"], "coder", [roles["code"]], "specialist"),
            (roles["fourth"], "base_b", [roles["fourth"]], "specialist")]


def make_paper_family(data_dir, out_dir, cfg: PaperFamilyConfig, *, device="auto", progress: bool = True) -> dict:
    """Train the paper family (module docstring) into `out_dir`; write and return its summary (family.json)."""
    from transformers import AutoModelForCausalLM

    from symphony.data import resolve_device

    if not isinstance(cfg, PaperFamilyConfig):
        raise TypeError(f"cfg must be a PaperFamilyConfig, not {type(cfg).__name__}")
    manifest = qdata.read_manifest(data_dir)
    roles = paperdata.roles(manifest)
    domains = list(roles.values())
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = getattr(torch, cfg.save_dtype)
    t0 = time.perf_counter()
    tokenizer, streams, val_docs = tokenize_domains(data_dir, domains, cfg, out_dir, progress)
    mcfg = model_config(cfg, len(tokenizer))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(mcfg, attn_implementation="sdpa").to(device)
    forward = torch.compile(model) if cfg.compile else model
    summary = {"format": FAMILY_FORMAT, "kind": "paper", "config": cfg.to_dict(), "device": str(device),
               "params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer), "roles": roles,
               "anchor": roles["general"], "domains": domains, "data": data_fingerprint(manifest),
               "train_tokens": {d: s.numel() for d, s in streams.items()}, "prep_seconds": time.perf_counter() - t0,
               "models": {}, "parents": {}}
    budgets = {"base": (cfg.base_tokens, cfg.base_lr), "base_b": (cfg.base_b_tokens, cfg.base_lr),
               "coder": (cfg.coder_tokens, cfg.base_lr / 2), "specialist": (cfg.specialist_tokens, cfg.specialist_lr)}
    states = {}
    with _deterministic(cfg.deterministic, device):
        for i, (name, parent, train_on, kind) in enumerate(plan(roles)):
            if parent is None:
                torch.manual_seed(cfg.seed if name == "base_a" else cfg.seed_b)
                fresh = AutoModelForCausalLM.from_config(mcfg, attn_implementation="sdpa")
                model.load_state_dict(fresh.state_dict())
                del fresh
            else:
                model.load_state_dict(states[parent])
            seed = (cfg.seed if name == "base_a" else cfg.seed_b if name == "base_b" else cfg.seed + 10 + i)
            sampler = WindowSampler([streams[d] for d in train_on], cfg.seq_len, seed, device)
            tokens, lr = budgets[kind]
            log = train_lm(model, forward, sampler, tokens=tokens, lr=lr, cfg=cfg, device=device, label=name,
                           progress=progress)
            _round_to(model, save_dtype)
            if name in BASES:
                states[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _save(model, tokenizer, out_dir / name, save_dtype)
            log["val_loss"] = validation_loss(model, tokenizer, val_docs, cfg, device)
            summary["models"][name] = log
            summary["parents"][name] = parent
    summary["seconds"] = time.perf_counter() - t0
    summary["weights"] = weights_hash(out_dir)
    if progress:
        print_summary(summary, out_dir)
    (out_dir / "family.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_paper_family(out_dir, cfg: PaperFamilyConfig, manifest: dict) -> dict | None:
    """family.json of a finished paper family in `out_dir` made with `cfg` from the data of `manifest`, else None."""
    path = Path(out_dir) / "family.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if (summary.get("format") != FAMILY_FORMAT or summary.get("kind") != "paper" or summary.get("config") != cfg.to_dict()
            or summary.get("data") != data_fingerprint(manifest)):
        return None
    if not all((Path(out_dir) / name / "config.json").is_file() for name in summary["models"]):
        return None
    return summary
