"""Triton kernels of the experts backward (the gathered dX GEMM is `_experts_fwd._down_kernel`); the conventions
(row-major operands, sizes and strides in AL units, DNS integers) are those of `_experts_fwd`.

Notation: pair p = t*k + j routed to expert e with weight w_p, intermediate row hrow(p), g/u the saved gate
and up pre-activations, h = act(g) * u, dO the gradient of the output.

- `_dinter_kernel`: G = dO[tok] @ down[e] ([BM, d] @ [d, f] per tile), then in the epilogue
  dw partial[n_tile, hrow] = sum_n G * h (the routing-weight gradient, reduced over N tiles afterwards in a
  fixed order: deterministic), dh = w * G, d(gate) = dh * u * act'(g), d(up) = dh * act(g).
- `_wgrad_kernel`: dW[e] = sum over expert e's rows of A[row]^T B[row] (rows gathered by token or taken by
  intermediate row; A optionally scaled by the routing weight): d(down)[e] = (w dO[tok])^T h and
  d(gate_up)[e] = d(gate_up)^T x[tok]. One program per (expert, output tile); experts with no rows write 0.
"""
import triton
import triton.language as tl

from ._tiles import activate_grad, expert_range, range_rows, swizzle, tile_rows

DINTER_DNS = ("S", "num_m")
WGRAD_DNS = ("S",)


@triton.jit(do_not_specialize=DINTER_DNS)
def _dinter_kernel(g_ptr, sg_t, w_ptr, sw_e, sw_r, gu_ptr, sgu_r, dgu_ptr, sdgu_r,
                   tw_ptr, dwp_ptr, ids_ptr, offsets_ptr, sorted_ptr, S, E, F, D, num_m,
                   TOPK: tl.constexpr, EP: tl.constexpr, DECODE: tl.constexpr, ACT: tl.constexpr,
                   IEEE: tl.constexpr, AL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # in AL units: sg_t, sw_e, sw_r (down's row stride), sgu_r, sdgu_r, F, D
    sg_t, sw_e, sw_r, sgu_r, sdgu_r, F, D = sg_t * AL, sw_e * AL, sw_r * AL, sgu_r * AL, sdgu_r * AL, F * AL, D * AL
    num_n = tl.cdiv(F, BN)
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    e, hrow, pair, valid = tile_rows(pid_m, offsets_ptr, sorted_ptr, ids_ptr, S, E, BM, EP, DECODE)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    tok = (pair // TOPK).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < F
    kk = tl.arange(0, BK)
    a_ptrs = g_ptr + (tok * sg_t)[:, None] + kk[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * sw_e + n[None, :] + (kk.to(tl.int64) * sw_r)[:, None]  # b[k, n] = down[e, k, n]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kmask = kk < D - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK * sw_r
    omask = valid[:, None] & nmask[None, :]
    row = hrow.to(tl.int64)[:, None]
    gate = tl.load(gu_ptr + row * sgu_r + n[None, :], mask=omask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * sgu_r + F + n[None, :], mask=omask, other=0.0).to(tl.float32)
    act, dact = activate_grad(gate, ACT)
    dwp = tl.sum(acc * (act * up), axis=1)
    tl.store(dwp_ptr + pid_n.to(tl.int64) * S + hrow, dwp, mask=valid)
    dh = acc * tl.load(tw_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    ty = dgu_ptr.dtype.element_ty
    tl.store(dgu_ptr + row * sdgu_r + n[None, :], (dh * up * dact).to(ty), mask=omask)
    tl.store(dgu_ptr + row * sdgu_r + F + n[None, :], (dh * act).to(ty), mask=omask)


@triton.jit(do_not_specialize=WGRAD_DNS)
def _wgrad_kernel(a_ptr, sa_r, b_ptr, sb_r, tw_ptr, out_ptr, so_e, so_m,
                  ids_ptr, offsets_ptr, sorted_ptr, S, E, M, N,
                  TOPK: tl.constexpr, A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr,
                  SCALE_A: tl.constexpr, DECODE: tl.constexpr, IEEE: tl.constexpr, AL: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # in AL units: sa_r, sb_r, so_e, so_m, M, N
    sa_r, sb_r, so_e, so_m, M, N = sa_r * AL, sb_r * AL, so_e * AL, so_m * AL, M * AL, N * AL
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
    e = tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    mmask = m < M
    nmask = n < N
    lo, hi = expert_range(e, offsets_ptr, S, DECODE)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(lo, hi, BK):
        r = r0 + tl.arange(0, BK)
        pair, valid = range_rows(r, e, hi, sorted_ptr, ids_ptr, DECODE)
        if A_BY_TOKEN:
            arow = (pair // TOPK).to(tl.int64)
        else:
            arow = r.to(tl.int64)
        if B_BY_TOKEN:
            brow = (pair // TOPK).to(tl.int64)
        else:
            brow = r.to(tl.int64)
        a = tl.load(a_ptr + (arow * sa_r)[:, None] + m[None, :], mask=valid[:, None] & mmask[None, :], other=0.0)
        if SCALE_A:
            wr = tl.load(tw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * wr[:, None]).to(a.dtype)
        b = tl.load(b_ptr + (brow * sb_r)[:, None] + n[None, :], mask=valid[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    o_ptrs = out_ptr + e.to(tl.int64) * so_e + (m.to(tl.int64) * so_m)[:, None] + n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
