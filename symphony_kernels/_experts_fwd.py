"""Triton kernels of the experts forward (and the gathered GEMMs its backward reuses).

- `_up_kernel`: inter[hrow, n] = w[pair] * act(x[tok] @ gate[e, n]^T) * (x[tok] @ up[e, n]^T): the gate
  and up rows n and f+n of one tile form one [BK, 2*BN] operand (one MMA per step), so activation-times-up
  and the routing weight are the epilogue; the pre-activations are stored too when the backward needs them.
  x rows are gathered through the pair ids.
- `_down_kernel`: y[split, pair, n] = a[hrow] @ b[e][:, n] over one slice of K (split-K for decode and small
  batches, where N alone gives too few programs); rows are scattered to pair order. The backward uses it for
  dX per pair (a = d(gate_up), b = gate_up[e]).
- `_combine_kernel`: out[t] = sum over slots j (then splits) of y[split, t*k + j] in float32, in a fixed
  order (deterministic, no atomics); dropped pairs are skipped. This is the one extra pass over [T*k, d].

All pointer arithmetic on rows is done in int64.
"""
import triton
import triton.language as tl

from ._tiles import activate, swizzle, tile_rows


@triton.jit
def _up_kernel(x_ptr, sx_t, sx_d, w_ptr, sw_e, sw_n, sw_k, inter_ptr, si_r, gu_ptr, sg_r, tw_ptr,
               ids_ptr, offsets_ptr, sorted_ptr, S, E, F, D, num_m,
               TOPK: tl.constexpr, EP: tl.constexpr, DECODE: tl.constexpr, SAVE: tl.constexpr,
               ACT: tl.constexpr, IEEE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    num_n = tl.cdiv(F, BN)
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    e, hrow, pair, valid = tile_rows(pid_m, offsets_ptr, sorted_ptr, ids_ptr, S, E, BM, EP, DECODE)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    tok = (pair // TOPK).to(tl.int64)
    # One [BK, 2*BN] weight tile per step: columns 0..BN-1 are gate rows n, BN..2BN-1 the up rows f + n.
    c = tl.arange(0, 2 * BN)
    n2 = pid_n * BN + (c % BN)
    cmask = n2 < F
    wrow = tl.where(c < BN, n2, n2 + F).to(tl.int64)
    kk = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * sx_t + kk[None, :] * sx_d
    b_ptrs = w_ptr + e.to(tl.int64) * sw_e + wrow[None, :] * sw_n + kk[:, None] * sw_k
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kmask = kk < D - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * sx_d
        b_ptrs += BK * sw_k
    gate, up = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
    n = pid_n * BN + tl.arange(0, BN)
    omask = valid[:, None] & (n < F)[None, :]
    row = hrow.to(tl.int64)[:, None]
    if SAVE:
        tl.store(gu_ptr + row * sg_r + n[None, :], gate.to(gu_ptr.dtype.element_ty), mask=omask)
        tl.store(gu_ptr + row * sg_r + F + n[None, :], up.to(gu_ptr.dtype.element_ty), mask=omask)
    # The routing weight is applied here rather than in the down GEMM: the same product, and the backward's
    # d(down) GEMM then reads this scaled intermediate as is.
    h = activate(gate, ACT) * up * tl.load(tw_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(inter_ptr + row * si_r + n[None, :], h.to(inter_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _down_kernel(a_ptr, sa_r, sa_c, w_ptr, sw_e, sw_n, sw_k, y_ptr, sy_s, sy_r, tw_ptr,
                 ids_ptr, offsets_ptr, sorted_ptr, S, E, N, KD, k_split, num_m,
                 EP: tl.constexpr, DECODE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    pid_k = tl.program_id(1)
    e, hrow, pair, valid = tile_rows(pid_m, offsets_ptr, sorted_ptr, ids_ptr, S, E, BM, EP, DECODE)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(KD, k_lo + k_split)
    kk = k_lo + tl.arange(0, BK)
    a_ptrs = a_ptr + hrow.to(tl.int64)[:, None] * sa_r + kk[None, :] * sa_c
    b_ptrs = w_ptr + e.to(tl.int64) * sw_e + n.to(tl.int64)[None, :] * sw_n + kk[:, None] * sw_k
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kmask = kk < k_hi - (k0 - k_lo)
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * sa_c
        b_ptrs += BK * sw_k
    if SCALE:
        acc = acc * tl.load(tw_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + pid_k.to(tl.int64) * sy_s + pair.to(tl.int64)[:, None] * sy_r + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


@triton.jit
def _combine_kernel(y_ptr, sy_s, sy_r, out_ptr, so_t, ids_ptr, T, N, E, SPLIT,
                    TOPK: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    tmask = t < T
    nmask = n < N
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        pair = t.to(tl.int64) * TOPK + j
        eid = tl.load(ids_ptr + pair, mask=tmask, other=-1)
        ok = tmask & (eid >= 0) & (eid < E)
        ptrs = y_ptr + pair[:, None] * sy_r + n[None, :]
        for s in range(SPLIT):
            acc += tl.load(ptrs + s * sy_s, mask=ok[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * so_t + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])
