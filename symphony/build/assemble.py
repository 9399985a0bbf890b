"""Assembly: every output tensor of the MoE made from the sources, one at a time, and written as a checkpoint
that loads with `AutoModelForCausalLM.from_pretrained` (no remote code).

The parts: symphony.build.targets (the output architectures), symphony.build.fusion (backbone tensors),
symphony.build.experts (expert tensors), symphony.build.router_init (router rows),
symphony.build.writer (the streaming writer, which knows every tensor's name, shape and dtype up front).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from symphony.build.experts import expert_producer, fused_producer, shared_producer
from symphony.build.targets import target_of
from symphony.build.writer import Entry, write_shards
from symphony.errors import SymphonyError


def model_tensors(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the target model, in transformers' in-memory (fused) layout, as the
    installed transformers builds it (on the meta device)."""
    from transformers import AutoModelForCausalLM

    from symphony.data import quiet_zero_size_init

    with torch.device("meta"), quiet_zero_size_init():  # a disabled shared expert has 0-neuron weights
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class MoEPlan:
    """Everything assembly needs besides the sources: see `plan_entries`."""

    sources: list                      # symphony.build.sources.Source, in config order
    anchor_index: int
    vocab: object                      # symphony.build.sources.Vocabulary
    config: object                     # the target transformers config
    expert_sources: list[int]          # indices into `sources`, one per expert source
    per_source: int
    shared_expert: str                 # "none" | "mean"
    attention: str                     # "slerp" | "linear"
    layer_weights: list[list[float]]   # per layer, the fusion weight of every source
    embeddings: str                    # "selective" | "anchor"
    norms: str                         # "linear" | "anchor"
    routers: Callable[[int], torch.Tensor]  # layer -> [E, d] router weight (float32)
    perms: dict[int, torch.Tensor]     # source index -> [layers, f] permutation (absent: identity)
    layout: str = "per_expert"

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def expert_names(self) -> list[str]:
        """The source name of every expert, in expert order."""
        return [self.sources[s].name for s in self.expert_sources for _ in range(self.per_source)]


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _backbone_producer(plan: MoEPlan, name: str):
    """The producer of one non-FFN tensor (embeddings, lm_head, attention, norms) of the target."""
    from symphony.build.fusion import fuse, linear_mean, merge_rows

    sources, dtype = plan.sources, plan.dtype
    if not all(s.has(name) for s in sources):
        raise SymphonyError(f"no source tensor for {name!r} of the target model")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        def rows():
            return merge_rows(lambda s, lo, hi: sources[s].rows(name, lo, hi), plan.vocab.local_ids,
                              plan.anchor_index, plan.embeddings, dtype)
        return rows
    layer = _layer_of(name)
    if name.endswith("norm.weight"):
        def norm():
            if plan.norms == "anchor":
                return sources[plan.anchor_index].tensor(name).to(dtype)
            return linear_mean([s.tensor(name) for s in sources], None, dtype)
        return norm
    if layer is not None and ".self_attn." in name:
        def attention():
            return fuse([s.tensor(name) for s in sources], plan.layer_weights[layer], plan.attention, dtype)
        return attention
    raise SymphonyError(f"do not know how to fuse tensor {name!r}")


def plan_entries(plan: MoEPlan) -> list[Entry]:
    """Every tensor of the output checkpoint, in order, checked against the tensors transformers expects."""
    config = plan.config
    expected = model_tensors(config)
    E = len(plan.expert_sources) * plan.per_source
    d, f = config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    fused_of = {}  # saved per-expert name -> the fused tensor it is part of (for the check)
    entries, seen = [], set()
    for name, shape in expected.items():
        layer = _layer_of(name)
        if layer is None or ".mlp." not in name:
            entries.append(Entry(name, shape, plan.dtype, _backbone_producer(plan, name)))
            seen.add(name)
            continue
        if name.endswith("mlp.gate.weight"):  # first MoE tensor of the layer: emit the layer's whole MLP
            for saved, kind, expert, part in target_of(config).mlp_names(layer, E, plan.layout):
                if kind == "router":
                    entries.append(Entry(saved, (E, d), plan.dtype, lambda l=layer: plan.routers(l).to(plan.dtype)))
                    seen.add(name)
                elif kind == "expert":
                    shp = (d, f) if part == "down" else (f, d)
                    entries.append(Entry(saved, shp, plan.dtype, expert_producer(plan, layer, expert, part)))
                    fused_of[saved] = f"model.layers.{layer}.mlp.experts." + \
                        ("down_proj" if part == "down" else "gate_up_proj")
                elif kind == "fused":
                    shp = (E, d, f) if part == "down" else (E, 2 * f, d)
                    entries.append(Entry(saved, shp, plan.dtype, fused_producer(plan, layer, part)))
                    seen.add(saved)
                elif kind == "shared":
                    shp = expected[saved]
                    entries.append(Entry(saved, shp, plan.dtype, shared_producer(plan, layer, part, shp)))
                    seen.add(saved)
                else:
                    shp = expected[saved]
                    entries.append(Entry(saved, shp, plan.dtype, lambda s=shp: torch.zeros(s, dtype=plan.dtype)))
                    seen.add(saved)
    seen |= set(fused_of.values())
    missing = [k for k in expected if k not in seen]
    if missing:
        raise SymphonyError(f"internal: no output tensor planned for {missing[0]!r} of {config.architectures[0]}")
    for e in entries:
        if e.name in expected and tuple(expected[e.name]) != e.shape:
            raise SymphonyError(f"internal: {e.name} planned as {e.shape}, transformers expects {expected[e.name]}")
    return entries


def write_model(plan: MoEPlan, folder: Path, *, max_shard_size: int, report: dict, progress: bool = True) -> dict:
    """Write the MoE checkpoint into the existing empty `folder`: safetensors shards (+ index), config.json,
    generation_config.json, the union tokenizer and alignment_report.json. Returns the writer's summary."""
    from transformers import GenerationConfig

    from symphony.data import write_json
    from symphony.evaluate import REPORT

    entries = plan_entries(plan)
    written = write_shards(folder, entries, max_shard_size, progress=progress)
    plan.config.save_pretrained(folder)
    anchor = plan.sources[plan.anchor_index]
    try:
        gen = GenerationConfig.from_pretrained(anchor.path)
    except OSError:
        gen = GenerationConfig.from_model_config(plan.config)
    gen.save_pretrained(folder)
    plan.vocab.tokenizer.save_pretrained(folder)
    write_json(folder / REPORT, report)
    return written
