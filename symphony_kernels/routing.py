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

from typing import NamedTuple

import torch

from . import ops
from ._runtime import MAX_EXPERTS, MAX_PAIRS, MAX_TOP_K, use_triton
from .reference import SCORINGS, dispatch_reference, route_reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


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



# -------------------------------------------------------------------------------------------- public API
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
    return RoutingPlan(*ops.route(router_logits, top_k, scoring, renormalize))


def dispatch(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_counts [E] int32, expert_offsets [E+1] int32, sorted_pairs [T*k] int32) for given ids:
    the pairs t*k+j sorted by expert, stably; ids outside [0, E) are dropped pairs placed last (see the
    module docstring). Not differentiable (integers only)."""
    check_dispatch_args(topk_ids, num_experts)
    if not use_triton(topk_ids.device):
        return _dispatch_reference_dropping(topk_ids, num_experts)
    return ops.dispatch(topk_ids, num_experts)


def _dispatch_reference_dropping(topk_ids, num_experts):
    """dispatch_reference, extended to ids outside [0, E) (sorted last, counted for no expert)."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    counts, offsets, sorted_pairs = dispatch_reference(key.view(topk_ids.shape), num_experts + 1)
    return counts[:num_experts].contiguous(), offsets[:num_experts + 1].contiguous(), sorted_pairs
