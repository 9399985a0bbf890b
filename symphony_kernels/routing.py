"""Fused top-k routing and the dispatch plan of the grouped-GEMM experts.

`route(logits, top_k)` scores the router logits (softmax or sigmoid, in float32; float64 logits are scored in
float64), picks the top-k experts of every token (ties go to the lower expert id, ids ordered by descending
score), renormalises the chosen weights, and sorts the (token, slot) pairs by expert, stably. The semantics,
the non-finite rules included, are those of `reference.route_reference` and `reference.dispatch_reference`:
NaN logits count as -inf; a row whose maximum is +inf shares the weight among its +inf entries; a row with
nothing above -inf picks experts 0..k-1 with weight 0. Every id lies in [0, E) whatever the logits hold.

`dispatch(topk_ids, num_experts)` builds the plan part from ids computed elsewhere (e.g. by a transformers
router). There, ids outside [0, E) (transformers' expert-parallel sentinel, say) are *dropped pairs*: they
count for no expert and sit after every expert's run in `sorted_pairs` (offsets[E] is where they start);
the experts kernels give them no contribution.

Kernels: one fused kernel for scoring + top-k + renormalise + per-block counts and ranks, one for the
stable counting sort (plus a zero fill of a small counter table). Integer counting only: deterministic.
The backward of the weights with respect to the logits is a few PyTorch ops on [T, E] (see
`route_backward`); `route` is differentiable through `topk_weights`.

CPU tensors run the Triton kernels under TRITON_INTERPRET=1, otherwise the reference (see `_runtime`).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._runtime import MAX_EXPERTS, MAX_PAIRS, MAX_TOP_K, next_pow2, use_triton
from .reference import SCORINGS, dispatch_reference, route_reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)
_SORT_PROGRAMS = 64  # most programs of the sort kernel (each reads every program's counter row once)
_GATHER = True       # the sort kernel looks cursors up with tl.gather (else through a scratch row)
# Count blocks the sort kernel places per step (at most; 1 = one block at a time). SYMPHONY_SORT_CHUNK overrides.
_SORT_CHUNK = int(os.environ.get("SYMPHONY_SORT_CHUNK", "8"))


class RoutingPlan(NamedTuple):
    """What the experts need: routing weights and ids, and the pairs t*k+j sorted by expert.

    topk_weights [T, k] float32 (float64 for float64 logits), topk_ids [T, k] int32,
    expert_counts [E] int32, expert_offsets [E+1] int32 (offsets[e]..offsets[e+1] index expert e's run of
    sorted_pairs), sorted_pairs [T*k] int32.
    """
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_pairs: torch.Tensor


# ----------------------------------------------------------------------------------------------- checks
def check_route_args(router_logits, top_k, scoring, renormalize):
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, not {type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in _FLOATS:
        raise TypeError(f"router_logits must be float16/bfloat16/float32/float64, not {router_logits.dtype}")
    E = router_logits.shape[1]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in [1, {MAX_EXPERTS}], got {E}")
    _check_top_k(top_k, E)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, not {type(renormalize).__name__}")
    if router_logits.shape[0] * top_k > MAX_PAIRS:
        raise ValueError(f"tokens * top_k = {router_logits.shape[0] * top_k} exceeds {MAX_PAIRS} (int32 pair ids)")


def _check_top_k(top_k, E):
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, not {type(top_k).__name__}")
    if not 1 <= top_k <= min(E, MAX_TOP_K):
        raise ValueError(f"top_k must be in [1, min(num_experts={E}, {MAX_TOP_K})], got {top_k}")


def check_dispatch_args(topk_ids, num_experts):
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, not {type(topk_ids).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in _INTS:
        raise TypeError(f"topk_ids must be an integer tensor, not {topk_ids.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, not {type(num_experts).__name__}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    k = topk_ids.shape[1]
    if not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"top_k (topk_ids.shape[1]) must be in [1, {MAX_TOP_K}], got {k}")
    if topk_ids.shape[0] * k > MAX_PAIRS:
        raise ValueError(f"tokens * top_k = {topk_ids.shape[0] * k} exceeds {MAX_PAIRS} (int32 pair ids)")


# --------------------------------------------------------------------------------------------- launchers
def _block_tokens(EP: int) -> int:
    return max(16, min(256, 8192 // EP))


def _sort_grid(nb: int) -> tuple[int, int]:
    """(programs of the sort kernel, count blocks per program)."""
    nprog = min(nb, _SORT_PROGRAMS)
    G = -(-nb // nprog)
    return -(-nb // G), G


def _sort_launch(ids, lrank, bcount, gcount, G, E, BT, counts, offsets, sorted_pairs):
    from ._routing_kernels import _sort_kernel

    T, k = ids.shape
    nb = bcount.shape[0]
    nprog = gcount.shape[0]
    EP = next_pow2(E + 1)
    KP = next_pow2(k)
    CH = max(1, min(_SORT_CHUNK, G, 2048 // (BT * KP)))
    CH = 1 << (CH.bit_length() - 1)  # a power of two
    global _GATHER
    while True:
        scratch = bcount if _GATHER else torch.empty((nprog, CH * EP), dtype=torch.int32, device=ids.device)
        try:
            _sort_kernel[(nprog,)](ids, ids.stride(0), ids.stride(1), lrank, bcount, gcount, T, E, nb, G, nprog,
                                   counts, offsets, sorted_pairs, scratch, K=k, KP=KP, BT=BT, EP=EP,
                                   RB=max(1, min(64, 4096 // EP)), CH=CH, GATHER=_GATHER, num_warps=4)
            return
        except Exception as exc:  # a Triton build without a working tl.gather: use the scratch-row variant
            if not _GATHER or "ompil" not in type(exc).__name__ + str(exc)[:200]:
                raise
            _GATHER = False


def route_triton(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """The five plan tensors through the Triton kernels (no checks; see `route`)."""
    from ._routing_kernels import _route_kernel

    T, E = router_logits.shape
    dev = router_logits.device
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    weights = torch.empty((T, top_k), dtype=acc, device=dev)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    lrank = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(T * top_k, dtype=torch.int32, device=dev)
    if T == 0:
        counts.zero_()
        offsets.zero_()
        return weights, ids, counts, offsets, sorted_pairs
    EP = next_pow2(E)
    BT = _block_tokens(EP)
    nb = -(-T // BT)
    bcount = torch.empty((nb, E + 1), dtype=torch.int32, device=dev)
    nprog, G = _sort_grid(nb)
    gcount = torch.zeros((nprog, E + 1), dtype=torch.int32, device=dev)
    _route_kernel[(nb,)](router_logits, router_logits.stride(0), router_logits.stride(1), T, E,
                         weights, ids, lrank, bcount, gcount, G,
                         K=top_k, KP=next_pow2(top_k), BT=BT, EP=EP,
                         SIGMOID=scoring == "sigmoid", RENORM=renormalize, F64=acc == torch.float64,
                         num_warps=8 if BT * EP >= 8192 else 4)
    _sort_launch(ids, lrank, bcount, gcount, G, E, BT, counts, offsets, sorted_pairs)
    return weights, ids, counts, offsets, sorted_pairs


def dispatch_triton(topk_ids: torch.Tensor, num_experts: int):
    """(counts, offsets, sorted_pairs) for given ids through the Triton kernels (no checks)."""
    from ._routing_kernels import _count_kernel

    T, k = topk_ids.shape
    E = num_experts
    dev = topk_ids.device
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(T * k, dtype=torch.int32, device=dev)
    if T == 0:
        counts.zero_()
        offsets.zero_()
        return counts, offsets, sorted_pairs
    EP = next_pow2(E + 1)
    BT = _block_tokens(EP)
    nb = -(-T // BT)
    lrank = torch.empty((T, k), dtype=torch.int32, device=dev)
    bcount = torch.empty((nb, E + 1), dtype=torch.int32, device=dev)
    nprog, G = _sort_grid(nb)
    gcount = torch.zeros((nprog, E + 1), dtype=torch.int32, device=dev)
    _count_kernel[(nb,)](topk_ids, topk_ids.stride(0), topk_ids.stride(1), T, E, lrank, bcount, gcount, G,
                         K=k, KP=next_pow2(k), BT=BT, EP=EP, num_warps=8 if BT * EP >= 8192 else 4)
    _sort_launch(topk_ids, lrank, bcount, gcount, G, E, BT, counts, offsets, sorted_pairs)
    return counts, offsets, sorted_pairs


def route_backward(router_logits: torch.Tensor, topk_ids: torch.Tensor, grad_weights: torch.Tensor,
                   scoring: str, renormalize: bool) -> torch.Tensor:
    """Gradient of the logits from the gradient of `topk_weights`, equal to autograd through
    `route_reference` (PyTorch ops on [T, E], no host sync). Rows whose scores do not depend on the logits
    (a +inf maximum, nothing above -inf) and NaN/inf entries get zero (where autograd of the reference gives
    NaN at a +inf logit, an artifact of torch.where, this gives 0)."""
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    x = router_logits.to(acc)
    x = torch.where(torch.isnan(x), torch.full_like(x, -float("inf")), x)
    ids = topk_ids.long()
    g = grad_weights.to(acc)
    if scoring == "sigmoid":
        s = torch.sigmoid(x)
        live = torch.ones_like(x[:, :1], dtype=torch.bool)
    else:
        m = x.amax(dim=-1, keepdim=True)
        live = torch.isfinite(m)
        s = torch.softmax(torch.where(live, x, torch.zeros_like(x)), dim=-1)
        s = torch.where(live & torch.isfinite(x), s, torch.zeros_like(s))
    s_sel = s.gather(1, ids)
    if renormalize:
        tot = s_sel.sum(dim=-1, keepdim=True)
        pos = tot > 0
        safe = torch.where(pos, tot, torch.ones_like(tot))
        w = s_sel / safe
        g = torch.where(pos, (g - (g * w).sum(dim=-1, keepdim=True)) / safe, torch.zeros_like(g))
    gs = torch.zeros_like(s).scatter_add_(1, ids, g)
    if scoring == "sigmoid":
        dx = gs * s * (1 - s)
    else:
        dx = s * (gs - (gs * s).sum(dim=-1, keepdim=True))
        dx = torch.where(live, dx, torch.zeros_like(dx))
    return dx.to(router_logits.dtype)


# -------------------------------------------------------------------------------------------- public API
def _ops():
    from . import ops

    return ops


def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
          renormalize: bool = True) -> RoutingPlan:
    """Route `router_logits` [T, E] to the top-k experts of every token and plan the dispatch.

    Returns a `RoutingPlan` (see its docstring); `topk_weights` carries the gradient to the logits.
    E <= 256, 1 <= top_k <= min(E, 16). Non-contiguous logits are read through their strides.
    """
    check_route_args(router_logits, top_k, scoring, renormalize)
    if not use_triton(router_logits.device):
        weights, ids = route_reference(router_logits, top_k, scoring, renormalize)
        return RoutingPlan(weights, ids, *dispatch_reference(ids, router_logits.shape[1]))
    return RoutingPlan(*_ops().route(router_logits, top_k, scoring, renormalize))


def dispatch(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_counts [E] int32, expert_offsets [E+1] int32, sorted_pairs [T*k] int32) for given ids:
    the pairs t*k+j sorted by expert, stably; ids outside [0, E) are dropped pairs placed last (see the
    module docstring). Not differentiable (integers only)."""
    check_dispatch_args(topk_ids, num_experts)
    if not use_triton(topk_ids.device):
        return _dispatch_reference_dropping(topk_ids, num_experts)
    return _ops().dispatch(topk_ids, num_experts)


def _dispatch_reference_dropping(topk_ids, num_experts):
    """dispatch_reference, extended to ids outside [0, E) (sorted last, counted for no expert)."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    counts, offsets, sorted_pairs = dispatch_reference(key.view(topk_ids.shape), num_experts + 1)
    return counts[:num_experts].contiguous(), offsets[:num_experts + 1].contiguous(), sorted_pairs
