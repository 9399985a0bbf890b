"""`warmup`: compile the kernel variants an MoE layer will need before it needs them.

A variant depends on the shape class of a call (decode, small, large: `_configs`), the tiles, the dtypes and
the device, not on the exact token count, so a few token counts cover a model: a generate() needs the
prefill's and the decode's. (Below 17 tokens the routing kernels take one block of next_pow2(T) rows, so each
power of two up to 16 is a routing variant of its own: warm the decode batch sizes a model will use.) Without warmup, eager inference computes a call whose kernels are not compiled yet
with torch's grouped GEMM while they compile in the background (`_launch`); with `blocking=True` this returns
once every variant is compiled, so that every later call runs the kernels. No GPU memory beyond a few bytes is
used: the launches are planned on meta tensors and compiled on 16-element dummies.
"""
from __future__ import annotations

import torch

from . import _configs, _experts_launch, _routing_launch

DEFAULT_TOKENS = (1, 8, 64, 512, 4096)


def warmup(hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
           dtype: torch.dtype = torch.bfloat16, weight_dtype: torch.dtype | None = None,
           device="cuda", tokens=DEFAULT_TOKENS, activation: str = "silu", route: bool = False,
           blocking: bool = False) -> int:
    """Compile the forward kernels of `moe_experts` (and of `route` with route=True) for experts of this shape
    at each token count in `tokens`, in the background (or before returning with blocking=True). Returns the
    number of variants that were not compiled yet. Only meaningful on CUDA; elsewhere it returns 0.

    The routing inputs decide variants too: transformers' routers hand the experts int64 ids with float32
    (Mixtral) or `dtype` (Qwen-MoE) weights, `route` int32 ids with float32 weights; all of these are planned."""
    _check(hidden_size, intermediate_size, num_experts, top_k, dtype, weight_dtype, tokens, activation)
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    launches = planned_launches(hidden_size, intermediate_size, num_experts, top_k, dtype=dtype,
                                weight_dtype=weight_dtype, tokens=tokens, activation=activation, route=route)
    futures = {id(f): f for f in (kernel.compile_async(args, meta, device.index) for kernel, _, args, meta in launches)
               if f is not None}
    if blocking:
        for future in futures.values():
            future.result()
    return len(futures)


def _check(d, f, E, k, dtype, weight_dtype, tokens, activation):
    from ._runtime import MAX_EXPERTS, MAX_TOP_K
    from .reference import ACTIVATIONS

    for name, v in (("hidden_size", d), ("intermediate_size", f), ("num_experts", E), ("top_k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, not {v!r}")
    if E > MAX_EXPERTS or k > min(E, MAX_TOP_K):
        raise ValueError(f"the kernels take up to {MAX_EXPERTS} experts and top_k <= min(num_experts, {MAX_TOP_K}); "
                         f"got {E} experts, top_k {k}")
    for name, dt in (("dtype", dtype), ("weight_dtype", weight_dtype or dtype)):
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, not {dt!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    if isinstance(tokens, (int, str)) or not tokens or not all(isinstance(t, int) and t >= 1 for t in tokens):
        raise ValueError(f"tokens must be a non-empty list of positive token counts, not {tokens!r}")


def planned_launches(d: int, f: int, E: int, k: int, *, dtype=torch.bfloat16, weight_dtype=None,
                     tokens=DEFAULT_TOKENS, activation="silu", route=False) -> list:
    """The (kernel, grid, args, meta) launches of the forward at each token count, planned on meta tensors."""
    meta = torch.device("meta")
    gate_up = torch.empty((E, 2 * f, d), dtype=weight_dtype or dtype, device=meta)
    down = torch.empty((E, d, f), dtype=weight_dtype or dtype, device=meta)
    routing = [(torch.int64, torch.float32), (torch.int64, dtype)] + ([(torch.int32, torch.float32)] if route else [])
    launches = []
    for T in sorted(set(int(t) for t in tokens)):
        hidden = torch.empty((T, d), dtype=dtype, device=meta)
        for ids_dtype, w_dtype in dict.fromkeys(routing):
            ids = torch.empty((T, k), dtype=ids_dtype, device=meta)
            weights = torch.empty((T, k), dtype=w_dtype, device=meta)
            offsets = sorted_pairs = ids
            if not _configs.decode_mode(T * k, E) and not (route and ids_dtype == torch.int32):
                dispatch, (_, offsets, sorted_pairs) = _routing_launch.dispatch_call(ids, E)
                launches += dispatch.launches
            call, *_ = _experts_launch.forward_call(hidden, gate_up, down, weights, ids, offsets, sorted_pairs,
                                                    activation, False)
            launches += call.launches
        if route:
            logits = torch.empty((T, E), dtype=dtype, device=meta)
            launches += _routing_launch.route_call(logits, k, "softmax", True)[0].launches
    return launches


__all__ = ["warmup", "planned_launches", "DEFAULT_TOKENS"]
