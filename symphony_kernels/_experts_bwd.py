"""Triton kernels of the experts backward (the gathered d(inter) and dX GEMMs are `_experts_fwd._down_kernel`); the
conventions (row-major operands, sizes and strides in AL units, DNS integers) are those of `_experts_fwd`.

Notation: pair p = t*k + j routed to expert e with weight w_p, intermediate row hrow(p), g/u the saved gate
and up pre-activations, h = act(g) * u, dO the gradient of the output, G = dO[tok] @ down[e] (the d(inter)
GEMM's output, [split, S, f] partials in intermediate-row order).

- `_dact_kernel`: the activation backward, one program per BR intermediate rows looping over f: G (the sum of
  its split-K partials, in a fixed order), then dw[p] = sum_n G * h (the routing-weight gradient: each row
  reduced whole by one program, deterministic, no atomics), dh = w * G, d(gate) = dh * u * act'(g),
  d(up) = dh * act(g) (`GRADS`); and the weighted intermediate w * h that the d(down) GEMM reads, recomputed
  from the saved pre-activations rather than kept from the forward (`INTER`). With one split, G is stored in
  d(gate)'s place and overwritten there (no extra buffer); a barrier between its load and the stores keeps
  that safe whatever the layouts. Rows that are no expert's (dropped pairs) get dw = 0 and nothing else.
  Until issue 11 this was the d(inter) GEMM's epilogue, whose register pressure held that GEMM to 64x128
  tiles and about 300 TFLOP/s on Mixtral.
- `_wgrad_kernel`: dW[e] = sum over expert e's rows of A[row]^T B[row] (rows gathered by token or taken by
  intermediate row; A optionally scaled by the routing weight): d(down)[e] = (w dO[tok])^T h and
  d(gate_up)[e] = d(gate_up)^T x[tok]. One program per (expert, output tile); experts with no rows write 0.
"""
import triton
import triton.language as tl

from ._tiles import activate, activate_grad, expert_range, range_rows, swizzle

DACT_DNS = ("sy_s", "S")
WGRAD_DNS = ("S",)


@triton.jit(do_not_specialize=DACT_DNS)
def _dact_kernel(y_ptr, sy_s, sy_r, gu_ptr, sgu_r, dgu_ptr, sdgu_r, inter_ptr, tw_ptr, dw_ptr,
                 ids_ptr, offsets_ptr, sorted_ptr, S, E, F, SPLIT: tl.constexpr,
                 DECODE: tl.constexpr, GRADS: tl.constexpr, IN_PLACE: tl.constexpr, INTER: tl.constexpr,
                 ACT: tl.constexpr, AL: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    # in AL units: sy_s, sy_r, sgu_r, sdgu_r, F (also inter's row stride)
    sy_s, sy_r, sgu_r, sdgu_r, F = sy_s * AL, sy_r * AL, sgu_r * AL, sdgu_r * AL, F * AL
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < S
    if DECODE:  # intermediate rows are pair ids
        pair = r
        eid = tl.load(ids_ptr + r, mask=rmask, other=-1)
        valid = rmask & (eid >= 0) & (eid < E)
    else:       # sorted rows: a permutation of every pair, the dropped ones from offsets[E] on
        pair = tl.load(sorted_ptr + r, mask=rmask, other=0)
        valid = rmask & (r < tl.load(offsets_ptr + E))
    w = tl.load(tw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    row = r.to(tl.int64)[:, None]
    dw = tl.zeros((BR,), dtype=tl.float32)
    for n0 in range(0, F, BN):
        n = n0 + tl.arange(0, BN)
        m = valid[:, None] & (n < F)[None, :]
        gate = tl.load(gu_ptr + row * sgu_r + n[None, :], mask=m, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * sgu_r + F + n[None, :], mask=m, other=0.0).to(tl.float32)
        if GRADS:
            g = tl.zeros((BR, BN), dtype=tl.float32)
            for s in range(SPLIT):
                g += tl.load(y_ptr + s * sy_s + row * sy_r + n[None, :], mask=m, other=0.0).to(tl.float32)
            act, dact = activate_grad(gate, ACT)
            dw += tl.sum(g * (act * up), axis=1)
            dh = g * w[:, None]
            if IN_PLACE:  # G lives where d(gate) goes: every thread's load of it before any store
                tl.debug_barrier()
            ty = dgu_ptr.dtype.element_ty
            tl.store(dgu_ptr + row * sdgu_r + n[None, :], (dh * up * dact).to(ty), mask=m)
            tl.store(dgu_ptr + row * sdgu_r + F + n[None, :], (dh * act).to(ty), mask=m)
        else:
            act = activate(gate, ACT)
        if INTER:
            tl.store(inter_ptr + row * F + n[None, :], (act * up * w[:, None]).to(inter_ptr.dtype.element_ty),
                     mask=m)
    if GRADS:
        tl.store(dw_ptr + pair, tl.where(valid, dw, 0.0), mask=rmask)


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
