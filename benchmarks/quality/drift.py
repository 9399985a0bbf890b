"""How far the specialists drifted apart: parameter distances and FFN neuron correlation before alignment.

- `parameter_drift(base_dir, {name: dir})`: per specialist, the relative L2 distance to the base
  ||theta_s - theta_base|| / ||theta_base|| over all parameters and per group (embeddings, attention, FFN, norms,
  lm_head), and the cosine similarity between the task vectors (theta_s - theta_base) of every pair.
- `neuron_correlation(anchor_dir, {name: dir}, docs)`: per non-anchor source, per layer, the mean Pearson
  correlation between anchor FFN neuron i and source neuron i over calibration tokens ("identity", i.e. before
  alignment), the mean matched correlation after the linear assignment (symphony.build.correlate.align_models, the
  pipeline's own code on symphony_kernels' CorrelationAccumulator), and the fraction of neurons that the
  matching leaves in place. A fraction near 1 means the specialists still share the base's neuron order, so
  alignment is close to the identity.
"""
from __future__ import annotations

from pathlib import Path

import torch

GROUPS = (("embeddings", "embed_tokens"), ("lm_head", "lm_head"), ("attention", "self_attn"), ("ffn", ".mlp."),
          ("norms", "norm"))


def _group(name: str) -> str:
    return next((g for g, key in GROUPS if key in name), "other")


def _state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {path}")
    state = {}
    for f in files:
        state.update({k: v.double() for k, v in load_file(f).items()})
    return state


def parameter_drift(base_dir, specialists: dict) -> dict:
    """{"to_base": {name: {"all": d, group: d, ...}}, "task_vector_cosine": {"a|b": cos}} (see module docstring)."""
    base = _state(base_dir)
    deltas, out = {}, {"to_base": {}, "task_vector_cosine": {}}
    for name, path in specialists.items():
        state = _state(path)
        if state.keys() != base.keys():
            raise ValueError(f"{name} has other tensors than the base")
        sq, ref = {}, {}
        for k in base:
            g = _group(k)
            sq[g] = sq.get(g, 0.0) + (state[k] - base[k]).pow(2).sum().item()
            ref[g] = ref.get(g, 0.0) + base[k].pow(2).sum().item()
        report = {"all": (sum(sq.values()) / sum(ref.values())) ** 0.5}
        report.update({g: (sq[g] / ref[g]) ** 0.5 for g in sq if ref[g] > 0})
        out["to_base"][name] = report
        deltas[name] = torch.cat([(state[k] - base[k]).flatten() for k in sorted(base)])
    names = list(deltas)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cos = torch.nn.functional.cosine_similarity(deltas[a], deltas[b], dim=0).item()
            out["task_vector_cosine"][f"{a}|{b}"] = cos
    return out


def neuron_correlation(anchor_dir, sources: dict, docs: list[str], *, seq_len: int, batch_size: int = 8,
                       max_tokens: int = 65536, device="auto") -> dict:
    """symphony.build.align.align_sources' report for the non-anchor `sources` ({name: folder}) against the anchor
    on `docs`: per source "mean_before" (identity pairing), "mean_after" (matched) and per layer "before",
    "after", "moved" (fraction of neurons the matching moves); plus "mean_moved" per source."""
    from symphony.build.align import align_sources
    from symphony.data import load_tokenizer, resolve_device, token_stream

    dev = resolve_device(device)
    stream = token_stream(load_tokenizer(anchor_dir), docs)
    names = ["anchor", *sources]
    result = align_sources([anchor_dir, *sources.values()], 0, stream, device=dev, dtype=torch.float32,
                           batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens, progress=False)
    out = {}
    for name, entry in zip(names, result.report["sources"]):
        if name == "anchor":
            continue
        entry = dict(entry, name=name)
        entry["mean_moved"] = sum(l["moved"] for l in entry["layers"]) / len(entry["layers"])
        out[name] = entry
    return out
