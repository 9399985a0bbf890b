"""Routed SwiGLU/GeGLU experts as grouped GEMMs: `moe_experts`, forward and backward.

    out[t] = sum_j w[t, j] * down[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])),  e = ids[t, j]

in transformers' layout: gate_up_proj [E, 2f, d] (gate rows, then up rows), down_proj [E, d, f], as in
Qwen2MoeExperts / Qwen3MoeExperts / MixtralExperts, so HF weights are used in place.

Forward, three launches (plus the dispatch when no plan is given, outside decode mode):
1. up GEMM: tokens gathered by expert through the plan, act(gate)*up and the routing weight fused in the
   epilogue -> inter [S, f] (the weight sits here rather than in the down GEMM's epilogue: the same product,
   and the backward's d(down) GEMM can then read `inter` as is instead of scaling rows inside its loop);
2. down GEMM: rows written in (token, slot) order;
   for decode (S = T*k <= 64, or a few more pairs over few experts: `_configs.decode_mode`) every expert's
   program takes its pairs by mask (no dispatch at all) and the down GEMM splits K so that enough programs
   stream the weights;
3. combine: out[t] = sum_j of the k rows of token t in float32, in a fixed order. This is one extra pass
   over [T*k, d] that keeps the result deterministic without float atomics; by bytes it is ~1 % of the
   Mixtral prefill at T = 16384 and ~11 % of the Qwen3-30B-A3B forward at T = 4096 (benchmarks/RESULTS.md).

Backward (`ops.ExpertsFunction` in eager mode, the custom op `symphony::moe_experts` under torch.compile):
d(inter) GEMM with the routing-weight gradient and d(gate_up) in its epilogue (from the saved
pre-activations), the gathered dX GEMM + combine, and per-expert weight-gradient GEMMs
(d(down)[e] = dO[tok]^T inter, d(gate_up)[e] = d(gate_up)^T x[tok]). Deterministic: no
float atomics anywhere.

Precision: products run in the hidden dtype (weights stored in float32 are rounded to it on load, as under
autocast) with float32 accumulation; float32 inputs use IEEE float32 products. float64 hidden states run the
plain-PyTorch reference, as do CPU tensors unless TRITON_INTERPRET=1 (see `_runtime`).

Pairs whose id lies outside [0, E) (transformers' expert-parallel sentinel) contribute nothing.
"""
from __future__ import annotations

import torch

from . import _configs
from ._runtime import MAX_EXPERTS, MAX_PAIRS, MAX_TOP_K, next_pow2, use_triton
from .reference import ACTIVATIONS, moe_experts_reference

_HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACT_CODE = {"silu": 0, "gelu": 1}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        offsets, sorted_pairs = plan.expert_offsets, plan.sorted_pairs
        if tuple(offsets.shape) != (E + 1,) or tuple(sorted_pairs.shape) != (T * k,):
            raise ValueError(f"plan does not match: expert_offsets {tuple(offsets.shape)} should be ({E + 1},), "
                             f"sorted_pairs {tuple(sorted_pairs.shape)} should be ({T * k},)")
        for name, t in (("expert_offsets", offsets), ("sorted_pairs", sorted_pairs)):
            if t.dtype != torch.int32 or t.device != hidden.device:
                raise ValueError(f"plan.{name} must be int32 on {hidden.device}, got {t.dtype} on {t.device}")


# -------------------------------------------------------------------------------------------- launchers
def _meta(hidden, gate_up):
    T, D = hidden.shape
    E, F2, _ = gate_up.shape
    return T, D, E, F2 // 2


def _launch_kw(cfg):
    return dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


def _num_m(decode, S, E, BM):
    return E if decode else _cdiv(S, BM) + E


def _plan_ptrs(decode, ids, offsets, sorted_pairs):
    # Decode tiles never read the plan; pass the ids in its place so that no empty tensor is handed over.
    return (ids, ids) if decode else (offsets, sorted_pairs)


def _down_gemm(a, w, sw_n, sw_k, weights, ids, offsets, sorted_pairs, S, E, N, KD, scale, kernel, ieee, decode):
    """y [split, S, N] in pair order: (a[hrow] @ b[e]) (times w[pair] when `scale`)."""
    from ._experts_fwd import _down_kernel

    interp = a.device.type == "cpu"
    cfg = _configs.pick(kernel, S, E, N, KD, interp, _sm_count(a.device), a.element_size())
    k_split = _cdiv(_cdiv(KD, cfg.split), cfg.BK) * cfg.BK
    split = _cdiv(KD, k_split)
    y = torch.empty((split, S, N), dtype=torch.float32 if split > 1 else a.dtype, device=a.device)
    num_m = _num_m(decode, S, E, cfg.BM)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    _down_kernel[(num_m * _cdiv(N, cfg.BN), split)](
        a, a.stride(0), a.stride(1), w, w.stride(0), sw_n, sw_k, y, y.stride(0), y.stride(1), weights,
        ids, off, srt, S, E, N, KD, k_split, num_m,
        EP=next_pow2(E), DECODE=decode, SCALE=scale, IEEE=ieee, **_launch_kw(cfg))
    return y


