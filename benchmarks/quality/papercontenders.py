"""The contenders of the paper-protocol study (issue 13) and how each is made from the paper family.

Every contender that trains gets the same post-training: the stage 2 of `preset: paper` (every parameter,
AdamW, constant lr 5e-5, load-balancing coefficient 0.01), the same steps x batch x windows of the same text,
and the same seeds. MoEs built by the pipeline train through symphony.train.train_router; the dense controls
and BAM (a model class of its own, bam.py) through posttrain.train_model, which is train_router's recipe.

Kinds: "checkpoint" (a family member as it is), "merge" (a dense merge, no training), "dense_post" (a dense
model post-trained: the anchor, or the best dense merge on validation text), "moe" (a pipeline config: `preset:
paper` plus the contender's overrides, stage 1 built per seed with that seed, then an optional post-processing
of the stage-1 checkpoint, then stage 2), "bam".

- symphony: `preset: paper` as it is (SLERP Q/K/V/O with equal weights, selective embeddings, averaged norms,
  aligned whole-FFN experts, random top-2 router).
- btx: every non-FFN weight linearly averaged (attention: linear; embeddings: the selective merge is the plain
  average here, the sources sharing one vocabulary; norms: average), the FFNs as experts, no alignment.
- drop-upcycling: btx's model, then in every expert a random `drop_ratio` of the FFN neurons re-initialised
  (Nakamura et al. 2025, arXiv 2502.19261: for each expert one random subset of intermediate indices; the
  rows of gate and up and the columns of down at those indices drawn from a normal with the mean and standard
  deviation of the entries they replace, per matrix), seeded per seed.
- bam: bam.py (attention experts for Q and O, K/V and the rest averaged, FFN experts).
- ablations of symphony, one change each: no-align, linear-attn, plain-embed (embedding and lm_head rows
  averaged index by index; with one shared vocabulary this equals the selective merge, which the study checks
  on the built weights and then reports instead of training the same model again), calib-general (alignment
  calibration text from the general domain only), router-only (stage 2 trains the router alone, as the paper's
  first arXiv version and `router_training.train: router` do; same steps, tokens and learning rate).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks.quality.contenders import _deep_merge

# the paper's 1.5B numbers (accuracy, higher is better): (in-domain average, OOD)
PAPER = {"symphony": (44.07, 35.26), "drop-upcycling": (41.10, 32.90), "bam": (39.55, 28.97), "btx": (33.94, 26.92),
         "best-dense": (40.95, 30.39), "no-align": (33.94, 26.92), "linear-attn": (37.28, 31.77),
         "plain-embed": (40.19, 31.95), "calib-general": (39.70, 29.44)}


@dataclass(frozen=True)
class PaperContender:
    name: str
    group: str              # "base", "source", "merge", "control", "symphony", "baseline", "ablation"
    kind: str               # "checkpoint", "merge", "dense_post", "moe", "bam"
    about: str
    member: str | None = None        # checkpoint: a family member; dense_post: "anchor" or "best-merge"
    merge: str | None = None         # merge: "linear", "linear-aligned", "linear-base-a"
    overrides: dict = field(default_factory=dict)
    post: str | None = None          # moe: "drop" or "plain-embed", applied to the stage-1 checkpoint
    calibration: str = "all"         # moe: "all" (every domain) or "general"


BTX = {"fusion": {"attention": "linear"}, "alignment": {"enabled": False}}


def contenders(roles: dict[str, str]) -> list[PaperContender]:
    """Every contender for a family whose sources are `roles` ({"general": domain, ...})."""
    C = PaperContender
    out = [C("base_a", "base", "checkpoint", "base A (pre-trained, the general/math/code lineage)", member="base_a"),
           C("base_b", "base", "checkpoint", "base B (another seed and data order)", member="base_b")]
    out += [C(f"src-{d}", "source", "checkpoint", f"the {role} source ({d}) as it is", member=d)
            for role, d in roles.items()]
    out += [C("merge-linear", "merge", "merge", "linear average of the four sources", merge="linear"),
            C("merge-linear-aligned", "merge", "merge", "linear average after aligning FFN neurons to the anchor",
              merge="linear-aligned"),
            C("merge-base-a", "merge", "merge", "linear average of the three base-A sources", merge="linear-base-a"),
            C("anchor-post", "control", "dense_post", "the anchor, post-trained like the MoEs", member="anchor"),
            C("merge-post", "control", "dense_post", "the best dense merge (validation), post-trained like the MoEs",
              member="best-merge"),
            C("symphony", "symphony", "moe", "preset: paper"),
            C("btx", "baseline", "moe", "BTX: non-FFN weights averaged, FFN experts, no alignment", overrides=BTX),
            C("drop-upcycling", "baseline", "moe", "btx with half of every expert's FFN neurons re-initialised",
              overrides=BTX, post="drop"),
            C("bam", "baseline", "bam", "BAM: Q/O attention experts + FFN experts, the rest averaged"),
            C("no-align", "ablation", "moe", "symphony without alignment", overrides={"alignment": {"enabled": False}}),
            C("linear-attn", "ablation", "moe", "symphony with a linear average for Q/K/V/O",
              overrides={"fusion": {"attention": "linear"}}),
            C("plain-embed", "ablation", "moe", "symphony with embeddings averaged index by index", post="plain-embed"),
            C("calib-general", "ablation", "moe", "symphony with alignment calibrated on the general domain only",
              calibration="general"),
            C("router-only", "ablation", "moe", "symphony with the first arXiv version's stage 2: the router alone",
              overrides={"router_training": {"train": "router"}})]
    return out


def by_name(roles: dict[str, str], name: str) -> PaperContender:
    found = [c for c in contenders(roles) if c.name == name]
    if not found:
        raise ValueError(f"unknown contender {name!r}; known: {', '.join(c.name for c in contenders(roles))}")
    return found[0]


def moe_config(c: PaperContender, *, family_dir, roles: dict, calib_files: dict, align_tokens: int, seq_len: int,
               batch_size: int, device: str, seed: int) -> dict:
    """The pipeline config of an MoE contender (stage 1 only: router_training.steps 0).
    calib_files: {domain: path} of each source's calibration text (absolute)."""
    from pathlib import Path

    if c.kind != "moe":
        raise ValueError(f"{c.name} is not a pipeline MoE contender")
    domains = list(roles.values())
    cfg = {"preset": "paper",
           "sources": [{"name": d, "path": str(Path(family_dir) / d), "calibration": [str(calib_files[d])]}
                       for d in domains],
           "anchor": roles["general"],
           "alignment": {"max_tokens": align_tokens, "seq_len": seq_len, "batch_size": batch_size},
           "router_training": {"steps": 0}, "device": device, "seed": seed}
    if c.calibration == "general":
        cfg["alignment"]["calibration"] = [str(calib_files[roles["general"]])]
    return _deep_merge(cfg, c.overrides)


