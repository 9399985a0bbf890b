"""Launchers of the experts kernels (`_experts_fwd`, `_experts_bwd`): tile configurations, grids, output buffers.

No checks here: `experts.moe_experts` checks its inputs; `ops` wraps these as custom ops and autograd Functions.
Each `*_call` function collects the launches of one step into a `_launch.Call` (not yet run) and returns it
with the output buffers, so that the caller can see whether every kernel variant is compiled before any
runs; the plain functions (`experts_forward`, `experts_backward`) build and run at once. Inputs must have a
unit inner stride (`experts.moe_experts` makes them so); sizes and strides go to the kernels in units of the
largest power of two <= 16 that divides them all (`_al`, see `_experts_fwd`).
"""
from __future__ import annotations

import math

import torch

from . import _configs
from ._launch import Call, Kernel
from ._runtime import next_pow2

_ACT_CODE = {"silu": 0, "gelu": 1}
_KERNELS: dict[str, Kernel] = {}


def _kernel(name: str) -> Kernel:
    """The wrapped kernel `name` of _experts_fwd / _experts_bwd (imported at first use: importing the package
    compiles nothing and does not import triton.language)."""
    k = _KERNELS.get(name)
    if k is None:
        from . import _experts_bwd, _experts_fwd

        k = _KERNELS[name] = Kernel(getattr(_experts_fwd, name, None) or getattr(_experts_bwd, name))
    return k


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _al(*values: int) -> int:
    """The largest power of two <= 16 that divides every value (16 when all are 0)."""
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return 16 if g == 0 else min(16, g & -g)