def _combine(y, ids, T, N, E, k, dtype):
    from ._experts_fwd import _combine_kernel

    out = torch.empty((T, N), dtype=dtype, device=y.device)
    BN = min(256, next_pow2(N))
    BT = max(1, min(64, 2048 // BN))
    _combine_kernel[(_cdiv(T, BT), _cdiv(N, BN))](y, y.stride(0), y.stride(1), out, out.stride(0), ids,
                                                  T, N, E, y.shape[0], TOPK=k, BT=BT, BN=BN, num_warps=4)
    return out


_SM_COUNTS: dict = {}


def _sm_count(device):
    if device.type != "cuda":
        return _configs.SM_COUNT_DEFAULT
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def up_gemm(hidden, gate_up, weights, ids, offsets, sorted_pairs, activation: str, save: bool):
    """(inter [S, f] = w * act(gate) * up, gate_up pre-activations [S, 2f] or [0]): the first grouped GEMM."""
    from ._experts_fwd import _up_kernel

    T, D, E, F = _meta(hidden, gate_up)
    k = ids.shape[1]
    S = T * k
    dev, dt = hidden.device, hidden.dtype
    decode = _configs.decode_mode(S, E)
    inter = torch.empty((S, F), dtype=dt, device=dev)
    gu = torch.empty((S, 2 * F) if save else (0,), dtype=dt, device=dev)
    cfg = _configs.pick("up", S, E, F, D, dev.type == "cpu", _sm_count(dev), hidden.element_size())
    num_m = _num_m(decode, S, E, cfg.BM)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    _up_kernel[(num_m * _cdiv(F, cfg.BN),)](
        hidden, hidden.stride(0), hidden.stride(1), gate_up, *gate_up.stride(), inter, inter.stride(0),
        gu, gu.stride(0) if save else 0, weights, ids, off, srt, S, E, F, D, num_m,
        TOPK=k, EP=next_pow2(E), DECODE=decode, SAVE=save, ACT=_ACT_CODE[activation],
        IEEE=dt == torch.float32, **_launch_kw(cfg))
    return inter, gu


def experts_forward(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation: str, save: bool):
    """(out [T, d], gate_up pre-activations [S, 2f] or [0], inter [S, f] or [0]) through the kernels.
    `ids`/`weights` contiguous [T, k]; offsets/sorted_pairs the plan (unused in decode mode)."""
    T, D, E, F = _meta(hidden, gate_up)
    k = ids.shape[1]
    S = T * k
    decode = _configs.decode_mode(S, E)
    inter, gu = up_gemm(hidden, gate_up, weights, ids, offsets, sorted_pairs, activation, save)
    y = _down_gemm(inter, down, down.stride(1), down.stride(2), weights, ids, offsets, sorted_pairs,
                   S, E, D, F, False, "down", hidden.dtype == torch.float32, decode)
    out = _combine(y, ids, T, D, E, k, hidden.dtype)
    return out, gu, (inter if save else inter.new_empty(0))


def experts_backward(grad_out, hidden, gate_up, down, weights, ids, offsets, sorted_pairs, gu, inter,
                     activation: str, need_hidden: bool, need_gate_up: bool, need_down: bool, need_weights: bool):
    """(d hidden, d gate_up, d down, d weights), each an empty tensor when not needed. `inter` is the saved
    weighted intermediate w * act(gate) * up, `gu` the saved pre-activations."""
    from ._experts_bwd import _dinter_kernel, _wgrad_kernel

    T, D, E, F = _meta(hidden, gate_up)
    k = ids.shape[1]
    S = T * k
    dev, dt = hidden.device, hidden.dtype
    decode = _configs.decode_mode(S, E)
    ieee = dt == torch.float32
    interp = dev.type == "cpu"
    sms = _sm_count(dev)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    d_hidden, d_gate_up, d_down, d_weights = (hidden.new_empty(0) for _ in range(4))
    grad_out = grad_out.to(dt)

    if need_hidden or need_gate_up or need_weights:
        cfg = _configs.pick("dinter", S, E, F, D, interp, sms, hidden.element_size())
        num_m = _num_m(decode, S, E, cfg.BM)
        num_n = _cdiv(F, cfg.BN)
        dgu = torch.empty((S, 2 * F), dtype=dt, device=dev)
        dwp = torch.empty((num_n, S), dtype=torch.float32, device=dev)
        _dinter_kernel[(num_m * num_n,)](
            grad_out, grad_out.stride(0), grad_out.stride(1), down, down.stride(0), down.stride(2), down.stride(1),
            gu, gu.stride(0), dgu, dgu.stride(0), weights, dwp, ids, off, srt, S, E, F, D, num_m,
            TOPK=k, EP=next_pow2(E), DECODE=decode, ACT=_ACT_CODE[activation], IEEE=ieee, **_launch_kw(cfg))
        if need_weights:
            flat_ids = ids.reshape(-1)
            if decode:
                live = (flat_ids >= 0) & (flat_ids < E)
                dw = torch.where(live, dwp.sum(0), torch.zeros_like(dwp[0]))
            else:
                live = torch.arange(S, device=dev) < offsets[E]
                vals = torch.where(live, dwp.sum(0), torch.zeros_like(dwp[0]))
                dw = torch.zeros_like(vals).scatter_(0, sorted_pairs.long(), vals)
            d_weights = dw.view(T, k).to(weights.dtype)
        if need_hidden:
            y = _down_gemm(dgu, gate_up, gate_up.stride(2), gate_up.stride(1), weights, ids, offsets, sorted_pairs,
                           S, E, D, 2 * F, False, "dx", ieee, decode)
            d_hidden = _combine(y, ids, T, D, E, k, dt)
        if need_gate_up:
            d_gate_up = _wgrad(dgu, False, hidden, True, False, weights, ids, offsets, sorted_pairs,
                               S, E, 2 * F, D, gate_up.dtype, k, decode, ieee, interp, sms)
    if need_down:
        d_down = _wgrad(grad_out, True, inter, False, False, weights, ids, offsets, sorted_pairs,
                        S, E, D, F, down.dtype, k, decode, ieee, interp, sms)
    return d_hidden, d_gate_up, d_down, d_weights


def _wgrad(a, a_by_token, b, b_by_token, scale_a, weights, ids, offsets, sorted_pairs, S, E, M, N, out_dtype,
           k, decode, ieee, interp, sms):
    """dW [E, M, N] = per expert, sum over its rows of a[row]^T b[row]."""
    from ._experts_bwd import _wgrad_kernel

    cfg = _configs.pick("wgrad", S, E, N, M, interp, sms, a.element_size())
    out = torch.empty((E, M, N), dtype=out_dtype, device=a.device)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    _wgrad_kernel[(_cdiv(M, cfg.BM) * _cdiv(N, cfg.BN), E)](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), weights, out, *out.stride(),
        ids, off, srt, S, E, M, N, TOPK=k, A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE_A=scale_a,
        DECODE=decode, IEEE=ieee, **_launch_kw(cfg))
    return out


# -------------------------------------------------------------------------------------------- public API
def moe_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: str = "silu",
                plan=None) -> torch.Tensor:
    """[T, d] output of the routed experts (see the module docstring), in hidden's dtype.

    hidden [T, d]; gate_up_proj [E, 2f, d] and down_proj [E, d, f] in float32 or hidden's dtype;
    topk_weights [T, k] float; topk_ids [T, k] integer; activation "silu" or "gelu"; `plan`: a
    `RoutingPlan` (or anything with `expert_offsets` and `sorted_pairs`) of these ids, to skip the dispatch.
    Differentiable in hidden, both weights and topk_weights. Non-contiguous inputs are accepted.
    """
    check_experts_args(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, activation, plan)
    T, k = topk_ids.shape
    E = gate_up_proj.shape[0]
    if hidden.dtype == torch.float64 or not use_triton(hidden.device):
        dt = hidden.dtype
        live = (topk_ids >= 0) & (topk_ids < E)  # dropped pairs: expert 0 with weight 0
        weights = torch.where(live, topk_weights, torch.zeros_like(topk_weights))
        ids = torch.where(live, topk_ids, torch.zeros_like(topk_ids))
        return moe_experts_reference(hidden, gate_up_proj.to(dt), down_proj.to(dt), weights, ids, activation)
    if T == 0:
        # Keep the result attached to every input so that backward gives (zero) gradients.
        zero = (gate_up_proj[:0].sum() + down_proj[:0].sum() + topk_weights[:0].sum()).to(hidden.dtype)
        return hidden[:0] * 1 + zero
    from . import ops

    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    if _configs.decode_mode(T * k, E):
        offsets = sorted_pairs = ids  # unused by decode tiles
    elif plan is not None:
        offsets, sorted_pairs = plan.expert_offsets, plan.sorted_pairs
    else:
        _, offsets, sorted_pairs = ops.dispatch(ids, E)
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, gate_up_proj, down_proj, topk_weights))
    return ops.moe_experts(hidden, gate_up_proj, down_proj, weights, ids, offsets, sorted_pairs, activation, save)
