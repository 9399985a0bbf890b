"""`warmup`: compile the kernel variants an MoE layer will need before it needs them.

A variant depends on the shape class of a call (decode, small, large: `_configs`), the tiles, the dtypes and
the device, not on the exact token count, so a few token counts cover a model: a generate() needs the
prefill's and the decode's. Without warmup, eager inference computes a call whose kernels are not compiled yet
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
    number of variants that were not compiled yet. Only meaningful on CUDA; elsewhere it returns 0."""
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


def planned_launches(d: int, f: int, E: int, k: int, *, dtype=torch.bfloat16, weight_dtype=None,
                     tokens=DEFAULT_TOKENS, activation="silu", route=False) -> list:
    """The (kernel, grid, args, meta) launches of the forward at each token count, planned on meta tensors."""
    meta = torch.device("meta")
    gate_up = torch.empty((E, 2 * f, d), dtype=weight_dtype or dtype, device=meta)
    down = torch.empty((E, d, f), dtype=weight_dtype or dtype, device=meta)
    launches = []
    for T in sorted(set(int(t) for t in tokens)):
        hidden = torch.empty((T, d), dtype=dtype, device=meta)
        ids = torch.empty((T, k), dtype=torch.int64, device=meta)
        weights = torch.empty((T, k), dtype=torch.float32, device=meta)
        offsets = sorted_pairs = ids
        if not _configs.decode_mode(T * k, E):
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
