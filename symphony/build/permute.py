"""Neuron permutations of dense FFNs: the step that applies an alignment. Any permutation of an FFN's hidden
neurons (rows of gate and up, columns of down) leaves its function unchanged."""
from __future__ import annotations

import torch

from symphony.build.capture import decoder_layers


def _check_perm(perm: torch.Tensor, n: int, what: str = "perm") -> torch.Tensor:
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int64, torch.int32) or perm.dim() != 1:
        raise TypeError(f"{what} must be a 1-D int64/int32 tensor")
    if perm.numel() != n:
        raise ValueError(f"{what} has {perm.numel()} entries for {n} neurons")
    p = perm.long()
    if n and not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
        raise ValueError(f"{what} is not a permutation of 0..{n - 1}")
    return p


def permute_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor):
    """(gate[perm], up[perm], down[:, perm]) for a dense FFN with gate/up [f, d] and down [d, f].

    New neuron i is old neuron perm[i]. The permuted FFN computes exactly the same function (the same sums,
    in another order). Returns new contiguous tensors; the inputs are not modified."""
    if gate.dim() != 2 or up.shape != gate.shape or down.dim() != 2 or down.shape != gate.shape[::-1]:
        raise ValueError(f"permute_ffn needs gate/up [f, d] and down [d, f]; got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)}, {tuple(down.shape)}")
    p = _check_perm(perm, gate.shape[0]).to(gate.device)
    return gate.index_select(0, p), up.index_select(0, p), down.index_select(1, p)


def permute_ffn_biases(gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, perm: torch.Tensor):
    """(gate_bias[perm], up_bias[perm]) for an FFN with biases (Llama's mlp_bias); None stays None.

    The down projection's bias [d] lives on the output side and is not permuted."""
    out = []
    for name, b in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if b is None:
            out.append(None)
            continue
        if b.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(b.shape)}")
        out.append(b.index_select(0, _check_perm(perm, b.shape[0]).to(b.device)))
    return tuple(out)


@torch.no_grad()
def apply_ffn_permutation(model, perms: torch.Tensor):
    """Permute the FFN neurons of every layer of a loaded dense model in place (perms: [layers, f]).

    The model computes the same function afterwards. Returns the model."""
    layers = decoder_layers(model)
    f = layers[0].mlp.gate_proj.out_features
    if not isinstance(perms, torch.Tensor) or perms.dim() != 2 or perms.shape != (len(layers), f):
        raise ValueError(f"perms must be a [layers={len(layers)}, f={f}] tensor, got "
                         f"{tuple(perms.shape) if isinstance(perms, torch.Tensor) else type(perms).__name__}")
    for layer, perm in zip(layers, perms):
        mlp = layer.mlp
        g, u, d = permute_ffn(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, perm)
        mlp.gate_proj.weight.copy_(g)
        mlp.up_proj.weight.copy_(u)
        mlp.down_proj.weight.copy_(d)
        gb, ub = permute_ffn_biases(mlp.gate_proj.bias, mlp.up_proj.bias, perm)
        if gb is not None:
            mlp.gate_proj.bias.copy_(gb)
        if ub is not None:
            mlp.up_proj.bias.copy_(ub)
    return model
