"""Launchers of the routing kernels (`_routing_kernels`) and the backward of the routing weights. No checks here:
`routing.route` and `routing.dispatch` check their inputs; `ops` wraps these as custom ops and autograd Functions."""
from __future__ import annotations

import os

import torch

from ._launch import Call, Kernel, Workspace
from ._runtime import next_pow2

_SORT_PROGRAMS = 64  # most programs of the sort kernel (each reads every program's counter row once)
_GATHER = True       # the kernels look ranks and cursors up with tl.gather (else by row reductions and through a
                     # scratch row, for Triton builds without tl.gather)
# Calls of at most 16 tokens take one count block of next_pow2(T) tokens, and a call of one count block one launch
# (the first kernel writes the plan). False: the two-launch path at every size (benchmarks/bench_decode.py times both).
_ONE_LAUNCH = True
# Count blocks the sort kernel places per step (at most; 1 = one block at a time). SYMPHONY_SORT_CHUNK overrides.
_SORT_CHUNK = int(os.environ.get("SYMPHONY_SORT_CHUNK", "8"))


# --------------------------------------------------------------------------------------------- launchers
def _block_tokens(EP: int) -> int:
    return max(16, min(256, 8192 // EP))


def _sort_grid(nb: int) -> tuple[int, int]:
    """(programs of the sort kernel, count blocks per program)."""
    nprog = min(nb, _SORT_PROGRAMS)
    G = -(-nb // nprog)
    return -(-nb // G), G


_KERNELS: dict[str, Kernel] = {}


def _kernel(name: str) -> Kernel:
    k = _KERNELS.get(name)
    if k is None:
        from . import _routing_kernels

        k = _KERNELS[name] = Kernel(getattr(_routing_kernels, name))
    return k


class _Sizes:
    """What a routing call of T tokens, E experts and top-k derives from its sizes alone: the grids and
    constexprs of its launches and where its int32 buffers lie (`_launch.Workspace`). `first` is the
    route kernel's (`flags`: sigmoid, renormalize, float64) or, without flags, the dispatch's count kernel.
    With one count block per sort program (G == 1, up to 64 blocks) each program owns its row of the counter
    table, so the kernels take `bcount` for it and nothing needs zeroing (see `_routing_kernels`). With one
    count block in all (`single`: T <= BT; one block of next_pow2(T) tokens up to T = 16, decode) the first
    kernel writes the plan and there is no sort launch."""

    __slots__ = ("nb", "nprog", "G", "single", "first", "sort", "workspace")

    def __init__(self, T, E, k, flags):
        EP = next_pow2(E if flags else E + 1)
        BT = next_pow2(T) if T <= 16 and _ONE_LAUNCH else _block_tokens(EP)
        KP = next_pow2(k)
        self.nb = -(-T // BT)
        self.single = self.nb == 1 and _ONE_LAUNCH
        self.nprog, self.G = _sort_grid(self.nb) if T else (0, 1)
        self.first = (("K", k), ("KP", KP), ("BT", BT), ("EP", EP))
        if flags:
            self.first += tuple(zip(("SIGMOID", "RENORM", "F64"), flags))
        self.first += (("SINGLE", self.single), ("GATHER", _GATHER), ("num_warps", 8 if BT * EP >= 8192 else 4))
        SEP = next_pow2(E + 1)
        CH = max(1, min(_SORT_CHUNK, self.G, 2048 // (BT * KP)))
        CH = 1 << (CH.bit_length() - 1)  # a power of two
        self.sort = (("K", k), ("KP", KP), ("BT", BT), ("EP", SEP), ("RB", max(1, min(64, 4096 // SEP))), ("CH", CH),
                     ("GATHER", _GATHER), ("num_warps", 4))
        pieces = [("ids", (T, k), False)] if flags else []
        pieces += [("sorted_pairs", (T * k,), False), ("counts", (E,), T == 0), ("offsets", (E + 1,), T == 0)]
        if T and not self.single:
            pieces += [("lrank", (T * k,), False), ("bcount", (self.nb * (E + 1),), False)]
            if self.G > 1:
                pieces.append(("gcount", (self.nprog * (E + 1),), True))
            if not _GATHER:
                pieces.append(("scratch", (self.nprog * CH * SEP,), False))
        self.workspace = Workspace(pieces)


_SIZES: dict = {}
_MAX_SIZES = 1024


def _sizes(T: int, E: int, k: int, flags: tuple = ()) -> _Sizes:
    key = (T, E, k, flags, _SORT_PROGRAMS, _GATHER, _SORT_CHUNK, _ONE_LAUNCH)
    sizes = _SIZES.get(key)
    if sizes is None:
        if len(_SIZES) >= _MAX_SIZES:
            _SIZES.pop(next(iter(_SIZES)))
        sizes = _SIZES[key] = _Sizes(T, E, k, flags)
    return sizes


def _scratch(b):
    """(lrank, bcount, gcount, then counts, offsets, sorted_pairs) for the first kernel: with one count block
    it writes the plan and the three scratch pointers are never read (sorted_pairs stands in)."""
    sp = b["sorted_pairs"]
    bcount = b.get("bcount", sp)
    return (b.get("lrank", sp), bcount, b.get("gcount", bcount)), (b["counts"], b["offsets"], sp)


def _sort(call, sizes, ids, stride_t, stride_k, T, E, b):
    if sizes.single:
        return
    bcount = b["bcount"]
    call.add(_kernel("_sort_kernel"), (sizes.nprog,),
             (ids, stride_t, stride_k, b["lrank"], bcount, b.get("gcount", bcount), T, E, sizes.nb, sizes.G,
              sizes.nprog, b["counts"], b["offsets"], b["sorted_pairs"], b.get("scratch", bcount)), sizes.sort)


def route_triton(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, separate=False):
    """The five plan tensors through the Triton kernels (no checks; see `route`); `separate`: see `route_call`."""
    call, plan = route_call(router_logits, top_k, scoring, renormalize, separate)
    call.run()
    return plan


def route_call(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, separate=False):
    """(call, the five plan tensors): the routing's launches, not yet run (no checks). The integer tensors are
    views of one allocation, unless `separate` (a custom op's outputs must not alias each other)."""
    T, E = router_logits.shape
    f64 = router_logits.dtype == torch.float64
    sizes = _sizes(T, E, top_k, (scoring == "sigmoid", renormalize, f64))
    dev = router_logits.device
    call = Call(dev)
    weights = call.buffers["weights"] = torch.empty((T, top_k), dtype=torch.float64 if f64 else torch.float32,
                                                    device=dev)
    b = sizes.workspace.alloc(call, dev, separate)
    if T:
        (lrank, bcount, gcount), plan = _scratch(b)
        call.add(_kernel("_route_kernel"), (sizes.nb,),
                 (router_logits, router_logits.stride(0), router_logits.stride(1), T, E, weights, b["ids"], lrank,
                  bcount, gcount, sizes.G, *plan), sizes.first)
        _sort(call, sizes, b["ids"], top_k, 1, T, E, b)
    return call, (weights, b["ids"], b["counts"], b["offsets"], b["sorted_pairs"])


def dispatch_call(topk_ids: torch.Tensor, num_experts: int, separate=False):
    """(call, (counts, offsets, sorted_pairs)): the dispatch's launches, not yet run (no checks); `separate`:
    see `route_call`."""
    T, k = topk_ids.shape
    E = num_experts
    sizes = _sizes(T, E, k)
    call = Call(topk_ids.device)
    b = sizes.workspace.alloc(call, topk_ids.device, separate)
    if T:
        (lrank, bcount, gcount), plan = _scratch(b)
        s_t, s_k = topk_ids.stride()
        call.add(_kernel("_count_kernel"), (sizes.nb,),
                 (topk_ids, s_t, s_k, T, E, lrank, bcount, gcount, sizes.G, *plan), sizes.first)
        _sort(call, sizes, topk_ids, s_t, s_k, T, E, b)
    return call, (b["counts"], b["offsets"], b["sorted_pairs"])


def dispatch_triton(topk_ids: torch.Tensor, num_experts: int, separate=False):
    """(counts, offsets, sorted_pairs) for given ids through the Triton kernels (no checks)."""
    call, out = dispatch_call(topk_ids, num_experts, separate)
    call.run()
    return out


def route_backward(router_logits: torch.Tensor, topk_ids: torch.Tensor, grad_weights: torch.Tensor,
                   scoring: str, renormalize: bool) -> torch.Tensor:
    """Gradient of the logits from the gradient of `topk_weights`, equal to autograd through
    `route_reference` (PyTorch ops on [T, E], no host sync). Rows whose scores do not depend on the logits
    (a +inf maximum, nothing above -inf) and NaN/inf entries get zero (where autograd of the reference gives
    NaN at a +inf logit, an artifact of torch.where, this gives 0)."""
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    x = router_logits.to(acc)
    x = torch.where(torch.isnan(x), torch.full_like(x, -float("inf")), x)
    ids = topk_ids.long()
    g = grad_weights.to(acc)
    if scoring == "sigmoid":
        s = torch.sigmoid(x)
        live = torch.ones_like(x[:, :1], dtype=torch.bool)
    else:
        m = x.amax(dim=-1, keepdim=True)
        live = torch.isfinite(m)
        s = torch.softmax(torch.where(live, x, torch.zeros_like(x)), dim=-1)
        s = torch.where(live & torch.isfinite(x), s, torch.zeros_like(s))
    s_sel = s.gather(1, ids)
    if renormalize:
        tot = s_sel.sum(dim=-1, keepdim=True)
        pos = tot > 0
        safe = torch.where(pos, tot, torch.ones_like(tot))
        w = s_sel / safe
        g = torch.where(pos, (g - (g * w).sum(dim=-1, keepdim=True)) / safe, torch.zeros_like(g))
    gs = torch.zeros_like(s).scatter_add_(1, ids, g)
    if scoring == "sigmoid":
        dx = gs * s * (1 - s)
    else:
        dx = s * (gs - (gs * s).sum(dim=-1, keepdim=True))
        dx = torch.where(live, dx, torch.zeros_like(dx))
    return dx.to(router_logits.dtype)
