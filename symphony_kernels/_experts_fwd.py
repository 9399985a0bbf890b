"""Triton kernels of the experts forward (and the gathered GEMMs its backward reuses).

- `_up_kernel`: inter[hrow, n] = w[pair] * act(x[tok] @ gate[e, n]^T) * (x[tok] @ up[e, n]^T): the gate
  and up rows n and f+n of one tile form one [BK, 2*BN] operand (one MMA per step), so activation-times-up
  and the routing weight are the epilogue; the pre-activations are stored too when the backward needs them.
  x rows are gathered through the pair ids.
- `_down_kernel`: y[split, pair, n] = a[hrow] @ b[e][:, n] over one slice of K (split-K for decode and small
  batches, where N alone gives too few programs); rows are scattered to pair order. b is read K-major (the
  down projection [E, d, f]) or N-major (`B_KMAJOR=False`: gate_up [E, 2f, d] for the backward's dX per pair).
  The backward's d(inter) GEMM is this kernel too: a gathered by token (`A_BY_TOKEN`: dO[tok]), b = down[e]
  N-major, rows written in intermediate order (`Y_BY_HROW`); `_experts_bwd._dact_kernel` does the rest.
- `_combine_kernel`: out[t] = sum over slots j (then splits) of y[split, t*k + j] in float32, in a fixed
  order (deterministic, no atomics); dropped pairs are skipped. This is the one extra pass over [T*k, d].

Conventions shared by every experts kernel (`_experts_bwd` too):
- Every matrix is row-major with a unit inner stride (the launchers make inputs so); only row (and expert)
  strides are passed.
- Sizes and strides marked "in AL units" are passed divided by the constexpr AL (the largest power of two up
  to 16 that divides all of them) and multiplied back first thing. The product tells Triton's alignment
  analysis that they are multiples of AL, which it cannot know from the values when they are not multiples of
  16 (d = 1000, say): masks and row starts are then known to be AL-aligned and loads stay 16 bytes wide.
- The integers that change from call to call (the pair count S, the tile counts) are `do_not_specialize`
  (DNS below), so one compiled variant serves every batch size of a shape class (see `_launch`).
All pointer arithmetic on rows is done in int64.
"""
import triton
import triton.language as tl

from ._tiles import activate, swizzle, tile_rows

UP_DNS = ("S", "num_m")
DOWN_DNS = ("sy_s", "S", "k_split", "num_m")
COMBINE_DNS = ("sy_s", "T", "SPLIT")


@triton.jit(do_not_specialize=UP_DNS)
def _up_kernel(x_ptr, sx_t, w_ptr, sw_e, sw_n, inter_ptr, si_r, gu_ptr, sg_r, tw_ptr,
               ids_ptr, offsets_ptr, sorted_ptr, S, E, F, D, num_m,
               TOPK: tl.constexpr, EP: tl.constexpr, DECODE: tl.constexpr, SAVE: tl.constexpr,
               ACT: tl.constexpr, IEEE: tl.constexpr, AL: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # in AL units: sx_t, sw_e, sw_n, si_r, sg_r, F, D
    sx_t, sw_e, sw_n, si_r, sg_r, F, D = sx_t * AL, sw_e * AL, sw_n * AL, si_r * AL, sg_r * AL, F * AL, D * AL
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
    a_ptrs = x_ptr + (tok * sx_t)[:, None] + kk[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * sw_e + (wrow * sw_n)[None, :] + kk[:, None]
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kmask = kk < D - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
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


@triton.jit(do_not_specialize=DOWN_DNS)
def _down_kernel(a_ptr, sa_r, w_ptr, sw_e, sw_r, y_ptr, sy_s, sy_r, tw_ptr,
                 ids_ptr, offsets_ptr, sorted_ptr, S, E, N, KD, k_split, num_m,
                 EP: tl.constexpr, DECODE: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
                 B_KMAJOR: tl.constexpr, AL: tl.constexpr, TOPK: tl.constexpr, A_BY_TOKEN: tl.constexpr,
                 Y_BY_HROW: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # in AL units: sa_r, sw_e, sw_r (the weight's row stride), sy_s, sy_r, N, KD, k_split
    sa_r, sw_e, sw_r, sy_s, sy_r = sa_r * AL, sw_e * AL, sw_r * AL, sy_s * AL, sy_r * AL
    N, KD, k_split = N * AL, KD * AL, k_split * AL
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
    if A_BY_TOKEN:
        arow = (pair // TOPK).to(tl.int64)
    else:
        arow = hrow.to(tl.int64)
    a_ptrs = a_ptr + (arow * sa_r)[:, None] + kk[None, :]
    if B_KMAJOR:  # b[k, n] = w[e, n, k]
        b_ptrs = w_ptr + e.to(tl.int64) * sw_e + (n.to(tl.int64) * sw_r)[None, :] + kk[:, None]
        b_step = BK
    else:         # b[k, n] = w[e, k, n]
        b_ptrs = w_ptr + e.to(tl.int64) * sw_e + n[None, :] + (kk.to(tl.int64) * sw_r)[:, None]
        b_step = BK * sw_r
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kmask = kk < k_hi - (k0 - k_lo)
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += b_step
    if SCALE:
        acc = acc * tl.load(tw_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    if Y_BY_HROW:
        yrow = hrow.to(tl.int64)
    else:
        yrow = pair.to(tl.int64)
    y_ptrs = y_ptr + pid_k.to(tl.int64) * sy_s + (yrow * sy_r)[:, None] + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=COMBINE_DNS)
def _combine_kernel(y_ptr, sy_s, sy_r, out_ptr, so_t, ids_ptr, T, N, E, SPLIT,
                    TOPK: tl.constexpr, AL: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    # in AL units: sy_s, sy_r, so_t, N
    sy_s, sy_r, so_t, N = sy_s * AL, sy_r * AL, so_t * AL, N * AL
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    tmask = t < T
    nmask = n < N
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        pair = t.to(tl.int64) * TOPK + j
        eid = tl.load(ids_ptr + pair, mask=tmask, other=-1)
        ok = tmask & (eid >= 0) & (eid < E)
        ptrs = y_ptr + (pair * sy_r)[:, None] + n[None, :]
        for s in range(SPLIT):
            acc += tl.load(ptrs + s * sy_s, mask=ok[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + (t.to(tl.int64) * so_t)[:, None] + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])
