"""Dense merges of specialists that share a base: linear average, task arithmetic and TIES (own implementations).

With theta_b the base and tau_s = theta_s - theta_b each specialist's task vector:
- linear:          theta = mean_s theta_s                                  (= task arithmetic with lam = 1/N)
- task arithmetic: theta = theta_b + lam * sum_s tau_s
- TIES (trim, elect sign, disjoint merge): per tensor, keep the `density` fraction of each tau_s with the
  largest magnitudes (ties broken by position, so the result is deterministic), zero the rest; the elected
  sign of every entry is the sign of the sum of the trimmed vectors; the merged entry is the mean of the
  trimmed values that agree with the elected sign (0 where none does); theta = theta_b + lam * merged.
Every tensor of the checkpoint is merged (embeddings, attention, FFN, norms, lm_head); merges run in float64
(on whatever device the tensors are on) and are written in the base's stored dtype as an ordinary transformers
folder (the base's config and tokenizer).

`permute_to_anchor` applies FFN neuron permutations (from symphony.build.align.align_sources) to a state dict first,
so that "linear average after alignment" can be measured: the one dense merge where alignment can matter.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

MERGES = ("linear", "task_arithmetic", "ties")


def load_state(path, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files, as stored, on `device`."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    state = {}
    for f in files:
        state.update(load_file(f, device=str(device)))
    return state


def _check(states: list[dict]):
    if not states:
        raise ValueError("nothing to merge")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError("the checkpoints to merge have different tensors")


def linear(states: list[dict]) -> dict[str, torch.Tensor]:
    _check(states)
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


def task_vector_sum(base: dict, states: list[dict]) -> dict[str, torch.Tensor]:
    """sum_s tau_s per tensor (float64): task arithmetic's direction."""
    _check([base, *states])
    return {k: sum(s[k].double() - base[k].double() for s in states) for k in base}


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, round(density * tau.numel()))
    if k >= tau.numel():
        return tau
    flat = tau.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    # stable sort by descending magnitude: equal magnitudes keep their order, so the choice is deterministic
    keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def ties_direction(base: dict, states: list[dict], density: float = 0.2) -> dict[str, torch.Tensor]:
    """TIES's merged task vector per tensor (float64), before the scale lam (see the module docstring)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], not {density}")
    _check([base, *states])
    out = {}
    for k in base:
        b = base[k].double()
        taus = torch.stack([_trim(s[k].double() - b, density) for s in states])
        sign = torch.sign(taus.sum(0))
        agree = (torch.sign(taus) == sign) & (taus != 0)
        out[k] = torch.where(agree, taus, torch.zeros_like(taus)).sum(0) / agree.sum(0).clamp(min=1)
    return out


def apply_direction(base: dict, direction: dict, lam: float) -> dict[str, torch.Tensor]:
    """theta_b + lam * direction, per tensor (float64)."""
    return {k: base[k].double() + lam * direction[k] for k in base}


def task_arithmetic(base: dict, states: list[dict], lam: float) -> dict[str, torch.Tensor]:
    return apply_direction(base, task_vector_sum(base, states), lam)


def ties(base: dict, states: list[dict], lam: float, density: float = 0.2) -> dict[str, torch.Tensor]:
    return apply_direction(base, ties_direction(base, states, density), lam)


def permute_to_anchor(state: dict, perms: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Qwen2/Llama state dict with every layer's FFN neurons permuted: perms [layers, f], neuron i of the
    result = neuron perms[l, i] of the input (rows of gate/up, columns of down)."""
    out = dict(state)
    for layer in range(perms.shape[0]):
        p = perms[layer].long()
        pre = f"model.layers.{layer}.mlp."
        for name in ("gate_proj", "up_proj"):
            out[pre + name + ".weight"] = state[pre + name + ".weight"][p]
            if pre + name + ".bias" in state:
                out[pre + name + ".bias"] = state[pre + name + ".bias"][p]
        out[pre + "down_proj.weight"] = state[pre + "down_proj.weight"][:, p]
    return out


def save_like(template_dir, state: dict[str, torch.Tensor], out_dir):
    """Write `state` as a checkpoint in `out_dir`, in the template's stored dtype, with the template's config,
    tokenizer and other small files (one safetensors file)."""
    from safetensors.torch import save_file

    template_dir, out_dir = Path(template_dir), Path(out_dir)
    stored = load_state(template_dir)
    if stored.keys() != state.keys():
        raise ValueError("the merged state has other tensors than the template")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for p in template_dir.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(p, out_dir / p.name)
    tensors = {k: v.to(stored[k].dtype).cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
