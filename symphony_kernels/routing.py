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
stable counting sort (plus, beyond 64 count blocks, a zero fill of a small counter table). Integer counting
only: deterministic. The integer buffers of a call are views of one allocation (see `_launch.Workspace`).
The backward of the weights with respect to the logits is a few PyTorch ops on [T, E] (see
`route_backward`); `route` is differentiable through `topk_weights`.

CPU tensors run the Triton kernels under TRITON_INTERPRET=1, otherwise the reference (see `_runtime`).
"""
from __future__ import annotations

import operator
import weakref
from typing import NamedTuple

import torch

from . import _launch, _routing_launch, ops
from ._routing_launch import route_backward
from ._runtime import MAX_EXPERTS, MAX_PAIRS, MAX_TOP_K, use_triton
from .reference import SCORINGS, dispatch_reference, route_reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


class RoutingPlan(NamedTuple):
    """What the experts need: routing weights and ids, and the pairs t*k+j sorted by expert.

    topk_weights [T, k] float32 (float64 for float64 logits), topk_ids [T, k] int32,
    expert_counts [E] int32, expert_offsets [E+1] int32 (offsets[e]..offsets[e+1] index expert e's run of
    sorted_pairs), sorted_pairs [T*k] int32. Where the kernels make the plan outside torch.compile, the four
    integer tensors are views of one allocation, so they share one version counter: writing into any of them
    in place counts as changing topk_ids (`moe_experts(plan=...)` then refuses the plan).
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


# ------------------------------------------------------------------------------------------ plan checks
# Every plan `route` or `dispatch` returns is remembered (weakly) with the ids it was made from, so that
# `moe_experts(plan=...)` can refuse a plan of other ids (same shape, other experts: a wrong result) or one
# made up by hand (out-of-range rows: out-of-bounds reads) with a host check, without reading device memory.
_ISSUED: dict = {}  # id(sorted_pairs) -> (sorted_pairs, ids, offsets: weak references; ids._version at issue; E)


def _issue(ids: torch.Tensor, offsets: torch.Tensor, sorted_pairs: torch.Tensor, num_experts: int):
    if not torch.compiler.is_compiling() and sorted_pairs.device.type != "meta":
        _note(ids, offsets, sorted_pairs, num_experts)


def _note(ids, offsets, sorted_pairs, num_experts):
    key = id(sorted_pairs)
    forget = lambda _, key=key: _ISSUED.pop(key, None)  # noqa: E731 - the entry goes with its tensor
    _ISSUED[key] = (weakref.ref(sorted_pairs, forget), weakref.ref(ids), weakref.ref(offsets), ids._version,
                    num_experts)


def check_plan(plan, topk_ids: torch.Tensor, num_experts: int):
    """ValueError unless `plan` was made by `route` or `dispatch` for these very `topk_ids` (the same tensor,
    unmodified since) and `num_experts`."""
    if torch.compiler.is_compiling():
        return
    sorted_pairs, offsets = getattr(plan, "sorted_pairs", None), getattr(plan, "expert_offsets", None)
    entry = _ISSUED.get(id(sorted_pairs))
    if entry is None or entry[0]() is not sorted_pairs or entry[2]() is not offsets:
        raise ValueError("plan was not made by symphony_kernels.route or dispatch: pass the RoutingPlan that route "
                         "returned (with its topk_ids), or plan=None")
    _, ids, _, version, E = entry
    src = ids()
    same = src is not None and (src is topk_ids or (
        src.data_ptr() == topk_ids.data_ptr() and src.shape == topk_ids.shape and src.stride() == topk_ids.stride()
        and src.dtype == topk_ids.dtype))
    if not same or src._version != version or E != num_experts:
        raise ValueError("plan was made for other topk_ids (or they changed since, or another number of experts): "
                         "pass the plan's own topk_ids, or plan=None")


