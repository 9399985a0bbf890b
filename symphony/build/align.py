"""Stage 1b of a Symphony-MoE build: functional alignment of the sources' FFN neurons to an anchor.

Alignment. A dense FFN computes ``down @ (act(gate @ x) * (up @ x))``; its hidden "neurons" are the rows of
`gate` and `up` and the matching columns of `down`. Every non-anchor source runs its own dense forward over
the same calibration windows as the anchor; the FFN intermediate activations of every layer (the input of
``mlp.down_proj``) stream into a correlation accumulator (symphony_kernels.correlation), never stored whole.
Per layer, C[i, j] is the Pearson correlation between anchor neuron i and source neuron j over all calibration
tokens, and a maximum-weight perfect matching (symphony_kernels.matching) gives ``perm[i]``, the source neuron
matched to anchor neuron i. The aligned source FFN is ``gate[perm], up[perm], down[:, perm]`` (`permute_ffn`):
its neuron i now plays the role of the anchor's neuron i, and, as any neuron permutation, it computes exactly
the same function as before. The score of a layer is the mean matched correlation ``mean_i C[i, perm[i]]``;
"before" is the identity matching ``mean_i C[i, i]``.

Alignment therefore cannot change an MoE whose experts are whole, unmerged source FFNs; it matters wherever
neuron i of one source meets neuron i of another: averaged/merged FFNs, a shared expert built from several
sources, experts split into finer experts. benchmarks/align_effect.py measures by how much (3 fixture Qwen2
sources, 3 seeds, held-out loss aligned minus unaligned): whole-FFN experts, max |delta logit| 3e-6 (rounding)
even after router training; a dense merge (mean FFN) of sources from independent inits -0.236 nats/token, of
sources fine-tuned from one base +0.014 (from -0.007 to +0.047: their identity order is already the weights'
own correspondence); a shared expert = mean of the FFNs -0.038 (independent) and -0.004 (one base); FFNs split
into 2 experts each, with trained routers: +0.003 and +0.001, within a seed-to-seed spread of +-0.03.

The parts: symphony.build.capture (activations, calibration windows), symphony.build.correlate (the
correlation pass and its memory), symphony.build.permute (applying a permutation); this module drives them
over every source (`align_sources`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from symphony.build.capture import (check_id_map, check_stream, load_source, pair_streams, source_name,
                                     check_ids_fit, calibration_windows, decoder_layers)
from symphony.build.correlate import positive_int, align_models, default_update_tokens
from symphony.errors import SymphonyError

__all__ = ["AlignmentResult", "align_sources"]


@dataclass
class AlignmentResult:
    """The outcome of `align_sources`: `perms[i]` [layers, f] per source (the identity for the anchor) and a
    JSON-ready `report`."""

    perms: list[torch.Tensor]
    report: dict = field(default_factory=dict)

    def table(self) -> str:
        """A printable table: per layer, the mean matched correlation of each source before -> after."""
        sources = [s for s in self.report["sources"] if not s["anchor"]]
        if not sources:
            return "alignment: no source besides the anchor"
        heads = [s["name"] for s in sources]
        width = max(15, *map(len, heads))
        lines = [f"FFN alignment to anchor {self.report['anchor']!r}: mean matched neuron correlation, "
                 "before -> after",
                 "layer  " + "  ".join(f"{h:>{width}}" for h in heads)]
        n_layers = len(sources[0]["layers"])
        for l in range(n_layers):
            cells = [f"{s['layers'][l]['before']:+.3f} -> {s['layers'][l]['after']:+.3f}" for s in sources]
            lines.append(f"{l:>5}  " + "  ".join(f"{c:>{width}}" for c in cells))
        cells = [f"{s['mean_before']:+.3f} -> {s['mean_after']:+.3f}" for s in sources]
        lines.append(f"{'mean':>5}  " + "  ".join(f"{c:>{width}}" for c in cells))
        moved = [_mean([layer["moved"] for layer in s["layers"]]) for s in sources]
        lines.append("moved  " + "  ".join(f"{100 * m:>{width - 1}.1f}%" for m in moved))
        lines.append("tokens " + "  ".join(f"{s['tokens']:>{width}}" for s in sources)
                     + f"   (solver {self.report['solver']})")
        return "\n".join(lines)


def align_sources(sources, anchor_index: int, calib_ids: torch.Tensor, *, device="cpu", dtype=torch.float32,
                  batch_size: int = 8, seq_len: int = 512, max_tokens: int | None = None, solver: str = "auto",
                  id_maps=None, layers_per_pass: int | None = None, update_tokens: int | None = None,
                  progress: bool = True) -> AlignmentResult:
    """Align every non-anchor source's FFN neurons to the anchor's (see the module docstring).

    sources: objects with `.name` and `.path` (symphony.build.sources.Source, which may also offer
    `load_model(device=, dtype=)`), or model folders. calib_ids: a 1-D stream of token ids in the calibration
    vocabulary (the anchor's unless `id_maps` says otherwise). id_maps: None, or one entry per source (None =
    the calibration ids are that source's ids; else a 1-D tensor calibration id -> source id, -1 if missing).
    At most two models are in memory at once: the anchor, loaded once, and one source at a time (the
    anchor's forwards are repeated for every source). `layers_per_pass` bounds the correlation memory and
    `update_tokens` sets the tokens per accumulator update (see `align_models`; `auto_layers_per_pass` picks
    layers_per_pass for a memory budget); solver: symphony_kernels.matching's ("auto", "scipy", "auction").

    Returns an AlignmentResult: perms[i] [layers, f] int64 on the CPU (identity for the anchor); report =
    {"anchor", "solver", "seq_len", "batch_size", "max_tokens", "layers_per_pass", "update_tokens", "dtype",
    "device",
    "sources": [{"name", "anchor", "tokens",
    "dropped_tokens", "seconds", "mean_before", "mean_after", "layers": [{"layer", "before", "after",
    "moved"}]}]} where "moved" is the fraction of the layer's neurons that the permutation moves.
    """
    sources = list(sources)
    if len(sources) < 1:
        raise ValueError("align_sources needs at least one source")
    if isinstance(anchor_index, bool) or not isinstance(anchor_index, int) or not 0 <= anchor_index < len(sources):
        raise ValueError(f"anchor_index must be in [0, {len(sources)}), not {anchor_index!r}")
    calib_ids = check_stream(calib_ids)
    if int(calib_ids.min()) < 0:
        raise ValueError("calibration token ids must be non-negative")
    calib_windows_kw = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    calibration_windows(calib_ids[:1], **calib_windows_kw)  # checks the numbers before any heavy work
    if layers_per_pass is not None:
        positive_int(layers_per_pass, "layers_per_pass")
    device = torch.device(device)
    update_tokens = positive_int(default_update_tokens(device) if update_tokens is None else update_tokens,
                                  "update_tokens")
    from symphony_kernels.matching import SOLVERS

    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    if id_maps is None:
        id_maps = [None] * len(sources)
    if len(id_maps) != len(sources):
        raise ValueError(f"id_maps has {len(id_maps)} entries for {len(sources)} sources")
    n_calib_vocab = int(calib_ids.max()) + 1
    id_maps = [check_id_map(m, n_calib_vocab, i) for i, m in enumerate(id_maps)]
    names = [source_name(s, i) for i, s in enumerate(sources)]
    for i, source in enumerate(sources):  # cheap vocabulary check from the configs, before loading any model
        vocab = getattr(getattr(source, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and id_maps[i] is None and n_calib_vocab > vocab:
            raise SymphonyError(f"calibration token id {n_calib_vocab - 1} is outside the vocabulary of "
                                f"{names[i]!r} ({vocab} tokens); give an id map for this source")

    anchor = load_source(sources[anchor_index], device, dtype)
    layers = decoder_layers(anchor)
    f = layers[0].mlp.down_proj.in_features
    identity = torch.arange(f).expand(len(layers), f).clone()
    perms: list[torch.Tensor | None] = [None] * len(sources)
    perms[anchor_index] = identity
    entries: list[dict | None] = [None] * len(sources)
    entries[anchor_index] = {"name": names[anchor_index], "anchor": True, "tokens": 0, "dropped_tokens": 0,
                             "seconds": 0.0, "mean_before": 1.0, "mean_after": 1.0,
                             "layers": [{"layer": l, "before": 1.0, "after": 1.0, "moved": 0.0}
                                        for l in range(len(layers))]}
    try:
        for i, source in enumerate(sources):
            if i == anchor_index:
                continue
            start = time.perf_counter()
            ids_a, ids_b, dropped = pair_streams(calib_ids, id_maps[anchor_index], id_maps[i])
            if ids_a.numel() == 0:
                raise SymphonyError(f"no calibration token is known to both {names[anchor_index]!r} and {names[i]!r}")
            check_ids_fit(ids_a, anchor, names[anchor_index])
            model = load_source(source, device, dtype)
            try:
                check_ids_fit(ids_b, model, names[i])
                batches_a = calibration_windows(ids_a, **calib_windows_kw)
                batches_b = calibration_windows(ids_b, **calib_windows_kw)
                try:
                    pair = align_models(anchor, model, batches_a, source_batches=batches_b, solver=solver,
                                        progress=progress, anchor_name=names[anchor_index], source_name=names[i],
                                        layers_per_pass=layers_per_pass, update_tokens=update_tokens)
                except ValueError as e:
                    raise SymphonyError(f"cannot align {names[i]!r} to {names[anchor_index]!r}: {e}") from e
            finally:
                del model
            perms[i] = pair.perm
            entries[i] = {"name": names[i], "anchor": False, "tokens": pair.tokens, "dropped_tokens": dropped,
                          "seconds": round(time.perf_counter() - start, 3),
                          "mean_before": _mean(pair.before), "mean_after": _mean(pair.after),
                          "layers": [{"layer": l, "before": b, "after": a, "moved": m}
                                     for l, (b, a, m) in enumerate(zip(pair.before, pair.after, pair.moved))]}
    finally:
        del anchor
    report = {"anchor": names[anchor_index], "solver": solver, "seq_len": seq_len, "batch_size": batch_size,
              "max_tokens": max_tokens, "layers_per_pass": layers_per_pass, "update_tokens": update_tokens,
              "dtype": str(dtype).replace("torch.", ""), "device": str(device),
              "sources": entries}
    return AlignmentResult(perms=perms, report=report)


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
