"""Launch configurations of the experts kernels, per kernel and shape class.

A configuration is (BM, BN, BK, GROUP_M, num_warps, num_stages, split) where split is the split-K factor of
`_down_kernel` (decode and small classes, chosen from the shape so that enough programs stream the weights).
The GPU entries were chosen by the sweep in `benchmarks/tune_moe.py`
on an H100 (see benchmarks/NOTES-kernels.md); shapes not in the table get the rule-based defaults below.
Under the Triton interpreter (CPU) every kernel runs on small tiles so that the tests stay fast.

Kernels: "up" (N = f, K = d, two accumulators), "down" (N = d, K = f), "dinter" (N = f, K = d),
"dx" (the down kernel on N = d, K = 2f), "wgrad" (per-expert [M, N] outputs, K = rows of the expert).
Shape classes: "decode" (see `decode_mode`: one program row per expert, pairs taken by mask, no dispatch),
"small" (S / E <= 256 rows per expert on average) and "large".
"""
from __future__ import annotations

from typing import NamedTuple

DECODE_MAX_PAIRS = 64
SM_COUNT_DEFAULT = 132


class Config(NamedTuple):
    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split: int = 1


# (kernel, shape class, N, K) or (kernel, shape class) -> Config, from the GPU sweep; the exact key first.
# Exact keys: the benchmark shapes (d, f) = (896, 4864), (1536, 8960), (4096, 14336), (2048, 768).
TABLE: dict[tuple, Config] = {
    # sweep 1 (H100, see benchmarks/NOTES-kernels.md); "up" and the backward kernels from sweep 2
    ("down", "decode", 4096, 14336): Config(16, 64, 256, 1, 4, 3),
    ("down", "small", 4096, 14336): Config(64, 128, 64, 8, 4, 4),
    ("down", "large", 4096, 14336): Config(128, 256, 64, 8, 8, 3),
    ("down", "decode", 896, 4864): Config(16, 128, 128, 1, 4, 3),
    ("down", "small", 896, 4864): Config(64, 128, 64, 8, 4, 4),
    ("down", "large", 896, 4864): Config(128, 256, 64, 8, 8, 3),
    ("down", "decode", 1536, 8960): Config(16, 64, 128, 1, 4, 4),
    ("down", "small", 1536, 8960): Config(128, 256, 64, 8, 8, 3),
    ("down", "decode", 2048, 768): Config(16, 64, 256, 1, 4, 3),
    ("down", "small", 2048, 768): Config(128, 128, 64, 8, 8, 3),
    ("down", "large", 2048, 768): Config(128, 256, 64, 8, 8, 3),
    ("up", "decode", 14336, 4096): Config(16, 64, 128, 1, 4, 4),
    ("up", "small", 14336, 4096): Config(128, 128, 64, 8, 8, 3),
    ("up", "large", 14336, 4096): Config(128, 128, 64, 8, 8, 3),
    ("up", "decode", 4864, 896): Config(16, 32, 128, 1, 4, 4),
    ("up", "small", 4864, 896): Config(64, 64, 64, 8, 4, 4),
    ("up", "large", 4864, 896): Config(128, 128, 64, 8, 8, 3),
    ("up", "decode", 8960, 1536): Config(16, 64, 128, 1, 4, 4),
    ("up", "small", 8960, 1536): Config(128, 128, 64, 8, 8, 3),
    ("up", "decode", 768, 2048): Config(16, 32, 256, 1, 4, 4),
    ("up", "small", 768, 2048): Config(128, 128, 64, 8, 8, 3),
    ("up", "large", 768, 2048): Config(128, 128, 64, 8, 8, 3),
    ("dinter", "large"): Config(64, 128, 64, 8, 4, 4),
    ("dinter", "small"): Config(64, 128, 64, 8, 4, 4),
    ("dinter", "large", 4864, 896): Config(128, 64, 64, 8, 8, 4),
    ("dx", "large"): Config(128, 256, 64, 8, 8, 3),
    ("dx", "small"): Config(128, 128, 64, 8, 8, 3),
    ("wgrad", "large"): Config(128, 128, 64, 8, 8, 3),
    ("wgrad", "small", 768, 2048): Config(64, 128, 64, 8, 4, 4),
    ("wgrad", "small"): Config(128, 128, 64, 8, 8, 3),
    ("down", "large"): Config(128, 256, 64, 8, 8, 3),
    ("up", "large"): Config(128, 128, 64, 8, 8, 3),
}
# Experiment hook for the sweep: (kernel) -> Config applied regardless of class.
OVERRIDE: dict[str, Config] = {}


