"""torch.library registration of the kernels, so that torch.compile traces through them (fake tensors give
the shapes) and autograd reaches them (register_autograd).

Ops (namespace `symphony`):
- `route(logits, top_k, scoring, renormalize) -> (weights, ids, counts, offsets, sorted_pairs)`,
  differentiable in `logits` through `weights`;
- `dispatch(ids, num_experts) -> (counts, offsets, sorted_pairs)`;
- `moe_experts(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save)
  -> (out, gate_up_act)`, differentiable in hidden, gate_up, down and weights; `gate_up_act` is the saved
  pre-activations [S, 2f] (empty unless `save`): the only activation the backward keeps (it recomputes
  w * act(gate) * up from them);
- `moe_experts_backward(...)`: its backward, itself an op so that compiled backward graphs call it.

None of them syncs with the host; grids depend on shapes only, so they can be captured in CUDA graphs.
Layering: kernels (`_*_kernels`, `_experts_fwd`, `_experts_bwd`) -> launchers (`_routing_launch`, `_experts_launch`)
-> these ops -> the public functions `routing.route`, `routing.dispatch` and `experts.moe_experts`, which check
their inputs first and take the reference path where the Triton kernels cannot run.
"""
from __future__ import annotations

import torch

from . import _experts_launch as _experts
from . import _routing_launch as _routing

# ------------------------------------------------------------------------------------------------ route


@torch.library.custom_op("symphony::route", mutates_args=())
def route_op(router_logits: torch.Tensor, top_k: int, scoring: str,
             renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _routing.route_triton(router_logits, top_k, scoring, renormalize, separate=True)


@route_op.register_fake
def route_shapes(router_logits, top_k, scoring="softmax", renormalize=True):
    """Empty outputs of `route` with their shapes and dtypes (fake tensors, meta tensors)."""
    T, E = router_logits.shape
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    new = router_logits.new_empty
    return (new((T, top_k), dtype=acc), new((T, top_k), dtype=torch.int32), new((E,), dtype=torch.int32),
            new((E + 1,), dtype=torch.int32), new((T * top_k,), dtype=torch.int32))


def _route_setup(ctx, inputs, output):
    router_logits, top_k, scoring, renormalize = inputs
    ctx.scoring, ctx.renormalize = scoring, renormalize
    ctx.save_for_backward(router_logits, output[1])


def _route_backward(ctx, grad_weights, *_):
    router_logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None, None
    return _routing.route_backward(router_logits, ids, grad_weights, ctx.scoring, ctx.renormalize), None, None, None


route_op.register_autograd(_route_backward, setup_context=_route_setup)

# --------------------------------------------------------------------------------------------- dispatch


@torch.library.custom_op("symphony::dispatch", mutates_args=())
def dispatch_op(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _routing.dispatch_triton(topk_ids, num_experts, separate=True)


@dispatch_op.register_fake
def dispatch_shapes(topk_ids, num_experts):
    """Empty outputs of `dispatch` with their shapes and dtypes (fake tensors, meta tensors)."""
    T, k = topk_ids.shape
    new = topk_ids.new_empty
    return (new((num_experts,), dtype=torch.int32), new((num_experts + 1,), dtype=torch.int32),
            new((T * k,), dtype=torch.int32))

# ------------------------------------------------------------------------------------------ moe_experts


@torch.library.custom_op("symphony::moe_experts", mutates_args=())
def moe_experts_op(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor, offsets: torch.Tensor, sorted_pairs: torch.Tensor, activation: str,
                   save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _experts.experts_forward(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save)


@moe_experts_op.register_fake
def _(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save):
    T, d = hidden.shape
    f = down.shape[-1]
    S = ids.shape[0] * ids.shape[1]
    new = hidden.new_empty
    return new((T, d)), new((S, 2 * f) if save else (0,))


def _experts_setup(ctx, inputs, output):
    hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save = inputs
    ctx.activation = activation
    ctx.saved = save
    ctx.save_for_backward(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, output[1])


def _experts_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 9
    if not ctx.saved:
        raise RuntimeError("symphony::moe_experts ran with save=False, so it cannot be differentiated; call "
                           "symphony_kernels.moe_experts with grad mode on")
    hidden, gate_up, down, weights, ids, offsets, sorted_pairs, gu = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dgu, ddown, dw = moe_experts_backward_op(grad_out, hidden, gate_up, down, weights, ids, offsets,
                                                 sorted_pairs, gu, ctx.activation,
                                                 need[0], need[1], need[2], need[3])
    pick = lambda t, n: t if n else None  # noqa: E731
    return pick(dx, need[0]), pick(dgu, need[1]), pick(ddown, need[2]), pick(dw, need[3]), None, None, None, None, None


moe_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


@torch.library.custom_op("symphony::moe_experts_backward", mutates_args=())
def moe_experts_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, gate_up: torch.Tensor,
                            down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                            sorted_pairs: torch.Tensor, gu: torch.Tensor, activation: str,
                            need_hidden: bool, need_gate_up: bool, need_down: bool,
                            need_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts.experts_backward(grad_out.contiguous(), hidden, gate_up, down, weights, ids, offsets,
                                     sorted_pairs, gu, activation,
                                     need_hidden, need_gate_up, need_down, need_weights)


@moe_experts_backward_op.register_fake
def _(grad_out, hidden, gate_up, down, weights, ids, offsets, sorted_pairs, gu, activation,
      need_hidden, need_gate_up, need_down, need_weights):
    def like(t, need):
        return t.new_empty(t.shape) if need else hidden.new_empty(0)

    return like(hidden, need_hidden), like(gate_up, need_gate_up), like(down, need_down), like(weights, need_weights)

# ------------------------------------------------------------------------------------- eager fast path
# Outside torch.compile the same launchers run through plain autograd Functions: the custom-op dispatcher
# costs tens of microseconds per call in Python, which is most of a decode step.


class RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, router_logits, top_k, scoring, renormalize):
        outs = _routing.route_triton(router_logits, top_k, scoring, renormalize)
        ctx.scoring, ctx.renormalize = scoring, renormalize
        ctx.save_for_backward(router_logits, outs[1])
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_weights, *_):
        return _route_backward(ctx, grad_weights)


class ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save):
        out, gu = _experts.experts_forward(hidden, gate_up, down, weights, ids, offsets, sorted_pairs,
                                           activation, save)
        _experts_setup(ctx, (hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save),
                       (out, gu))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 9
        hidden, gate_up, down, weights, ids, offsets, sorted_pairs, gu = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _experts.experts_backward(grad_out.contiguous(), hidden, gate_up, down, weights, ids, offsets,
                                          sorted_pairs, gu, ctx.activation, *need[:4])
        return tuple(g if n else None for g, n in zip(grads, need[:4])) + (None,) * 5


def route(router_logits, top_k, scoring, renormalize):
    """The routing op: the custom op under torch.compile, the autograd Function otherwise."""
    if torch.compiler.is_compiling():
        return route_op(router_logits, top_k, scoring, renormalize)
    return RouteFunction.apply(router_logits, top_k, scoring, renormalize)


def dispatch(topk_ids, num_experts):
    if torch.compiler.is_compiling():
        return dispatch_op(topk_ids, num_experts)
    return _routing.dispatch_triton(topk_ids, num_experts)


def moe_experts(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save):
    """The experts op ([T, d] output): the custom op under torch.compile, the autograd Function otherwise."""
    if torch.compiler.is_compiling():
        return moe_experts_op(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save)[0]
    return ExpertsFunction.apply(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save)
