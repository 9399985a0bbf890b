"""The contenders of the quality study, and how each one is made from the family.

Kinds:
- "checkpoint": a family member as it is (the base, each specialist);
- "merge": a dense merge of the specialists (merges.py), with task arithmetic's and TIES's scaling chosen on
  the validation text (the value with the lowest mean validation loss over the training domains);
- "moe": a Symphony-MoE pipeline config (a dict for `symphony.build.pipeline.build`): `moe_config` fills in the
  sources (the specialists, each with its domain's calibration text), the anchor and the study's calibration
  settings, then applies the contender's overrides. Stage 1 is built once per contender with
  `router_training.steps: 0`; stage 2 (when `train` is "router" or "full") then runs once per seed through
  `symphony.train.train_router` on the stage-1 model, which is what `build` runs as its stage 2. Every
  contender that trains gets the same router-training budget (steps x batch x seq_len tokens).

Every MoE contender differs from `symphony` in what its `about` says; `ORDER` is the order in which the study
runs them (most important first, so a run that hits its time budget still has the main comparison).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Contender:
    name: str
    group: str                # "source", "merge", "baseline" (MoE baselines), "symphony", "ablation"
    kind: str                 # "checkpoint", "merge", "moe"
    about: str
    member: str | None = None           # checkpoint: "base" or a domain name
    merge: str | None = None            # merge: linear, linear_aligned, task_arithmetic, ties
    overrides: dict = field(default_factory=dict)  # moe: deep-merged into the pipeline config
    train: str | None = None            # moe: None (stage 1 only), "router" or "full"
    calibration: str = "default"        # moe: "default" or "small" calibration text
    alignment_can_matter: bool | None = None  # moe: where neuron order meets other weights


NO_ALIGN = {"alignment": {"enabled": False}}
ALIGN = {"alignment": {"enabled": True}}


def _moe(name, group, about, overrides=None, train="router", calibration="default"):
    overrides = copy.deepcopy(overrides or {})
    merged = _deep_merge(copy.deepcopy(ALIGN), overrides)
    experts = merged.get("experts", {})
    can_matter = experts.get("per_source", 1) > 1 or experts.get("shared_expert", "none") == "mean"
    return Contender(name, group, "moe", about, overrides=merged, train=train, calibration=calibration,
                     alignment_can_matter=can_matter)


def contenders(domains: list[str]) -> list[Contender]:
    """Every contender for a family whose specialists are `domains` (in ORDER)."""
    out = [Contender("base", "source", "checkpoint", "the base, pre-trained on the mix", member="base")]
    out += [Contender(f"spec-{d}", "source", "checkpoint", f"the {d} specialist alone", member=d) for d in domains]
    out += [
        Contender("merge-linear", "merge", "merge", "linear average of the specialists", merge="linear"),
        Contender("merge-task-arith", "merge", "merge", "task arithmetic on the base (scale tuned on validation)",
                  merge="task_arithmetic"),
        Contender("merge-ties", "merge", "merge", "TIES: trim to 20%, elect sign, disjoint mean (scale tuned)",
                  merge="ties"),
        Contender("merge-linear-aligned", "merge", "merge",
                  "linear average after aligning FFN neurons to the anchor", merge="linear_aligned"),
        _moe("mergekit-moe", "baseline", "anchor's backbone, hidden-state router init, no training",
             {"fusion": {"t": 0.0, "embeddings": "anchor", "norms": "anchor"}, **NO_ALIGN}, train=None),
        _moe("symphony-stage1", "baseline", "Symphony stage 1 only (SLERP backbone, aligned experts, hidden init)",
             train=None),
        _moe("symphony", "symphony", "SLERP backbone, aligned experts, hidden init, router training"),
        _moe("upcycle-naive", "baseline", "linear backbone, unaligned experts, random router init, same training",
             {"fusion": {"attention": "linear"}, "experts": {"router_init": "random"}, **NO_ALIGN}),
        _moe("no-align", "ablation", "symphony without alignment", NO_ALIGN),
        _moe("shared", "ablation", "+ shared expert = mean of the aligned FFNs",
             {"experts": {"shared_expert": "mean"}}),
        _moe("shared-no-align", "ablation", "+ shared expert = mean of the unaligned FFNs",
             {"experts": {"shared_expert": "mean"}, **NO_ALIGN}),
        _moe("split2", "ablation", "2 experts per source (aligned FFN halves), top-4",
             {"experts": {"per_source": 2, "top_k": 4}}),
        _moe("split2-no-align", "ablation", "2 experts per source (unaligned FFN halves), top-4",
             {"experts": {"per_source": 2, "top_k": 4}, **NO_ALIGN}),
        _moe("linear-fusion", "ablation", "linear average instead of SLERP for attention",
             {"fusion": {"attention": "linear"}}),
        _moe("full-post", "ablation", "full post-training instead of router-only", train="full"),
        _moe("full-post-no-align", "ablation", "full post-training, no alignment", NO_ALIGN, train="full"),
        _moe("top1", "ablation", "top-1 routing", {"experts": {"top_k": 1}}),
        _moe(f"top{len(domains)}", "ablation", f"top-{len(domains)} routing (every expert)",
             {"experts": {"top_k": len(domains)}}),
        _moe("calib-small", "ablation", "1/16 of the calibration text (alignment and router init)",
             calibration="small"),
        _moe("router-random", "ablation", "random router init instead of hidden-state centroids",
             {"experts": {"router_init": "random"}}),
    ]
    return out


SMOKE = ("base", "merge-linear", "merge-ties", "merge-linear-aligned", "mergekit-moe", "symphony", "shared",
         "split2", "full-post")


def smoke_set(all_contenders: list[Contender]) -> list[Contender]:
    """The contenders that the toy run makes by default: one of every code path (checkpoint, each merge kind,
    MoE without training, router-only and full stage 2, shared expert, split experts) plus every specialist;
    the others differ from these only in their pipeline config, which every run validates up front."""
    return [c for c in all_contenders if c.name in SMOKE or c.name.startswith("spec-")]


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def moe_config(contender: Contender, *, family_dir, domains: list[str], anchor: str, calib_files: dict,
               align_tokens: int, seq_len: int, batch_size: int, device: str, seed: int = 0) -> dict:
    """The pipeline config (a dict for symphony.build.pipeline.build) of an MoE contender, stage 1 only.

    calib_files: {domain: path} of that contender's calibration text per source (absolute paths)."""
    from pathlib import Path

    if contender.kind != "moe":
        raise ValueError(f"{contender.name} is not an MoE contender")
    if anchor not in domains:
        raise ValueError(f"anchor {anchor!r} is not one of the domains {domains}")
    cfg = {
        "sources": [{"name": d, "path": str(Path(family_dir) / d), "calibration": [str(calib_files[d])]}
                    for d in domains],
        "anchor": anchor,
        "fusion": {"attention": "slerp"},
        "alignment": {"max_tokens": align_tokens, "seq_len": seq_len, "batch_size": batch_size},
        "experts": {"per_source": 1, "top_k": 2, "shared_expert": "none", "router_init": "hidden"},
        "router_training": {"steps": 0},
        "device": device,
        "seed": seed,
    }
    return _deep_merge(cfg, contender.overrides)
