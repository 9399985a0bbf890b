"""Launchers of the experts kernels (`_experts_fwd`, `_experts_bwd`): tile configurations, grids and output buffers.
No checks here: `experts.moe_experts` checks its inputs; `ops` wraps these as custom ops and autograd Functions."""
from __future__ import annotations

import torch

from . import _configs
from ._runtime import next_pow2

_ACT_CODE = {"silu": 0, "gelu": 1}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    from ._experts_bwd import _dinter_kernel

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