DECODE_MAX_ROWS = 512  # masked tiles: at most E * next_pow2(S) rows of MMA work in all


def decode_mode(S: int, E: int) -> bool:
    """The masked per-expert tiles (no dispatch): S <= 64 pairs, or up to 256 pairs when E * next_pow2(S)
    stays <= 512 (few experts: the MMA rows wasted on other experts' pairs cost less than a dispatch)."""
    return S <= DECODE_MAX_PAIRS or (S <= 256 and E * _pow2_at_least(S, 16) <= DECODE_MAX_ROWS)


def shape_class(S: int, E: int) -> str:
    if decode_mode(S, E):
        return "decode"
    return "small" if S <= 256 * E else "large"


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def decode_bm(S: int) -> int:
    return _pow2_at_least(S, 16)


SMEM_BYTES = 150 * 1024  # by this estimate; Triton adds buffers of its own (the sweep saw 147 KB pass, 164 KB fail)


def pick(kernel: str, S: int, E: int, N: int, K: int, interpret: bool, sm_count: int = SM_COUNT_DEFAULT,
         elsize: int = 2) -> Config:
    """The configuration of `kernel` for S pairs, E experts, an [., K] @ [K, N] product per row tile, with
    operands of `elsize` bytes (float32 tiles take twice the shared memory: fewer stages, then smaller BK)."""
    cls = shape_class(S, E)
    decode = cls == "decode"
    if interpret:
        cfg = Config(decode_bm(S) if decode else 32, 32, 32, 4, 4, 1)
    elif kernel in OVERRIDE:
        cfg = OVERRIDE[kernel]
    elif (kernel, cls, N, K) in TABLE:
        cfg = TABLE[(kernel, cls, N, K)]
    elif (kernel, cls) in TABLE:
        cfg = TABLE[(kernel, cls)]
    else:
        cfg = _default(kernel, cls, S)
    if decode and kernel != "wgrad":
        cfg = cfg._replace(BM=decode_bm(S))
    if not interpret:
        cfg = _fit_smem(kernel, cfg, elsize)
    split = 1
    if kernel in ("down", "dx") and cls != "large" and not interpret:
        split = _split_k(S, E, N, K, cfg, sm_count, decode)
    return cfg._replace(split=split)


def _fit_smem(kernel: str, cfg: Config, elsize: int) -> Config:
    """Fewer pipeline stages, then a smaller BK, until the operand ring fits in shared memory."""
    ncols = 2 * cfg.BN if kernel == "up" else cfg.BN
    while True:
        per_stage = (cfg.BM * cfg.BK + cfg.BK * ncols) * elsize
        if per_stage * cfg.num_stages <= SMEM_BYTES or (cfg.num_stages <= 2 and cfg.BK <= 16):
            return cfg
        if cfg.num_stages > 2:
            cfg = cfg._replace(num_stages=max(2, min(cfg.num_stages - 1, SMEM_BYTES // per_stage)))
        else:
            cfg = cfg._replace(BK=cfg.BK // 2)


def _default(kernel: str, cls: str, S: int) -> Config:
    if cls == "decode":
        if kernel == "wgrad":
            return Config(64, 64, 32, 8, 4, 3)
        return Config(16, 64, 128, 1, 4, 4)
    bm = 64 if cls == "small" else 128
    if kernel == "up":
        return Config(bm, 64, 64, 8, 8 if bm == 128 else 4, 4)
    if kernel == "wgrad":
        return Config(128, 128, 64, 8, 8, 3)
    return Config(bm, 128, 64, 8, 8 if bm == 128 else 4, 3)


def _split_k(S: int, E: int, N: int, K: int, cfg: Config, sm_count: int, decode: bool) -> int:
    """Split K until the live programs (about min(S, E) + S / BM row tiles x N tiles) fill the GPU four
    times over (the partial sums go to float32 buffers that the combine kernel adds in a fixed order)."""
    live = (min(S, E) + (0 if decode else S // cfg.BM)) * -(-N // cfg.BN)
    split = 1
    while live * split < 4 * sm_count and K // (split * 2) >= 4 * cfg.BK:
        split *= 2
    return split