def _units(al: int, *values: int) -> tuple:
    return tuple(v // al for v in values)


def _meta(cfg, **constexprs) -> tuple:
    return tuple(constexprs.items()) + (("BM", cfg.BM), ("BN", cfg.BN), ("BK", cfg.BK), ("GROUP_M", cfg.GROUP_M),
                                        ("num_warps", cfg.num_warps), ("num_stages", cfg.num_stages))


def _num_m(decode, S, E, BM):
    return S if decode == 2 else E if decode else _cdiv(S, BM) + E


def _plan_ptrs(decode, ids, offsets, sorted_pairs):
    # Decode tiles never read the plan; pass the ids in its place so that no empty tensor is handed over.
    return (ids, ids) if decode else (offsets, sorted_pairs)


_SM_COUNTS: dict = {}


def _sm_count(device):
    if device.type == "meta" and torch.cuda.is_available():  # warmup plans on meta tensors for the current GPU
        device = torch.device("cuda")
    if device.type != "cuda":
        return _configs.SM_COUNT_DEFAULT
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def _pick(kernel, S, E, N, K, t: torch.Tensor):
    return _configs.pick(kernel, S, E, N, K, t.device.type == "cpu", _sm_count(t.device), t.element_size())


# ------------------------------------------------------------------------------------------------ forward
def _up(call, hidden, gate_up, weights, ids, offsets, sorted_pairs, activation, save, decode):
    T, D = hidden.shape
    E, F2, _ = gate_up.shape
    F, k = F2 // 2, ids.shape[1]
    S = T * k
    dev, dt = hidden.device, hidden.dtype
    inter = torch.empty((S, F), dtype=dt, device=dev)
    gu = torch.empty((S, 2 * F), dtype=dt, device=dev) if save else inter  # not written unless SAVE
    call.buffers["inter"] = inter
    if save:
        call.buffers["gu"] = gu
    cfg = _pick("up", S, E, F, D, hidden)
    num_m = _num_m(decode, S, E, cfg.BM)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    sx, swe, swn, si, sg = hidden.stride(0), gate_up.stride(0), gate_up.stride(1), F, 2 * F if save else 0
    al = _al(sx, swe, swn, si, sg, F, D)
    sx, swe, swn, si, sg, uF, uD = _units(al, sx, swe, swn, si, sg, F, D)
    call.add(_kernel("_up_kernel"), (num_m * _cdiv(F, cfg.BN),),
             (hidden, sx, gate_up, swe, swn, inter, si, gu, sg, weights, ids, off, srt, S, E, uF, uD, num_m),
             _meta(cfg, TOPK=k, EP=next_pow2(E), DECODE=decode, SAVE=save, ACT=_ACT_CODE[activation],
                   IEEE=dt == torch.float32, AL=al))
    return inter, gu


def _down(call, a, w, kmajor, weights, ids, offsets, sorted_pairs, S, E, N, KD, kernel, decode, k=1, into=None):
    """y [split, S, N]: a[hrow] @ b[e] in pair order, b[k, n] = w[e, n, k] (kmajor) or w[e, k, n]; for
    kernel "dinter", a[token] @ b[e] in intermediate-row order, written into `into` ([S, >= N], a's dtype)
    when there is one split (y is then a view of it)."""
    cfg = _pick(kernel, S, E, N, KD, a)
    k_split = _cdiv(_cdiv(KD, cfg.split), cfg.BK) * cfg.BK
    split = _cdiv(KD, k_split)
    dinter = kernel == "dinter"
    if into is not None and split == 1:
        y = into[:, :N].unsqueeze(0)
        sys_, syr = S * into.stride(0), into.stride(0)
    else:
        y = torch.empty((split, S, N), dtype=torch.float32 if split > 1 else a.dtype, device=a.device)
        sys_, syr = S * N, N
    call.buffers[f"y_{kernel}"] = y
    num_m = _num_m(decode, S, E, cfg.BM)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    sa, swe, swr = a.stride(0), w.stride(0), w.stride(1)
    al = _al(sa, swe, swr, sys_, syr, N, KD, k_split)
    sa, swe, swr, sys_, syr, uN, uKD, uks = _units(al, sa, swe, swr, sys_, syr, N, KD, k_split)
    call.add(_kernel("_down_kernel"), (num_m * _cdiv(N, cfg.BN), split),
             (a, sa, w, swe, swr, y, sys_, syr, weights, ids, off, srt, S, E, uN, uKD, uks, num_m),
             _meta(cfg, EP=next_pow2(E), DECODE=decode, SCALE=False, IEEE=a.dtype == torch.float32,
                   B_KMAJOR=kmajor, AL=al, TOPK=k, A_BY_TOKEN=dinter, Y_BY_HROW=dinter))
    return y


def _combine(call, y, ids, T, N, E, k, dtype):
    out = torch.empty((T, N), dtype=dtype, device=y.device)
    call.buffers["out"] = out
    BN = min(256, next_pow2(N))
    BT = max(1, min(64, 2048 // BN))
    split, S = y.shape[0], y.shape[1]
    al = _al(S * N, N)
    call.add(_kernel("_combine_kernel"), (_cdiv(T, BT), _cdiv(N, BN)),
             (y, S * N // al, N // al, out, N // al, ids, T, N // al, E, split),
             (("TOPK", k), ("AL", al), ("BT", BT), ("BN", BN), ("num_warps", 4)))
    return out


def forward_call(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation: str, save: bool):
    """(call, out [T, d], gate_up pre-activations [S, 2f] or [0]): the forward's launches, not yet run.
    `ids`/`weights` contiguous [T, k]; offsets/sorted_pairs the plan (unused in decode mode)."""
    T, D = hidden.shape
    E, F2, _ = gate_up.shape
    k = ids.shape[1]
    S = T * k
    decode = _configs.decode_mode(S, E)
    call = Call(hidden.device)
    inter, gu = _up(call, hidden, gate_up, weights, ids, offsets, sorted_pairs, activation, save, decode)
    y = _down(call, inter, down, True, weights, ids, offsets, sorted_pairs, S, E, D, F2 // 2, "down", decode)
    out = _combine(call, y, ids, T, D, E, k, hidden.dtype)
    return call, out, (gu if save else inter.new_empty(0))


def experts_forward(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation: str, save: bool):
    """(out [T, d], gate_up pre-activations [S, 2f] or [0]) through the kernels."""
    call, out, gu = forward_call(hidden, gate_up, down, weights, ids, offsets, sorted_pairs, activation, save)
    call.run()
    return out, gu


# ----------------------------------------------------------------------------------------------- backward
def experts_backward(grad_out, hidden, gate_up, down, weights, ids, offsets, sorted_pairs, gu,
                     activation: str, need_hidden: bool, need_gate_up: bool, need_down: bool, need_weights: bool):
    """(d hidden, d gate_up, d down, d weights), each an empty tensor when not needed. `gu` is the saved
    pre-activations; the weighted intermediate w * act(gate) * up that d down needs is recomputed from them
    by the activation-backward pass (the forward keeps [S, 2f] for the backward, not [S, 3f])."""
    T, D = hidden.shape
    E, F2, _ = gate_up.shape
    F, k = F2 // 2, ids.shape[1]
    S = T * k
    dev, dt = hidden.device, hidden.dtype
    decode = _configs.decode_mode(S, E)
    d_hidden, d_gate_up, d_down, d_weights = (hidden.new_empty(0) for _ in range(4))
    grad_out = grad_out.to(dt).contiguous()
    call = Call(dev)

    grads = need_hidden or need_gate_up or need_weights
    dgu = y = None
    if grads:
        dgu = torch.empty((S, 2 * F), dtype=dt, device=dev)
        y = _down(call, grad_out, down, False, weights, ids, offsets, sorted_pairs, S, E, F, D, "dinter", decode,
                  k=k, into=dgu)
    inter = torch.empty((S, F), dtype=dt, device=dev) if need_down else None
    if grads or need_down:
        dw = _dact(call, y, gu, dgu, inter, weights, ids, offsets, sorted_pairs, S, E, F, activation, decode)
    if need_down:
        d_down = _wgrad(call, grad_out, True, inter, False, weights, ids, offsets, sorted_pairs,
                        S, E, D, F, down.dtype, k, decode)
    # Memory: what only the steps so far read (the d(inter) partials, the recomputed intermediate, row-ordered
    # copies) is released before the rest allocates; run what is queued, then drop the references.
    call.flush()
    y = inter = None
    if grads:
        if need_hidden:
            y = _down(call, dgu, gate_up, False, weights, ids, offsets, sorted_pairs, S, E, D, 2 * F, "dx", decode)
            d_hidden = _combine(call, y, ids, T, D, E, k, dt)
        if need_gate_up:
            d_gate_up = _wgrad(call, dgu, False, hidden, True, weights, ids, offsets, sorted_pairs,
                               S, E, 2 * F, D, gate_up.dtype, k, decode)
    call.run()
    if need_weights:  # after the launches: a dtype conversion queued before them would read nothing yet
        d_weights = dw.view(T, k).to(weights.dtype)
    return d_hidden, d_gate_up, d_down, d_weights


def _dact(call, y, gu, dgu, inter, weights, ids, offsets, sorted_pairs, S, E, F, activation, decode):
    """dw [S] (float32, pair order) and d(gate_up) [S, 2f] written into dgu, from y = the d(inter) partials
    (when dgu is given); the weighted intermediate [S, f] written into `inter` (when given)."""
    grads = dgu is not None
    dw = torch.empty(S if grads else 0, dtype=torch.float32, device=gu.device)
    call.buffers["dw"] = dw
    split = y.shape[0] if grads else 1
    in_place = grads and split == 1  # `_down` wrote one split into dgu itself
    sdgu = dgu.stride(0) if grads else 0
    sys_, syr = (0, 0) if not grads else (S * sdgu, sdgu) if in_place else (y.stride(0), y.stride(1))
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    BN = min(256, next_pow2(F))
    BR = max(1, min(16, 2048 // BN))
    al = _al(sys_, syr, gu.stride(0), sdgu, F)
    sys_, syr, sgu, usdgu, uF = _units(al, sys_, syr, gu.stride(0), sdgu, F)
    # Absent outputs are given a tensor of the right dtype that the kernel never touches (flags off).
    call.add(_kernel("_dact_kernel"), (_cdiv(S, BR),),
             (y if grads else gu, sys_, syr, gu, sgu, dgu if grads else gu, usdgu,
              inter if inter is not None else gu, weights, dw if grads else weights, ids, off, srt, S, E, uF),
             (("SPLIT", split), ("DECODE", decode), ("GRADS", grads), ("IN_PLACE", in_place),
              ("INTER", inter is not None), ("ACT", _ACT_CODE[activation]), ("AL", al), ("BR", BR), ("BN", BN),
              ("num_warps", 4)))
    return dw


# The weight-gradient GEMMs reduce over rows: an operand gathered by token inside their loop puts a dependent
# index load on every step. With this on, such an operand is first copied into row order ([S, d], one gather)
# and the kernel reads rows directly. (A switch for the benchmarks to compare; on unless they say otherwise.)
GATHER_ROWS = True


def _in_row_order(t, decode, sorted_pairs, S, k):
    """t[token of intermediate row r] for every row r < S (pair ids in decode mode, sorted positions else)."""
    rows = torch.arange(S, device=t.device, dtype=torch.int32) if decode else sorted_pairs[:S]
    return t.index_select(0, torch.div(rows, k, rounding_mode="floor"))


# On Hopper, bf16 weight gradients of the sorted (non-decode) path go to torch._grouped_mm's 2D x 2D form
# (cuBLAS's grouped GEMM, reducing over each expert's rows), measured 1.27-1.51x faster than the Triton kernel
# on the benchmark shapes (benchmarks/bench_wgrad.py; RESULTS.md, "Training"). Everything else runs
# `_wgrad_kernel`.
GROUPED_MM_WGRAD = True
_CAPABILITY: dict = {}


def _grouped_mm_wgrad(a, b, out_dtype, decode, M, N) -> bool:
    if not (GROUPED_MM_WGRAD and not decode and a.is_cuda and a.dtype == b.dtype == out_dtype == torch.bfloat16
            and M % 8 == 0 and N % 8 == 0 and hasattr(torch, "_grouped_mm")):
        return False
    idx = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx][0] == 9


def _wgrad(call, a, a_by_token, b, b_by_token, weights, ids, offsets, sorted_pairs, S, E, M, N, out_dtype, k,
           decode):
    """dW [E, M, N] = per expert, sum over its rows of a[row]^T b[row]."""
    if GATHER_ROWS and S:  # the inputs are ready (the call's launches only write other buffers)
        if a_by_token:
            a, a_by_token = _in_row_order(a, decode, sorted_pairs, S, k), False
        if b_by_token:
            b, b_by_token = _in_row_order(b, decode, sorted_pairs, S, k), False
        if _grouped_mm_wgrad(a, b, out_dtype, decode, M, N):
            call.flush()  # a or b may be what the launches so far write
            # Expert e reduces over sorted rows offsets[e]..offsets[e+1]; rows past offsets[E] (dropped pairs)
            # belong to no group.
            return torch._grouped_mm(a.t(), b, offs=offsets[1:E + 1])
    cfg = _pick("wgrad", S, E, N, M, a)
    out = torch.empty((E, M, N), dtype=out_dtype, device=a.device)
    off, srt = _plan_ptrs(decode, ids, offsets, sorted_pairs)
    sa, sb, soe, som = a.stride(0), b.stride(0), out.stride(0), out.stride(1)
    al = _al(sa, sb, soe, som, M, N)
    sa, sb, soe, som, uM, uN = _units(al, sa, sb, soe, som, M, N)
    call.add(_kernel("_wgrad_kernel"), (_cdiv(M, cfg.BM) * _cdiv(N, cfg.BN), E),
             (a, sa, b, sb, weights, out, soe, som, ids, off, srt, S, E, uM, uN),
             _meta(cfg, TOPK=k, A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE_A=False, DECODE=decode,
                   IEEE=a.dtype == torch.float32, AL=al))
    return out


def up_gemm(hidden, gate_up, weights, ids, offsets, sorted_pairs, activation: str, save: bool):
    """(inter, gate_up pre-activations): the first grouped GEMM alone (for the tuning sweep)."""
    E = gate_up.shape[0]
    call = Call(hidden.device)
    out = _up(call, hidden, gate_up, weights, ids, offsets, sorted_pairs, activation, save,
              _configs.decode_mode(ids.numel(), E))
    call.run()
    return out


def down_gemm(a, w, weights, ids, offsets, sorted_pairs, S, E, N, KD, kernel="down"):
    """y [split, S, N]: the second grouped GEMM alone (for the tuning sweep); w is read K-major."""
    call = Call(a.device)
    y = _down(call, a, w, True, weights, ids, offsets, sorted_pairs, S, E, N, KD, kernel,
              _configs.decode_mode(S, E))
    call.run()
    return y
