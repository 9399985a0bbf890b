"""Row tiles of the grouped GEMMs: which (token, slot) pairs a program works on, and for which expert.

Two modes, chosen on the host from shapes alone (never from device data):

- sorted (prefill): the pairs sorted by expert (`sorted_pairs`, `offsets` from the dispatch). Expert e owns
  ceil(count_e / BM) M tiles; programs are launched for the static upper bound ceil(S / BM) + E tiles and
  each finds its expert from the offsets (a cumulative sum over at most 1024 experts in registers); programs
  past the last tile exit at once. A tile holds rows of one expert only, so no padding copies are made.
  Intermediate rows (`hrow`) are sorted positions.
- decode (S = T*k <= BM): one program row per expert; it takes every pair whose id is e (a mask over all S
  pairs, no dispatch needed) and exits at once when there is none. With many more experts than pairs
  (`DECODE == 2`), one program row per pair instead, its expert read from the ids. Intermediate rows are pair ids.

Pairs whose id lies outside [0, E) (dropped pairs) belong to no tile.
"""
import triton
import triton.language as tl


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear program id, GROUP_M M tiles at a time over all N tiles (L2 reuse)."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def tile_rows(pid_m, offsets_ptr, sorted_ptr, ids_ptr, S, E,
              BM: tl.constexpr, EP: tl.constexpr, DECODE: tl.constexpr):
    """(e, hrow [BM], pair [BM], valid [BM]) of M tile `pid_m`; no row is valid when the tile is empty."""
    if DECODE == 2:  # one program row per pair: row 0 is pair pid_m, on its own expert
        e = tl.load(ids_ptr + pid_m)
        i = tl.arange(0, BM)
        hrow = pid_m + i
        valid = (i == 0) & (e >= 0) & (e < E)
        pair = hrow
    elif DECODE:
        e = pid_m
        hrow = tl.arange(0, BM)
        in_range = hrow < S
        ids = tl.load(ids_ptr + hrow, mask=in_range, other=-1)
        valid = in_range & (ids == e)
        pair = hrow
    else:
        cols = tl.arange(0, EP)
        cmask = cols < E
        lo = tl.load(offsets_ptr + cols, mask=cmask, other=0)
        hi = tl.load(offsets_ptr + cols + 1, mask=cmask, other=0)
        ntiles = (hi - lo + BM - 1) // BM
        cum = tl.cumsum(ntiles, axis=0)
        e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
        sel = cols == e
        first_tile = tl.sum(tl.where(sel, cum - ntiles, 0), axis=0)
        start = tl.sum(tl.where(sel, lo, 0), axis=0) + (pid_m - first_tile) * BM
        end = tl.sum(tl.where(sel, hi, 0), axis=0)
        hrow = start + tl.arange(0, BM)
        valid = hrow < end
        pair = tl.load(sorted_ptr + hrow, mask=valid, other=0)
    return e, hrow, pair, valid


@triton.jit
def expert_range(e, offsets_ptr, S, DECODE: tl.constexpr):
    """[lo, hi) of expert e's intermediate rows (decode: all S rows, filtered by `range_rows`)."""
    if DECODE:
        lo = 0
        hi = S
    else:
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
    return lo, hi


@triton.jit
def range_rows(r, e, hi, sorted_ptr, ids_ptr, DECODE: tl.constexpr):
    """(pair, valid) of intermediate rows r [BK] of expert e below hi."""
    if DECODE:
        in_range = r < hi
        ids = tl.load(ids_ptr + r, mask=in_range, other=-1)
        valid = in_range & (ids == e)
        pair = r
    else:
        valid = r < hi
        pair = tl.load(sorted_ptr + r, mask=valid, other=0)
    return pair, valid


@triton.jit
def activate(g, ACT: tl.constexpr):
    """act(g) in float32: ACT 0 = silu, 1 = gelu (erf form, as torch.nn.functional.gelu)."""
    if ACT == 0:
        out = g / (1.0 + tl.exp(-g))
    else:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    return out


@triton.jit
def activate_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in float32."""
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da