# -------------------------------------------------------------------------------------------- public API
def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
          renormalize: bool = True) -> RoutingPlan:
    """Route `router_logits` [T, E] to the top-k experts of every token and plan the dispatch.

    Returns a `RoutingPlan` (see its docstring); `topk_weights` carries the gradient to the logits.
    E <= 1024, 1 <= top_k <= min(E, 32). Non-contiguous logits are read through their strides. Meta tensors
    give a plan of meta tensors of the right shapes.
    """
    sig = _signature(router_logits, top_k, scoring, renormalize)
    if sig is not None:  # eager inference on CUDA: replay an earlier call's launches, or record this one's
        replay = _REPLAYS.get(sig)
        if replay is not None and router_logits.data_ptr() % 16 == 0 and _launch._no_launch_hook():
            plan = RoutingPlan(*_PLAN(replay.run({"logits": router_logits})))
            _note(plan.topk_ids, plan.expert_offsets, plan.sorted_pairs, router_logits.shape[1])
            return plan
    check_route_args(router_logits, top_k, scoring, renormalize)
    if router_logits.device.type == "meta":
        plan = RoutingPlan(*ops.route_shapes(router_logits, top_k))
    elif not use_triton(router_logits.device):
        weights, ids = _RouteReference.apply(router_logits, top_k, scoring, renormalize)
        plan = RoutingPlan(weights, ids, *dispatch_reference(ids, router_logits.shape[1]))
    elif sig is not None:
        call, outs = _routing_launch.route_call(router_logits, top_k, scoring, renormalize)
        call.run()
        plan = RoutingPlan(*outs)
        if sig not in _REPLAYS and router_logits.shape[0]:
            _remember(sig, call, router_logits)
    else:
        plan = RoutingPlan(*ops.route(router_logits, top_k, scoring, renormalize))
    _issue(plan.topk_ids, plan.expert_offsets, plan.sorted_pairs, router_logits.shape[1])
    return plan


def dispatch(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_counts [E] int32, expert_offsets [E+1] int32, sorted_pairs [T*k] int32) for given ids:
    the pairs t*k+j sorted by expert, stably; ids outside [0, E) are dropped pairs placed last (see the
    module docstring). Not differentiable (integers only)."""
    check_dispatch_args(topk_ids, num_experts)
    if topk_ids.device.type == "meta":
        out = ops.dispatch_shapes(topk_ids, num_experts)
    elif not use_triton(topk_ids.device):
        out = _dispatch_reference_dropping(topk_ids, num_experts)
    else:
        out = ops.dispatch(topk_ids, num_experts)
    _issue(topk_ids, out[1], out[2], num_experts)
    return out


# Replays of earlier eager inference calls of `route` (see `_launch.Replay`), by `_signature`.
_REPLAYS: dict = {}
_MAX_REPLAYS = 256
_PLAN_NAMES = ("weights", "ids", "counts", "offsets", "sorted_pairs")
_PLAN = operator.itemgetter(*_PLAN_NAMES)


def _signature(router_logits, top_k, scoring, renormalize):
    """What decides route's launches besides the data, for an eager call on CUDA that needs no gradient
    (None otherwise, or for anything that is not a tensor)."""
    try:
        if not router_logits.is_cuda or (router_logits.requires_grad and torch.is_grad_enabled()) \
                or torch.compiler.is_compiling() or type(top_k) is not int or type(scoring) is not str \
                or type(renormalize) is not bool:
            return None
        return (router_logits.shape, router_logits.stride(), router_logits.dtype, router_logits.device, top_k,
                scoring, renormalize)
    except AttributeError:
        return None


def _remember(sig, call, router_logits):
    replay = _launch.Replay.record([call], {"logits": router_logits}, keep=_PLAN_NAMES)
    if replay is not None:
        if len(_REPLAYS) >= _MAX_REPLAYS:
            _REPLAYS.pop(next(iter(_REPLAYS)))
        _REPLAYS[sig] = replay


class _RouteReference(torch.autograd.Function):
    """route_reference's values with the Triton path's gradient (`route_backward`: 0, not NaN, at +inf)."""

    @staticmethod
    def forward(ctx, router_logits, top_k, scoring, renormalize):
        with torch.no_grad():
            weights, ids = route_reference(router_logits, top_k, scoring, renormalize)
        ctx.scoring, ctx.renormalize = scoring, renormalize
        ctx.save_for_backward(router_logits, ids)
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _):
        router_logits, ids = ctx.saved_tensors
        return route_backward(router_logits, ids, grad_weights, ctx.scoring, ctx.renormalize), None, None, None


def _dispatch_reference_dropping(topk_ids, num_experts):
    """dispatch_reference, extended to ids outside [0, E) (sorted last, counted for no expert)."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    counts, offsets, sorted_pairs = dispatch_reference(key.view(topk_ids.shape), num_experts + 1)
    return counts[:num_experts].contiguous(), offsets[:num_experts + 1].contiguous(), sorted_pairs
