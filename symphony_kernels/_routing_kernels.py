"""Triton kernels behind `symphony_kernels.routing`: fused scoring + top-k + renormalise + per-block counting,
a counting kernel for ids computed elsewhere, and the stable counting sort that turns them into a dispatch plan.

Layout shared by the three kernels. Tokens are cut into *count blocks* of BT tokens. For block b the first
kernel writes `bcount[b, 0..E]` (how many of the block's (token, slot) pairs go to each expert; column E
counts dropped pairs, i.e. ids outside [0, E), which only `dispatch` can see) and `lrank[t, j]`, the number of
pairs of the same expert that come before pair t*k+j inside its block, and adds its counts into
`gcount[b // G]` (integer atomics into a zeroed [nprog, E+1] table: integer sums do not depend on the order).
With G == 1 (at most 64 count blocks) row b of that table is block b's counts: the launcher passes `bcount`
as `gcount` and the kernels skip the atomics, so no table needs zeroing before the launch.
The sort kernel runs `nprog` programs, each owning `G` consecutive count blocks; a program sums the gcount rows
(all of them for the expert totals, the ones before its own for its starting cursor), then walks its blocks
in order, CH blocks per step, and writes `sorted_pairs[offset[e] + cursor[e] + lrank] = pair`, moving the
cursor by each block's counts. The result is deterministic and equal to a stable sort of the flattened ids.
The token and block counts are `do_not_specialize`, so one compiled variant serves every T (see `_launch`).

With a single count block (T <= BT, decode) the first kernel is the whole routing (`SINGLE`): its counts are the
totals, so it writes the counts, the offsets and each pair's place in `sorted_pairs` itself, and no sort kernel
is launched.
"""
import triton
import triton.language as tl


@triton.jit
def _rank_in_block(ids, rmask, cols, NE, KP: tl.constexpr, K: tl.constexpr, SINGLE: tl.constexpr,
                   GATHER: tl.constexpr):
    """Ranks of the pairs of a [BT, KP] id tile among the block's pairs of the same expert (pair order),
    and the block's per-expert counts. `ids` must already map dropped pairs to column NE - 1. SINGLE (the block
    holds every pair): the ranks are places in the whole sorted order (each expert's start added). GATHER:
    each pair reads its expert's column with one tl.gather (else one masked row reduction per slot)."""
    kcols = tl.arange(0, KP)
    cnt = tl.zeros((ids.shape[0], cols.shape[0]), dtype=tl.int32)
    for j in tl.static_range(K):
        idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        cnt += ((cols[None, :] == idj[:, None]) & rmask[:, None]).to(tl.int32)
    before = tl.cumsum(cnt, axis=0) - cnt          # pairs of earlier tokens in the block, per expert
    if SINGLE:
        totals = tl.sum(cnt, axis=0)
        before += (tl.cumsum(totals, axis=0) - totals)[None, :]
    if GATHER:
        # a repeated id earlier in the same row ranks before this one: count the row's earlier equal slots
        dup = tl.zeros(ids.shape, dtype=tl.int32)
        for j in tl.static_range(K):
            idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
            dup += ((ids == idj[:, None]) & (kcols[None, :] > j)).to(tl.int32)
        lrank = tl.gather(before, tl.where(kcols[None, :] < K, ids, 0), 1) + dup
    else:
        lrank = tl.zeros(ids.shape, dtype=tl.int32)
        for j in tl.static_range(K):
            idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
            sel = cols[None, :] == idj[:, None]
            r = tl.sum(tl.where(sel, before, 0), axis=1)
            lrank = tl.where(kcols[None, :] == j, r[:, None], lrank)
            before += sel.to(tl.int32)             # a repeated id later in the same row ranks after this one
    counts = tl.sum(cnt, axis=0)
    return lrank, tl.where(cols < NE, counts, 0)


@triton.jit
def _write_plan(counts, places, rows, kcols, kmask, cols, E, counts_ptr, offsets_ptr, sorted_ptr, K: tl.constexpr):
    """SINGLE: the whole plan from the only block's counts (dropped pairs in column E) and places."""
    starts = tl.cumsum(counts, axis=0) - counts
    tl.store(counts_ptr + cols, counts, mask=cols < E)
    tl.store(offsets_ptr + cols, starts, mask=cols < E)
    tl.store(offsets_ptr + E, tl.sum(tl.where(cols < E, counts, 0), axis=0))  # start of the dropped pairs
    tl.store(sorted_ptr + places, rows[:, None] * K + kcols[None, :], mask=kmask)


