"""Routed SwiGLU/GeGLU experts as grouped GEMMs: `moe_experts`, forward and backward.

    out[t] = sum_j w[t, j] * down[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])),  e = ids[t, j]

in transformers' layout: gate_up_proj [E, 2f, d] (gate rows, then up rows), down_proj [E, d, f], as in
Qwen2MoeExperts / Qwen3MoeExperts / MixtralExperts, so HF weights are used in place.

Forward, three launches (plus the dispatch when no plan is given, outside decode mode):
1. up GEMM: tokens gathered by expert through the plan, act(gate)*up and the routing weight fused in the
   epilogue -> inter [S, f] (the weight sits here rather than in the down GEMM's epilogue: the same product);
   with grad mode on, the gate/up pre-activations [S, 2f] are stored too: the one activation kept for the
   backward;
2. down GEMM: rows written in (token, slot) order;
   for decode (few pairs: `_configs.decode_mode`) every expert's program takes its pairs by mask, or every
   pair has a program row of its own (no dispatch at all) and the down GEMM splits K so that enough programs
   stream the weights;
3. combine: out[t] = sum_j of the k rows of token t in float32, in a fixed order. This is one extra pass
   over [T*k, d] that keeps the result deterministic without float atomics; by bytes it is ~1 % of the
   Mixtral prefill at T = 16384 and ~11 % of the Qwen3-30B-A3B forward at T = 4096 (benchmarks/RESULTS.md).

Backward (`ops.ExpertsFunction` in eager mode, the custom op `symphony::moe_experts` under torch.compile):
the d(inter) GEMM G = dO[tok] @ down[e] (the down kernel with rows gathered by token); one row pass for the
activation backward (d(gate_up) and the routing-weight gradient, from G and the saved pre-activations) that
also recomputes inter = w * act(gate) * up; the gathered dX GEMM + combine; per-expert weight-gradient GEMMs
(d(down)[e] = dO[tok]^T inter, d(gate_up)[e] = d(gate_up)^T x[tok], the by-token operand copied into row order
first; bf16 gradients on Hopper through torch._grouped_mm, cuBLAS's grouped GEMM, which measured faster there).
Deterministic: no float atomics anywhere (the grouped_mm gradients are bitwise repeatable, tested on the GPU).

Precision: products run in the hidden dtype (weights stored in float32 are rounded to it on load, as under
autocast) with float32 accumulation; float32 inputs use IEEE float32 products. float64 hidden states run the
plain-PyTorch reference, as do CPU tensors unless TRITON_INTERPRET=1 (see `_runtime`).

Pairs whose id lies outside [0, E) (transformers' expert-parallel sentinel) contribute nothing.
"""
from __future__ import annotations

import torch

from . import _configs, _experts_launch, _fallback, _launch, _routing_launch, ops
from .routing import check_plan
from ._runtime import MAX_EXPERTS, MAX_PAIRS, MAX_TOP_K, use_triton
from .reference import ACTIVATIONS, moe_experts_reference

_HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ----------------------------------------------------------------------------------------------- checks
def check_experts_args(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, activation, plan):
    names = ("hidden", "gate_up_proj", "down_proj", "topk_weights", "topk_ids")
    tensors = (hidden, gate_up_proj, down_proj, topk_weights, topk_ids)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    for name, t, rank in zip(names, tensors, (2, 3, 3, 2, 2)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    T, d = hidden.shape
    E, f2, d1 = gate_up_proj.shape
    if f2 % 2 or f2 == 0:
        raise ValueError("gate_up_proj must be [E, 2f, d] with gate then up rows, "
                         f"got shape {tuple(gate_up_proj.shape)}")
    f = f2 // 2
    if d1 != d or d == 0:
        raise ValueError(f"gate_up_proj {tuple(gate_up_proj.shape)} does not match hidden size d = {d}")
    if tuple(down_proj.shape) != (E, d, f):
        raise ValueError(f"down_proj must be [E, d, f] = {(E, d, f)}, got {tuple(down_proj.shape)}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in [1, {MAX_EXPERTS}], got {E}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
                         f"must both be [T={T}, k]")
    k = topk_ids.shape[1]
    if not 1 <= k <= min(E, MAX_TOP_K):
        raise ValueError(f"top_k must be in [1, min(num_experts={E}, {MAX_TOP_K})], got {k}")
    if T * k > MAX_PAIRS:
        raise ValueError(f"tokens * top_k = {T * k} exceeds {MAX_PAIRS} (int32 pair ids)")
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float16/bfloat16/float32/float64, not {hidden.dtype}")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype not in (hidden.dtype, torch.float32):
            raise TypeError(f"{name} must be float32 or hidden's dtype {hidden.dtype}, not {w.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a float tensor, not {topk_weights.dtype}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, not {topk_ids.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on device {t.device} but hidden is on device {hidden.device}")
    if plan is not None:
        check_plan(plan, topk_ids, E)


# -------------------------------------------------------------------------------------------- public API
def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy with a unit inner stride (what the kernels read; transformers' weights already are)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def moe_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: str = "silu",
                plan=None) -> torch.Tensor:
    """[T, d] output of the routed experts (see the module docstring), in hidden's dtype.

    hidden [T, d]; gate_up_proj [E, 2f, d] and down_proj [E, d, f] in float32 or hidden's dtype;
    topk_weights [T, k] float; topk_ids [T, k] integer; activation "silu" or "gelu"; `plan`: the
    `RoutingPlan` that `route` made for these very ids (its `topk_ids`), to skip the dispatch; any other plan
    is refused. Differentiable in hidden, both weights and topk_weights. Non-contiguous inputs are accepted
    (copied when their inner stride is not 1). In eager inference on CUDA a call whose kernels are still
    compiling runs on torch's grouped GEMM meanwhile (see `_launch`).
    """
    sig = _signature(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, activation, plan)
    replay = _REPLAYS.get(sig) if sig is not None else None
    if replay is not None and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (hidden, gate_up_proj, down_proj, topk_weights))):
        # The same shapes, dtypes and strides as an earlier call that passed every check and ran the kernels.
        if plan is not None:
            check_plan(plan, topk_ids, gate_up_proj.shape[0])
        tensors = {"hidden": hidden, "gate_up": gate_up_proj, "down": down_proj, "weights": topk_weights,
                   "ids": topk_ids}
        if plan is not None:
            tensors["offsets"], tensors["sorted_pairs"] = plan.expert_offsets, plan.sorted_pairs
        if all(t.data_ptr() % 16 == 0 for t in tensors.values()) and _launch._no_launch_hook():
            return replay.run(tensors)["out"]
    check_experts_args(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, activation, plan)
    T, k = topk_ids.shape
    E = gate_up_proj.shape[0]
    if hidden.device.type == "meta":
        return hidden.new_empty(hidden.shape)
    if hidden.dtype == torch.float64 or not use_triton(hidden.device) or (
            hidden.device.type == "cpu" and torch.bfloat16 in (hidden.dtype, gate_up_proj.dtype, down_proj.dtype)):
        # (bf16 products are wrong under Triton's CPU interpreter: the reference answers there)
        dt = hidden.dtype
        live = (topk_ids >= 0) & (topk_ids < E)  # dropped pairs: expert 0 with weight 0
        weights = torch.where(live, topk_weights, torch.zeros_like(topk_weights))
        ids = torch.where(live, topk_ids, torch.zeros_like(topk_ids))
        return moe_experts_reference(hidden, gate_up_proj.to(dt), down_proj.to(dt), weights, ids, activation)
    if T == 0:
        # Keep the result attached to every input so that backward gives (zero) gradients.
        zero = (gate_up_proj[:0].sum() + down_proj[:0].sum() + topk_weights[:0].sum()).to(hidden.dtype)
        return hidden[:0] * 1 + zero
    hidden_in = hidden
    hidden, gate_up, down = _unit_inner(hidden), _unit_inner(gate_up_proj), _unit_inner(down_proj)
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, gate_up_proj, down_proj, topk_weights))
    decode = _configs.decode_mode(T * k, E)
    if not save and not torch.compiler.is_compiling():
        uncopied = hidden is hidden_in and gate_up is gate_up_proj and down is down_proj and ids is topk_ids \
            and weights is topk_weights
        return _inference(hidden, gate_up, down, weights, ids, activation, plan, decode, sig if uncopied else None)
    if decode:
        offsets = sorted_pairs = ids  # unused by decode tiles
    elif plan is not None:
        offsets, sorted_pairs = plan.expert_offsets, plan.sorted_pairs
    else:
        _, offsets, sorted_pairs = ops.dispatch(ids, E)
    return ops.moe_experts(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save)