def drop_reinit(state: dict, *, num_layers: int, num_experts: int, ratio: float, seed: int) -> dict:
    """Drop-Upcycling's re-initialisation of a per-expert MoE state dict (module docstring); a new dict."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"drop ratio must be in [0, 1], not {ratio}")
    out = dict(state)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(num_layers):
        for e in range(num_experts):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            f = state[p + "gate_proj.weight"].shape[0]
            idx = torch.randperm(f, generator=gen)[:int(f * ratio)]
            if idx.numel() == 0:
                continue
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                w = state[p + f"{name}.weight"].clone()
                part = w.index_select(dim, idx).float()
                shape = list(w.shape)
                shape[dim] = idx.numel()
                new = torch.randn(shape, generator=gen) * part.std() + part.mean()
                w.index_copy_(dim, idx, new.to(w.dtype))
                out[p + f"{name}.weight"] = w
    return out


def plain_embeddings(state: dict, sources: list[dict]) -> dict:
    """`state` with embed_tokens and lm_head replaced by the index-wise mean of the sources' (a new dict)."""
    out = dict(state)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            rows = min(s[key].shape[0] for s in sources)
            if any(s[key].shape[0] != rows for s in sources) or state[key].shape[0] != rows:
                raise ValueError(f"{key}: the sources' vocabularies differ in size; a plain merge needs one size")
            out[key] = torch.stack([s[key].float() for s in sources]).mean(0).to(state[key].dtype)
    return out