@triton.jit(do_not_specialize=("T", "G"))
def _route_kernel(logits_ptr, stride_t, stride_e, T, E,
                  w_ptr, ids_ptr, lrank_ptr, bcount_ptr, gcount_ptr, G, counts_ptr, offsets_ptr, sorted_ptr,
                  K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr,
                  SIGMOID: tl.constexpr, RENORM: tl.constexpr, F64: tl.constexpr, SINGLE: tl.constexpr,
                  GATHER: tl.constexpr):
    """One program per BT tokens: scores, top-k (ties to the lower id), renormalise, counts and ranks (SINGLE:
    the plan itself)."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    rmask = rows < T
    cmask = cols < E
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_e
    x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(acc_t)
    x = tl.where(x != x, float("-inf"), x)                       # NaN counts as -inf
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        m = tl.max(x, axis=1)
        pos_inf = m == float("inf")
        finite = (m == m) & (m != float("inf")) & (m != float("-inf"))
        ex = tl.exp(x - tl.where(finite, m, 0.0)[:, None])
        ex = tl.where(pos_inf[:, None], (x == float("inf")).to(acc_t), tl.where(finite[:, None], ex, 0.0))
        total = tl.sum(ex, axis=1)
        s = tl.where(total[:, None] > 0, ex / tl.where(total > 0, total, 1.0)[:, None], 0.0)
    s = tl.where(cmask[None, :], s, -1.0)                        # padding columns are never chosen (k <= E)

    kcols = tl.arange(0, KP)
    wts = tl.zeros((BT, KP), dtype=acc_t)
    ids = tl.zeros((BT, KP), dtype=tl.int32)
    if F64:
        for j in tl.static_range(K):
            best = tl.max(s, axis=1)
            idx = tl.min(tl.where(s == best[:, None], cols[None, :], EP), axis=1)
            s = tl.where(cols[None, :] == idx[:, None], -2.0, s)
            wts = tl.where(kcols[None, :] == j, best[:, None], wts)
            ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
    else:
        # One max per slot over int64 keys: a score's float32 bits (order-preserving for scores >= 0) above the
        # reversed column (ties to the lower id); padding and chosen columns are -1.
        bits = tl.where(s > 0, s.to(tl.int32, bitcast=True), 0).to(tl.int64)
        key = tl.where(cmask[None, :], (bits << 32) | (EP - 1 - cols)[None, :].to(tl.int64), -1)
        for j in tl.static_range(K):
            top = tl.max(key, axis=1)
            idx = (EP - 1 - (top & 0xFFFFFFFF)).to(tl.int32)
            best = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            key = tl.where(cols[None, :] == idx[:, None], -1, key)
            wts = tl.where(kcols[None, :] == j, best[:, None], wts)
            ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
    if RENORM:
        tot = tl.sum(wts, axis=1)
        wts = tl.where(tot[:, None] > 0, wts / tl.where(tot > 0, tot, 1.0)[:, None], 0.0)

    kmask = rmask[:, None] & (kcols[None, :] < K)
    out_off = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(w_ptr + out_off, wts, mask=kmask)
    tl.store(ids_ptr + out_off, ids, mask=kmask)
    lrank, counts = _rank_in_block(ids, rmask, cols, E, KP, K, SINGLE, GATHER)
    if SINGLE:
        _write_plan(counts, lrank, rows, kcols, kmask, cols, E, counts_ptr, offsets_ptr, sorted_ptr, K)
    else:
        tl.store(lrank_ptr + out_off, lrank, mask=kmask)
        ne = E + 1
        tl.store(bcount_ptr + pid.to(tl.int64) * ne + cols, counts, mask=cols < E)
        tl.store(bcount_ptr + pid.to(tl.int64) * ne + E, 0)          # route never drops a pair
        if G > 1:  # (G == 1: gcount is bcount, this program's own row)
            tl.atomic_add(gcount_ptr + (pid // G).to(tl.int64) * ne + cols, counts, mask=cols < E)


@triton.jit(do_not_specialize=("T", "G"))
def _count_kernel(ids_ptr, stride_t, stride_k, T, E, lrank_ptr, bcount_ptr, gcount_ptr, G,
                  counts_ptr, offsets_ptr, sorted_ptr,
                  K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr, SINGLE: tl.constexpr,
                  GATHER: tl.constexpr):
    """Counts and in-block ranks for given ids; ids outside [0, E) are dropped pairs (column E). SINGLE: the
    plan itself."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    kcols = tl.arange(0, KP)
    cols = tl.arange(0, EP)
    rmask = rows < T
    kmask = rmask[:, None] & (kcols[None, :] < K)
    ids = tl.load(ids_ptr + rows.to(tl.int64)[:, None] * stride_t + kcols[None, :] * stride_k, mask=kmask, other=0)
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    lrank, counts = _rank_in_block(ids, rmask, cols, E + 1, KP, K, SINGLE, GATHER)
    if SINGLE:
        _write_plan(counts, lrank, rows, kcols, kmask, cols, E, counts_ptr, offsets_ptr, sorted_ptr, K)
    else:
        tl.store(lrank_ptr + rows.to(tl.int64)[:, None] * K + kcols[None, :], lrank, mask=kmask)
        tl.store(bcount_ptr + pid.to(tl.int64) * (E + 1) + cols, counts, mask=cols < E + 1)
        if G > 1:  # (G == 1: gcount is bcount, this program's own row)
            tl.atomic_add(gcount_ptr + (pid // G).to(tl.int64) * (E + 1) + cols, counts, mask=cols < E + 1)


@triton.jit(do_not_specialize=("T", "nb", "G", "nprog"))
def _sort_kernel(ids_ptr, stride_t, stride_k, lrank_ptr, bcount_ptr, gcount_ptr, T, E, nb, G, nprog,
                 counts_ptr, offsets_ptr, sorted_ptr, scratch_ptr,
                 K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr, RB: tl.constexpr,
                 CH: tl.constexpr, GATHER: tl.constexpr):
    """Stable counting sort of the pairs by expert (see the module docstring), CH count blocks per step: the
    cursors of the CH blocks come from a cumulative sum of their count rows, and each pair looks its
    block's cursor up with tl.gather (GATHER) or through a scratch row in global memory."""
    pid = tl.program_id(0)
    ne = E + 1
    cols = tl.arange(0, EP)
    cmask = cols < ne
    first = pid * G
    totals = tl.zeros((EP,), dtype=tl.int32)
    cursor = tl.zeros((EP,), dtype=tl.int32)
    for r0 in range(0, nprog, RB):
        r = r0 + tl.arange(0, RB)
        c = tl.load(gcount_ptr + r.to(tl.int64)[:, None] * ne + cols[None, :],
                    mask=(r < nprog)[:, None] & cmask[None, :], other=0)
        totals += tl.sum(c, axis=0)
        cursor += tl.sum(tl.where((r < pid)[:, None], c, 0), axis=0)
    starts = tl.cumsum(totals, axis=0) - totals
    if pid == 0:
        tl.store(counts_ptr + cols, totals, mask=cols < E)
        tl.store(offsets_ptr + cols, starts, mask=cols < ne)     # offsets[E] = start of the dropped pairs
    cursor += starts
    kcols = tl.arange(0, KP)
    last = tl.minimum(first + G, nb)
    tok_end = tl.minimum(last * BT, T)
    chunk = tl.arange(0, CH)
    for b0 in range(first, last, CH):
        blk = b0 + chunk
        c = tl.load(bcount_ptr + blk[:, None] * ne + cols[None, :], mask=(blk < last)[:, None] & cmask[None, :],
                    other=0)
        base = cursor[None, :] + tl.cumsum(c, axis=0) - c                 # [CH, EP]: each block's cursors
        rows = b0 * BT + tl.arange(0, CH * BT)
        kmask = (rows < tok_end)[:, None] & (kcols[None, :] < K)
        ids = tl.load(ids_ptr + rows.to(tl.int64)[:, None] * stride_t + kcols[None, :] * stride_k,
                      mask=kmask, other=0)
        ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
        lr = tl.load(lrank_ptr + rows.to(tl.int64)[:, None] * K + kcols[None, :], mask=kmask, other=0)
        key = ((rows - b0 * BT) // BT)[:, None] * EP + ids                 # (block in chunk, expert)
        flat = tl.reshape(base, (CH * EP,))
        if GATHER:
            dest = tl.reshape(tl.gather(flat, tl.reshape(key, (CH * BT * KP,)), 0), (CH * BT, KP))
        else:
            tl.store(scratch_ptr + pid * (CH * EP) + tl.arange(0, CH * EP), flat)
            tl.debug_barrier()
            dest = tl.load(scratch_ptr + pid * (CH * EP) + key, mask=kmask, other=0)
            tl.debug_barrier()
        pair = rows[:, None] * K + kcols[None, :]
        tl.store(sorted_ptr + (dest + lr), pair, mask=kmask)
        cursor += tl.sum(c, axis=0)
