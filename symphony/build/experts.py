"""The expert tensors of a build: block j of the aligned FFN of each expert source.

Experts: expert e of layer l is block j of the aligned FFN of source s (e = position of s among the expert
sources * per_source + j). The aligned FFN is the source's FFN with its neurons permuted by the alignment's
`perm[l]` (perm[i] = the source neuron matched to anchor neuron i): gate and up rows, down columns. Block j of
per_source = m holds neurons j*f/m .. (j+1)*f/m - 1, and its down projection is multiplied by m, so that routing
a token to all m blocks of one source with weights 1/m gives that source's FFN back. With per_source = 1 and the
stored dtype, experts are the (permuted) source FFNs bit for bit.

`plan` below is a symphony.build.assemble.MoEPlan.
"""
from __future__ import annotations

import torch


def permuted_ffn_part(source, layer: int, part: str, perm: torch.Tensor | None, block: int, blocks: int):
    """Block `block` of `blocks` of one permuted FFN weight: part "gate" / "up" ([f/m, d] rows) or "down"
    ([d, f/m] columns, times `blocks`), in the stored dtype."""
    gate, up, down = source.ffn_names(layer)
    w = source.tensor({"gate": gate, "up": up, "down": down}[part])
    f = w.shape[1] if part == "down" else w.shape[0]
    size = f // blocks
    if perm is not None:
        idx = perm[block * size:(block + 1) * size]
        out = w[:, idx] if part == "down" else w[idx]
    elif blocks > 1:
        out = w[:, block * size:(block + 1) * size] if part == "down" else w[block * size:(block + 1) * size]
    else:
        out = w
    if part == "down" and blocks > 1:
        out = out * blocks
    return out.contiguous()


def aligned_ffn_part(plan, s: int, layer: int, part: str, block: int = 0, blocks: int = 1) -> torch.Tensor:
    """Block `block` of `blocks` of source s's FFN weight `part`, permuted as the plan's alignment says."""
    perm = plan.perms.get(s)
    return permuted_ffn_part(plan.sources[s], layer, part, None if perm is None else perm[layer], block, blocks)


def expert_producer(plan, layer: int, expert: int, part: str):
    s, block = plan.expert_sources[expert // plan.per_source], expert % plan.per_source
    return lambda: aligned_ffn_part(plan, s, layer, part, block, plan.per_source).to(plan.dtype)


def fused_producer(plan, layer: int, which: str):
    def produce():
        experts = []
        for e in range(len(plan.expert_sources) * plan.per_source):
            s, block = plan.expert_sources[e // plan.per_source], e % plan.per_source
            if which == "gate_up":
                parts = [aligned_ffn_part(plan, s, layer, p, block, plan.per_source) for p in ("gate", "up")]
                experts.append(torch.cat(parts).to(plan.dtype))
            else:
                experts.append(aligned_ffn_part(plan, s, layer, "down", block, plan.per_source).to(plan.dtype))
        return torch.stack(experts)
    return produce


def shared_producer(plan, layer: int, part: str, shape):
    if plan.shared_expert != "mean":
        return lambda: torch.zeros(shape, dtype=plan.dtype)

    def produce():
        from symphony.build.fusion import linear_mean

        return linear_mean([aligned_ffn_part(plan, s, layer, part) for s in plan.expert_sources], None, plan.dtype)
    return produce