# Replays of earlier eager inference calls (see `_launch.Replay`), by `_signature`; at most _MAX_REPLAYS.
_REPLAYS: dict = {}
_MAX_REPLAYS = 256


def _signature(hidden, gate_up, down, weights, ids, activation, plan):
    """What decides a call's launches besides the data: shapes, strides, dtypes, devices, the activation and
    whether a plan is given. None for anything but CUDA tensors (or not tensors at all)."""
    try:
        if not hidden.is_cuda or type(activation) is not str:
            return None
        return (hidden.shape, hidden.stride(), hidden.dtype, hidden.device, gate_up.shape, gate_up.stride(),
                gate_up.dtype, gate_up.device, down.shape, down.stride(), down.dtype, down.device, weights.shape,
                weights.stride(), weights.dtype, weights.device, ids.shape, ids.stride(), ids.dtype, ids.device,
                activation, plan is None)
    except AttributeError:
        return None


def _inference(hidden, gate_up, down, weights, ids, activation, plan, decode, sig=None):
    """Eager, no gradient: the launches straight from here (no autograd Function, no custom op); while any of
    them is still compiling, torch's grouped GEMM computes this call (`_fallback`) and the kernels compile in
    the background (`_launch.may_defer`). Once a call has run on compiled kernels, later calls of the same
    signature replay its launches (`_launch.Replay`)."""
    E = gate_up.shape[0]
    dispatch = None
    if decode:
        offsets = sorted_pairs = ids
    elif plan is not None:
        offsets, sorted_pairs = plan.expert_offsets, plan.sorted_pairs
    else:
        dispatch, (_, offsets, sorted_pairs) = _routing_launch.dispatch_call(ids, E)
    call, out, _ = _experts_launch.forward_call(hidden, gate_up, down, weights, ids, offsets, sorted_pairs,
                                                activation, False)
    if hidden.is_cuda and not (call.ready() and (dispatch is None or dispatch.ready())) and _launch.may_defer(False) \
            and _fallback.available(hidden, gate_up, down):
        call.compile_in_background()
        if dispatch is not None:
            dispatch.compile_in_background()
        return _fallback.moe_experts(hidden, gate_up, down, weights, ids, activation)
    calls = [call] if dispatch is None else [dispatch, call]
    for c in calls:
        c.run()
    if sig is not None and sig not in _REPLAYS:  # (a None entry: not replayable)
        _remember(sig, calls, hidden, gate_up, down, weights, ids, plan)
    return out


def _remember(sig, calls, hidden, gate_up, down, weights, ids, plan):
    """Record a Replay of this call's launches under `sig` (when they all take the short path and are compiled;
    the inputs must be the caller's own tensors, not copies)."""
    user = {"hidden": hidden, "gate_up": gate_up, "down": down, "weights": weights, "ids": ids}
    if plan is not None:
        user["offsets"], user["sorted_pairs"] = plan.expert_offsets, plan.sorted_pairs
    if not (hidden.is_contiguous() and gate_up.is_contiguous() and down.is_contiguous() and weights.is_contiguous()
            and ids.is_contiguous()):
        _REPLAYS[sig] = None  # never replayable (the signature fixes the strides): do not try again
        return
    replay = _launch.Replay.record(calls, user)
    if replay is not None:
        if len(_REPLAYS) >= _MAX_REPLAYS:
            _REPLAYS.pop(next(iter(_REPLAYS)))
        _REPLAYS[sig] = replay
