"""Launch configurations of the experts kernels, per kernel and shape class.

A configuration is (BM, BN, BK, GROUP_M, num_warps, num_stages, split) where split is the split-K factor of
`_down_kernel` (the down, dX and d(inter) GEMMs; decode and small classes, chosen from the shape so that
enough programs stream the weights).
The tiles come from a rule (`rule`) on the kernel, the shape class and size thresholds, fitted to the
winners of the sweep in `benchmarks/tune_moe.py` on an H100 (see benchmarks/NOTES-kernels.md).
Under the Triton interpreter (CPU) every kernel runs on small tiles so that the tests stay fast.

Kernels: "up" (N = f, K = d, two accumulators), "down" (N = d, K = f), "dinter" (N = f, K = d),
"dx" (the down kernel on N = d, K = 2f), "wgrad" (per-expert [M, N] outputs, K = rows of the expert).
Shape classes: "decode" (see `decode_mode`: one program row per expert, pairs taken by mask, or one per pair;
no dispatch), "small" (S / E <= 256 rows per expert on average) and "large".
"""
from __future__ import annotations

import functools
from typing import NamedTuple

SM_COUNT_DEFAULT = 132


class Config(NamedTuple):
    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split: int = 1


# Experiment hook for the sweep: (kernel) -> Config applied regardless of class.
OVERRIDE: dict[str, Config] = {}


DECODE_MAX_ROWS = 256  # masked tiles: at most E * next_pow2(S) rows of MMA work in all


PAIR_ROWS_MIN_RATIO = 4  # one program row per pair when E >= 4 * S
PAIR_ROWS_MAX_PAIRS = 256


def decode_mode(S: int, E: int) -> int:
    """0: sorted tiles (a dispatch first, or the plan of `route`). 2: one program row per pair (no dispatch)
    when there are at least 4 times as many experts as pairs (fine-grained experts at T <= 2-8: per-expert rows
    would launch mostly empty programs; two pairs on one expert, rare at this ratio, read its weights twice).
    1: the masked per-expert tiles (no dispatch) while E * next_pow2(S) <= 256 rows of MMA work (few experts
    and few pairs: the rows wasted on other experts' pairs cost less than sorting). Fitted to
    benchmarks/bench_decode.py on an H200 (benchmarks/results/runtime/decode-h200.json): beyond 256 masked
    rows (Mixtral at 64 pairs, Qwen2-0.5B-x4 at 128, Qwen3-30B at 32) the sorted tiles were 4-40% faster."""
    if S * PAIR_ROWS_MIN_RATIO <= E and S <= PAIR_ROWS_MAX_PAIRS:
        return 2
    return 1 if E * _pow2_at_least(S, 16) <= DECODE_MAX_ROWS else 0


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


@functools.lru_cache(maxsize=8192)
def pick(kernel: str, S: int, E: int, N: int, K: int, interpret: bool, sm_count: int = SM_COUNT_DEFAULT,
         elsize: int = 2) -> Config:
    """The configuration of `kernel` for S pairs, E experts, an [., K] @ [K, N] product per row tile, with
    operands of `elsize` bytes (float32 tiles take twice the shared memory: fewer stages, then smaller BK).
    Cached: the same arguments give the same object without recomputing (the eager launch path)."""
    cls = shape_class(S, E)
    mode = decode_mode(S, E)
    decode = cls == "decode"
    if interpret:
        cfg = Config(decode_bm(S) if decode else 32, 32, 32, 4, 4, 1)
    elif kernel in OVERRIDE:
        cfg = OVERRIDE[kernel]
    else:
        cfg = rule(kernel, cls, N, K)
    if decode and kernel != "wgrad":
        cfg = cfg._replace(BM=16 if mode == 2 else decode_bm(S))
    elif cls == "small" and kernel != "wgrad" and not interpret and kernel not in OVERRIDE:
        # Few rows per expert (fine-grained experts at small batches): a row tile much taller than an expert's
        # rows multiplies rows of nothing; cap it at the next power of two of the mean rows per expert.
        bm = _pow2_at_least(-(-S // E), 16)
        if bm < cfg.BM:
            cfg = cfg._replace(BM=bm, num_warps=4 if bm <= 32 else cfg.num_warps)
    if not interpret:
        cfg = _fit_smem(kernel, cfg, elsize)
    split = 1
    if kernel in ("down", "dx", "dinter") and cls != "large" and not interpret:
        split = _split_k(S, E, N, K, cfg, sm_count, decode)
    return cfg._replace(split=split)


def rule(kernel: str, cls: str, N: int, K: int) -> Config:
    """Tiles by kernel, shape class and size thresholds (N: output columns per row, K: the reduction). The
    thresholds reproduce the H100 sweep's winners on the four benchmark shapes (benchmarks/NOTES-kernels.md:
    (d, f) = (896, 4864), (1536, 8960), (4096, 14336), (2048, 768)) and carry them to every other size; no
    entry is keyed on an exact shape. (Until issue 10 these winners were a table keyed on exact (N, K), and
    every other shape took the class defaults.)"""
    if cls == "decode":
        if kernel == "wgrad":
            return Config(64, 64, 32, 8, 4, 3)
        if kernel == "up":      # N = f, K = d
            return Config(16, 64 if N >= 8192 else 32, 256 if (K >= 2048 and N <= 1024) else 128, 1, 4, 4)
        bn = 128 if N < 1024 else 64
        bk = 256 if (K >= 12288 or K <= 1024) else 128
        return Config(16, bn, bk, 1, 4, 3 if (bk == 256 or bn == 128) else 4)
    if kernel == "up":
        if cls == "small" and K < 1024:
            return Config(64, 64, 64, 8, 4, 4)
        return Config(128, 128, 64, 8, 8, 3)
    if kernel == "down":
        if cls == "large":
            return Config(128, 256, 64, 8, 8, 3)
        if 1024 < N <= 1536:
            return Config(128, 256, 64, 8, 8, 3)
        if K <= 1024:
            return Config(128, 128, 64, 8, 8, 3)
        return Config(64, 128, 64, 8, 4, 4)
    if kernel == "dinter":  # the gathered plain GEMM since issue 11 (the activation backward is its own pass)
        if cls == "large":
            return Config(128, 256, 64, 8, 8, 3)
        return Config(128, 128, 64, 8, 8, 3)
    if kernel == "dx":
        return Config(128, 256 if cls == "large" else 128, 64, 8, 8, 3)
    if kernel == "wgrad":
        if cls == "small" and N <= 1024 and K >= 2048:
            return Config(64, 128, 64, 8, 4, 4)
        return Config(128, 128, 64, 8, 8, 3)
    raise ValueError(f"unknown kernel {kernel!r}")


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


def _split_k(S: int, E: int, N: int, K: int, cfg: Config, sm_count: int, decode: bool) -> int:
    """Split K until the live programs (about min(S, E) + S / BM row tiles x N tiles) fill the GPU four
    times over (the partial sums go to float32 buffers that the combine kernel adds in a fixed order)."""
    live = (min(S, E) + (0 if decode else S // cfg.BM)) * -(-N // cfg.BN)
    split = 1
    while live * split < 4 * sm_count and K // (split * 2) >= 4 * cfg.BK:
        split *= 2
    return split
