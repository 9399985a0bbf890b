"""Inter-expert similarity of a built MoE (issue 13, item 4): linear CKA between its experts' activations on the
same inputs, and the neuron-order-sensitive measures next to it.

    expert_similarity(moe_dir, texts, seq_len=..., max_tokens=...)  -> per layer and mean over expert pairs

Linear CKA (Kornblith et al. 2019) of two activation matrices X [n, p] and Y [n, q] over the same n inputs, with
Xc, Yc their columns centred over the inputs:

    CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)

What a permutation can and cannot change. Aligning a source's FFN to the anchor permutes its intermediate
neurons: X -> X P for a permutation matrix P (the rows of gate/up and the columns of down move together). P is
orthogonal and centring commutes with it, so ||(XP)c^T Yc|| = ||P^T Xc^T Yc|| = ||Xc^T Yc|| and
||(XP)c^T (XP)c|| = ||P^T Xc^T Xc P|| = ||Xc^T Xc||: linear CKA on the intermediate activations is exactly the
same with and without alignment (so is any CKA whose kernel depends only on inner products or distances between
inputs, e.g. RBF CKA). On the experts' outputs alignment changes nothing at all: the permuted expert computes the
same function. What a permutation does change are measures that pair neuron i of one expert with neuron i of
the other: the mean correlation of same-index neurons (`neuron_corr`), the cosine between the experts' weights
(`weight_cos`), and a CKA over the neurons of the weight matrices (`weight_cka`: the neurons as the samples,
each described by its gate row, up row and down column). With whole-FFN experts and a random router none of these
enters the model's function. So an inter-expert CKA of activations measured "without alignment" is also the value
with alignment; the paper's argument from a CKA of 0.65-0.75 without alignment cannot be about linear CKA of
activations, and if it is about a neuron-paired measure, that measure does not change what the MoE computes.

The inputs: the hidden states entering each MoE layer's experts (the post-attention RMSNorm output) of the
built MoE itself on calibration text; aligned and unaligned builds of the same sources have the same inputs
(their backbones do not depend on neuron order, and a permuted expert has the same output).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of [n, p] and [n, q] activations (float64; see the module docstring)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need two [n >= 2, features] matrices over the same inputs, not {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    den = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return float(torch.linalg.norm(x.T @ y) ** 2 / den) if den > 0 else 0.0


def neuron_corr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean Pearson correlation of same-index neurons (columns) of [n, f] activations (neuron-order sensitive)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    corr = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-12)
    return float(corr.mean())


def expert_weights(state: dict, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [f, d], up [f, d], down [d, f]) of one expert of a per-expert MoE checkpoint."""
    p = f"model.layers.{layer}.mlp.experts.{expert}."
    return tuple(state[p + f"{n}_proj.weight"].double() for n in ("gate", "up", "down"))


def _neurons(w) -> torch.Tensor:
    gate, up, down = w
    return torch.cat([gate, up, down.T], dim=1)  # [f, 3d]: each neuron's weights


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The input of every decoder layer's `mlp` (its experts' input) on `ids` [n, seq_len], [tokens, d] each."""
    layers = model.model.layers
    got = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for chunk in ids.split(batch_size):
            model(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x).double() for x in got]


def expert_similarity(moe_dir, texts: list[str], *, seq_len: int, max_tokens: int, batch_size: int = 8,
                      device="cpu", anchor_expert: int = 0) -> dict:
    """For every MoE layer and every pair of experts: linear CKA of their intermediate activations and of their
    outputs, same-index neuron correlation, weight cosine and weight CKA; per layer the means over pairs; the
    means over layers ("mean"), and per expert the means over layers of its pair with `anchor_expert`
    ("vs_anchor"). Inputs: up to `max_tokens` of `texts` in windows of `seq_len`."""
    from benchmarks.quality.merges import load_state
    from symphony.data import load_model, load_tokenizer, token_stream, windows

    moe_dir = Path(moe_dir)
    model = load_model(moe_dir, device=device, dtype="float32")
    n_experts = model.config.num_experts
    data, _ = windows(token_stream(load_tokenizer(moe_dir), texts), seq_len)
    data = data[:max(1, max_tokens // seq_len)]
    inputs = layer_inputs(model, data, batch_size)
    del model
    state = load_state(moe_dir)
    keys = ("cka_intermediate", "cka_output", "neuron_corr", "weight_cos", "weight_cka")
    layers = []
    for layer, x in enumerate(inputs):
        w = [expert_weights(state, layer, e) for e in range(n_experts)]
        inter = [F.silu(x @ g.T.to(x.device)) * (x @ u.T.to(x.device)) for g, u, _ in w]
        out = [a @ d.T.to(a.device) for a, (_, _, d) in zip(inter, w)]
        pairs = {}
        for i, j in itertools.combinations(range(n_experts), 2):
            flat_i, flat_j = torch.cat([t.flatten() for t in w[i]]), torch.cat([t.flatten() for t in w[j]])
            pairs[f"{i}|{j}"] = {"cka_intermediate": linear_cka(inter[i], inter[j]),
                                 "cka_output": linear_cka(out[i], out[j]),
                                 "neuron_corr": neuron_corr(inter[i], inter[j]),
                                 "weight_cos": float(F.cosine_similarity(flat_i, flat_j, dim=0)),
                                 "weight_cka": linear_cka(_neurons(w[i]), _neurons(w[j]))}
        layers.append({"pairs": pairs, **{k: sum(p[k] for p in pairs.values()) / len(pairs) for k in keys}})
    vs_anchor = {}
    for e in range(n_experts):
        if e != anchor_expert:
            pair = f"{min(e, anchor_expert)}|{max(e, anchor_expert)}"
            vs_anchor[e] = {k: sum(lay["pairs"][pair][k] for lay in layers) / len(layers) for k in keys}
    return {"tokens": int(data.numel()), "layers": layers, "vs_anchor": vs_anchor,
            "mean": {k: sum(lay[k] for lay in layers) / len(layers) for k in keys}}
