"""Launchers of the routing kernels (`_routing_kernels`) and the backward of the routing weights. No checks here:
`routing.route` and `routing.dispatch` check their inputs; `ops` wraps these as custom ops and autograd Functions."""
from __future__ import annotations

import os

import torch

from ._launch import Call, Kernel
from ._runtime import next_pow2

_SORT_PROGRAMS = 64  # most programs of the sort kernel (each reads every program's counter row once)
_GATHER = True       # the sort kernel looks cursors up with tl.gather (else through a scratch row, for Triton
                     # builds without tl.gather)
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


def _sort(call, ids, lrank, bcount, gcount, G, E, BT, counts, offsets, sorted_pairs):
    T, k = ids.shape
    nb = bcount.shape[0]
    nprog = gcount.shape[0]
    EP = next_pow2(E + 1)
    KP = next_pow2(k)
    CH = max(1, min(_SORT_CHUNK, G, 2048 // (BT * KP)))
    CH = 1 << (CH.bit_length() - 1)  # a power of two
    scratch = bcount if _GATHER else torch.empty((nprog, CH * EP), dtype=torch.int32, device=ids.device)
    if not _GATHER:
        call.buffers["scratch"] = scratch
    call.add(_kernel("_sort_kernel"), (nprog,),
             (ids, ids.stride(0), ids.stride(1), lrank, bcount, gcount, T, E, nb, G, nprog, counts, offsets,
              sorted_pairs, scratch),
             (("K", k), ("KP", KP), ("BT", BT), ("EP", EP), ("RB", max(1, min(64, 4096 // EP))), ("CH", CH),
              ("GATHER", _GATHER), ("num_warps", 4)))


def _plan_buffers(T, k, E, dev):
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(T * k, dtype=torch.int32, device=dev)
    if T == 0:
        counts.zero_()
        offsets.zero_()
    return counts, offsets, sorted_pairs


def route_triton(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """The five plan tensors through the Triton kernels (no checks; see `route`)."""
    call, plan = route_call(router_logits, top_k, scoring, renormalize)
    call.run()
    return plan


def route_call(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """(call, the five plan tensors): the routing's launches, not yet run (no checks)."""
    T, E = router_logits.shape
    dev = router_logits.device
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    weights = torch.empty((T, top_k), dtype=acc, device=dev)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    counts, offsets, sorted_pairs = _plan_buffers(T, top_k, E, dev)
    call = Call(dev)
    if T == 0:
        return call, (weights, ids, counts, offsets, sorted_pairs)
    lrank = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    EP = next_pow2(E)
    BT = _block_tokens(EP)
    nb = -(-T // BT)
    bcount = torch.empty((nb, E + 1), dtype=torch.int32, device=dev)
    nprog, G = _sort_grid(nb)
    gcount = torch.zeros((nprog, E + 1), dtype=torch.int32, device=dev)
    call.buffers.update(weights=weights, ids=ids, counts=counts, offsets=offsets, sorted_pairs=sorted_pairs,
                        lrank=lrank, bcount=bcount, gcount=gcount)
    call.add(_kernel("_route_kernel"), (nb,),
             (router_logits, router_logits.stride(0), router_logits.stride(1), T, E, weights, ids, lrank, bcount,
              gcount, G),
             (("K", top_k), ("KP", next_pow2(top_k)), ("BT", BT), ("EP", EP), ("SIGMOID", scoring == "sigmoid"),
              ("RENORM", renormalize), ("F64", acc == torch.float64), ("num_warps", 8 if BT * EP >= 8192 else 4)))
    _sort(call, ids, lrank, bcount, gcount, G, E, BT, counts, offsets, sorted_pairs)
    return call, (weights, ids, counts, offsets, sorted_pairs)


def dispatch_call(topk_ids: torch.Tensor, num_experts: int):
    """(call, (counts, offsets, sorted_pairs)): the dispatch's launches, not yet run (no checks)."""
    T, k = topk_ids.shape
    E = num_experts
    dev = topk_ids.device
    counts, offsets, sorted_pairs = _plan_buffers(T, k, E, dev)
    call = Call(dev)
    if T == 0:
        return call, (counts, offsets, sorted_pairs)
    EP = next_pow2(E + 1)
    BT = _block_tokens(EP)
    nb = -(-T // BT)
    lrank = torch.empty((T, k), dtype=torch.int32, device=dev)
    bcount = torch.empty((nb, E + 1), dtype=torch.int32, device=dev)
    nprog, G = _sort_grid(nb)
    gcount = torch.zeros((nprog, E + 1), dtype=torch.int32, device=dev)
    call.buffers.update(counts=counts, offsets=offsets, sorted_pairs=sorted_pairs, lrank=lrank, bcount=bcount,
                        gcount=gcount)
    call.add(_kernel("_count_kernel"), (nb,),
             (topk_ids, topk_ids.stride(0), topk_ids.stride(1), T, E, lrank, bcount, gcount, G),
             (("K", k), ("KP", next_pow2(k)), ("BT", BT), ("EP", EP), ("num_warps", 8 if BT * EP >= 8192 else 4)))
    _sort(call, topk_ids, lrank, bcount, gcount, G, E, BT, counts, offsets, sorted_pairs)
    return call, (counts, offsets, sorted_pairs)


def dispatch_triton(topk_ids: torch.Tensor, num_experts: int):
    """(counts, offsets, sorted_pairs) for given ids through the Triton kernels (no checks)."""
    call, out = dispatch_call(topk_ids, num_experts)
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
