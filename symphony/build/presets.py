"""Presets of the build config: named sets of keys put under what a YAML file gives (`preset: paper`).

`paper` is the protocol of the Symphony-MoE paper's AAAI version (arXiv 2509.18542): SLERP attention with equal
weights, selective embeddings, averaged norms, one aligned whole-FFN expert per source, a random top-2 router,
and full post-training (aux coefficient 0.01, constant learning rate 5e-5, no warmup, 2048-token windows).
examples/build.yaml lists it; a key the file gives wins over the preset's.
"""
from __future__ import annotations

import copy

from symphony.errors import SymphonyError

PRESETS = {
    "default": {},
    "paper": {
        "fusion": {"attention": "slerp", "t": None, "embeddings": "selective", "norms": "linear"},
        "alignment": {"enabled": True},
        "experts": {"per_source": 1, "top_k": 2, "shared_expert": "none", "router_init": "random"},
        "router_training": {"train": "full", "aux_loss_coef": 0.01, "lr": 5e-5, "schedule": "constant",
                            "warmup": 0.0, "seq_len": 2048},
    },
}


def _under(base: dict, extra: dict) -> dict:
    """`extra` deep-merged over `base` (a section given as null keeps the base's section)."""
    for key, value in extra.items():
        if isinstance(base.get(key), dict) and (value is None or isinstance(value, dict)):
            _under(base[key], value or {})
        else:
            base[key] = value
    return base


def apply_preset(data):
    """(the mapping with its preset's keys under its own, the preset's name); SymphonyError for an unknown one."""
    if not isinstance(data, dict):
        return data, "default"
    name = data.get("preset", "default")
    if not isinstance(name, str) or name not in PRESETS:
        raise SymphonyError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return _under(copy.deepcopy(PRESETS[name]), {k: v for k, v in data.items() if k != "preset"}), name
