"""What eager inference runs while its kernels compile in the background (see `_launch`): the routed experts
through torch's grouped GEMM, with no host synchronisation.

The same function as `moe_experts` (pairs sorted by expert, gate/up GEMM, act(gate) * up * routing weight, down
GEMM, the k slots of each token summed in a fixed order), computed in the hidden dtype with torch's own
kernels, so it rounds differently from the Triton kernels; it serves a call only until that call's kernel
variants are compiled. `available` says whether it can serve a call at all: CUDA, a torch with grouped_mm,
16-bit hidden states, weights of the hidden dtype and row sizes whose bytes are multiples of 16 (what
grouped_mm needs); otherwise the caller compiles in place.
"""
from __future__ import annotations

import torch

from .reference import ACTIVATIONS


def _grouped_mm():
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def available(hidden, gate_up, down) -> bool:
    if hidden.device.type != "cuda" or hidden.dtype not in (torch.bfloat16, torch.float16) or _grouped_mm() is None:
        return False
    if gate_up.dtype != hidden.dtype or down.dtype != hidden.dtype:
        return False
    d, f = hidden.shape[1], down.shape[2]
    return (d * hidden.element_size()) % 16 == 0 and (f * hidden.element_size()) % 16 == 0 \
        and torch.cuda.get_device_capability(hidden.device) >= (8, 0)


def moe_experts(hidden, gate_up, down, weights, ids, activation: str) -> torch.Tensor:
    """[T, d]: the routed experts by grouped GEMMs (ids outside [0, E) contribute nothing)."""
    mm = _grouped_mm()
    T, d = hidden.shape
    E, f = gate_up.shape[0], down.shape[2]
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    live = (flat >= 0) & (flat < E)
    key = torch.where(live, flat, torch.full_like(flat, E))
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int32, device=hidden.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
    x = hidden[order // k]
    h = mm(x, gate_up.transpose(1, 2), offs=offs)
    w = torch.where(live, weights.reshape(-1).to(torch.float32), torch.zeros((), device=hidden.device))[order]
    inter = (ACTIVATIONS[activation](h[:, :f].float()) * h[:, f:].float() * w[:, None]).to(hidden.dtype)
    y = mm(inter, down.transpose(1, 2), offs=offs)
    y = torch.where(live[order, None], y, torch.zeros((), dtype=y.dtype, device=y.device))  # rows past offs[-1]
    pairs = torch.empty_like(y)
    pairs[order] = y
    return pairs.view(T, k, d).float().sum(1).to(hidden.dtype)
