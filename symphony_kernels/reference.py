"""Plain-PyTorch references for every MoE kernel: the semantics the Triton kernels must match.

They are written for clarity, not speed, and run in whatever dtype they are given (tests upcast to float64).
Autograd through them gives the reference gradients.

Routing semantics (shared by `route_reference` and `symphony_kernels.route`):
- scores = softmax(logits) over experts (or sigmoid(logits)), computed in float32 (float64 for float64 input);
- the top-k experts by score; ties go to the lower expert id; ids are sorted by descending score;
- weights = the chosen scores, divided by their sum when `renormalize` (a zero sum gives zero weights);
- non-finite logits: NaN counts as -inf. Softmax of a row whose maximum is +inf shares the probability
  equally among its +inf entries; a row with no finite or +inf logit (all -inf/NaN) has every score 0, so it
  picks experts 0..k-1 with weight 0 and contributes nothing. Sigmoid maps +inf to 1 and -inf to 0.
  Whatever the logits hold, every id lies in [0, E).
- dispatch: the T*k (token, slot) pairs, flattened as pair = t * k + j, are sorted by expert id, stably
  (pairs of one expert stay in pair order); counts[e] pairs go to expert e, offsets = [0, cumsum(counts)].

Expert semantics (`moe_experts_reference`, `symphony_kernels.moe_experts`), transformers' layout:
gate_up_proj [E, 2f, d] holds the gate rows then the up rows, down_proj [E, d, f];
out[t] = sum_j w[t, j] * down[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])) with e = ids[t, j].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
SCORINGS = ("softmax", "sigmoid")


def scores_reference(router_logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """[T, E] routing scores (float32, or float64 for float64 logits) with the non-finite rules above."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")
    x = router_logits.to(torch.float64 if router_logits.dtype == torch.float64 else torch.float32)
    x = torch.where(torch.isnan(x), torch.full_like(x, -float("inf")), x)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    row_max = x.amax(dim=-1, keepdim=True)
    pos_inf = torch.isposinf(row_max)
    finite = torch.isfinite(row_max)
    e = torch.exp(x - torch.where(finite, row_max, torch.zeros_like(row_max)))
    e = torch.where(pos_inf, torch.isposinf(x).to(x.dtype), torch.where(finite, e, torch.zeros_like(e)))
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))


def route_reference(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                    renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights [T, k] in the scores' dtype, top-k ids [T, k] int32), differentiable in the logits."""
    scores = scores_reference(router_logits, scoring)
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(-1, order)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        weights = torch.where(total > 0, weights / safe, torch.zeros_like(weights))
    return weights, order.to(torch.int32)


def dispatch_reference(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [E] int32, offsets [E+1] int32, sorted_pairs [T*k] int32): pairs t*k+j sorted by expert, stably."""
    flat = topk_ids.reshape(-1).long()
    sorted_pairs = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets, sorted_pairs


def moe_experts_reference(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                          topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """[T, d] output of the routed SwiGLU experts (see the module docstring), in hidden's dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    act = ACTIVATIONS[activation]
    T, k = topk_ids.shape
    f = down_proj.shape[-1]
    out = hidden.new_zeros(hidden.shape)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        x = hidden[tok]
        gate_up = x @ gate_up_proj[e].t()
        y = (act(gate_up[:, :f]) * gate_up[:, f:]) @ down_proj[e].t()
        out = out.index_add(0, tok, y * topk_weights[tok, slot, None].to(y.dtype))
    return out
