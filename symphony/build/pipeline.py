"""`symphony build`: the two-stage Symphony-MoE pipeline, from local dense checkpoints to a standard MoE checkpoint.

Order of work (symphony.build.config describes the YAML):
1. Checks, all cheap, before any heavy work: the config; the output (symphony.outputs: not empty, not the
   current folder or one above it, not a folder that holds an input; an existing one needs --force; its
   parent folder must exist and be writable; a lock against a second build of the same output; leftovers of
   killed builds reported); every source (config, tokenizer, safetensors headers: missing or truncated
   files; tensor names and shapes); identical architectures (the first difference is named); the union
   vocabulary; the calibration and training text (readable, not empty, long enough: alignment needs at least
   as many tokens as FFN neurons, `_calibration_floor`); the target model's tensor plan against the installed
   transformers (on the meta device); the free disk space.
2. Stage 1b, alignment (symphony.build.align), where it can change the result (`alignment.enabled: auto`): a shared
   expert made from several sources' FFNs, or FFNs split into finer experts. Where every expert is one whole
   source FFN it is skipped, and the report says why: permuting an FFN's neurons does not change its function.
3. Router init ("hidden": per-source hidden-state centroids, symphony.build.router_init.hidden_centroids).
4. Stage 1a + assembly (symphony.build.fusion, symphony.build.assemble): every output tensor made and written one at a time.
5. Stage 2 (symphony.train.train_router; `router_training.steps: 0` skips it).
Everything is written into a temporary folder beside the output and renamed into place at the end; a failure,
Ctrl-C or SIGTERM removes it, so nothing is left behind (symphony.outputs.atomic_output).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from symphony.build.align import align_sources
from symphony.build.config import BuildConfig, load_config, parse_config
from symphony.build.correlate import auto_layers_per_pass, default_update_tokens, memory_budget, pass_memory
from symphony.build.memory import MemoryMonitor, peak_rss, size_text
from symphony.build.report import build_report
from symphony.build.router_init import hidden_centroids, router_from_centroids, router_weights
from symphony.errors import SymphonyError, warn
from symphony.outputs import atomic_output, output_path, publish
from symphony.train.launch import check_nproc, launch


def alignment_decision(cfg: BuildConfig) -> tuple[bool, str]:
    """(run alignment?, why) for `alignment.enabled` auto / true / false."""
    reasons = []
    if cfg.experts.shared_expert == "mean":
        reasons.append("the shared expert averages FFNs of several sources")
    if cfg.experts.per_source > 1:
        reasons.append("each FFN is split into finer experts")
    enabled = cfg.alignment.enabled
    if enabled is False:
        return False, "disabled in the config (alignment.enabled: false)"
    if reasons:
        return True, "; ".join(reasons)
    whole = ("every expert is one whole source FFN, and permuting an FFN's neurons does not change its function, "
             "so alignment cannot change this build's output")
    if enabled is True:
        return True, f"enabled in the config, although {whole}"
    return False, f"skipped: {whole} (alignment.enabled: true runs it anyway)"


def _as_config(config) -> BuildConfig:
    if isinstance(config, BuildConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a BuildConfig, a dict or a YAML path, not {type(config).__name__}")


def _tokens(tokenizer, texts, what: str, at_least: int) -> torch.Tensor:
    from symphony.data import token_stream

    ids = token_stream(tokenizer, texts)
    if ids.numel() < at_least:
        raise SymphonyError(f"the {what} has {ids.numel()} tokens, fewer than the {at_least} needed "
                            "(give more text or a smaller seq_len)")
    return ids


FEW_TOKENS_PER_NEURON = 4


def _calibration_floor(tokens: int, f: int, capped: bool) -> str | None:
    """Refuse alignment on fewer calibration tokens than FFN neurons `f`; below FEW_TOKENS_PER_NEURON * f, warn
    (and return the note for the report).

    Why f: the matching compares neurons by their correlation over the calibration tokens. From n tokens the
    centred [n, f] activations have rank at most n - 1, so with n <= f the f x f correlation matrix is rank
    deficient and the matching is driven by the noise of too few samples: it "finds" high correlations that
    are not there. Measured on two make_family sources fine-tuned from one base (so the true matching is
    close to the identity; `align_sources` on n calibration tokens, moved = share of neurons the matching
    moves, the score = mean matched correlation), f = 128: 8 tokens moved 83% (score 0.82), 32 moved 38%,
    128 (= f) 16%, 512 (4 f) 13%, 8192 15% (score 0.62); f = 512: 8 tokens moved 96% (score 0.87), 128 31%,
    512 (= f) 21%, 2048 (4 f) 18%, 8192 17% (score 0.59). Below f the error grows fast; from about 4 f on it
    no longer falls (the matching stops changing with more text), hence the warning under 4 f."""
    if tokens >= FEW_TOKENS_PER_NEURON * f:
        return None
    where = "alignment.max_tokens" if capped else "the calibration text"
    if tokens < f:
        raise SymphonyError(f"alignment needs at least as many calibration tokens as FFN neurons ({f}); "
                            f"{where} gives {tokens}: give more calibration text")
    note = f"only {tokens} calibration tokens for {f} FFN neurons (fewer than {FEW_TOKENS_PER_NEURON} per neuron): " \
           "the matching is noisier than with more text"
    warn(f"alignment: {note}")
    return note


def _forward_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the calibration forwards: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _Checked:
    """Everything the cheap checks found, for the heavy stages."""


def _checks(cfg: BuildConfig) -> _Checked:
    from symphony.build.assemble import plan_entries
    from symphony.build.targets import TARGETS, target_config, unsupported
    from symphony.data import read_texts, resolve_device, resolve_dtype
    from symphony.build.fusion import layer_schedule, source_weights
    from symphony.build.sources import build_vocabulary, check_same_architecture, open_source

    c = _Checked()
    c.device = resolve_device(cfg.device)
    resolve_dtype(cfg.router_training.dtype, resolve_device(cfg.router_training.device))
    c.sources = [open_source(s.name, s.path) for s in cfg.sources]
    check_same_architecture(c.sources)
    anchor = c.sources[cfg.anchor_index]
    why = unsupported(anchor.config)
    if why:
        raise SymphonyError(why)
    arch = TARGETS[anchor.family]
    if cfg.output.architecture not in ("auto", arch):
        raise SymphonyError(f"output.architecture: {anchor.family} sources build {arch}, not "
                            f"{cfg.output.architecture}")
    f, m = anchor.intermediate_size, cfg.experts.per_source
    if f % m:
        raise SymphonyError(f"experts.per_source: {m} does not divide the FFN size {f}")
    if cfg.experts.shared_expert == "mean" and arch != "Qwen2MoeForCausalLM":
        raise SymphonyError(f"experts.shared_expert: mean needs a shared expert, which {arch} has not "
                            "(only Qwen2-MoE, from qwen2 sources, has one)")
    c.layer_weights = [source_weights(len(c.sources), cfg.anchor_index, v)
                       for v in layer_schedule(cfg.fusion.t, anchor.num_layers)]

    c.expert_idx = [i for i, s in enumerate(cfg.sources) if s.name in cfg.expert_sources]
    c.align, c.align_reason = alignment_decision(cfg)
    c.calib_texts = read_texts(cfg.calibration_files()) if cfg.calibration_files() else []
    if c.align and not c.calib_texts:
        raise SymphonyError("alignment needs calibration text: give alignment.calibration or the sources' "
                            "calibration files")
    c.source_texts = {s.name: read_texts(s.calibration) for s in cfg.sources if s.calibration}
    c.vocab = build_vocabulary(c.sources, cfg.anchor_index, probe_texts=c.calib_texts[:2])
    if c.align:
        seq = cfg.alignment.seq_len
        c.calib_ids = _tokens(c.vocab.tokenizer, c.calib_texts, "alignment calibration text", 2)
        notes = [_calibration_floor(min(c.calib_ids.numel(), cfg.alignment.max_tokens), anchor.intermediate_size,
                                    cfg.alignment.max_tokens < c.calib_ids.numel())]
        if c.calib_ids.numel() < seq:
            notes.append(f"calibration text shorter than alignment.seq_len={seq}: one window of "
                         f"{c.calib_ids.numel()} tokens")
        if any(notes):
            c.align_note = "; ".join(n for n in notes if n)
        c.layers_per_pass, c.passes_note = _layers_per_pass(cfg, anchor, c.device)
    if cfg.experts.router_init == "hidden":
        c.centroid_ids = {s.name: _tokens(c.sources[i].tokenizer, c.source_texts[s.name],
                                          f"calibration text of source {s.name!r}", 2)
                          for i, s in enumerate(cfg.sources) if i in c.expert_idx}
    c.train_texts = []
    if cfg.router_training.steps > 0:
        c.train_texts = read_texts(cfg.training_files())
        _tokens(c.vocab.tokenizer, c.train_texts, "router training text", cfg.router_training.seq_len + 1)

    if cfg.output.dtype == "auto":
        stored = getattr(anchor.config, "dtype", None)
        c.dtype = stored if isinstance(stored, torch.dtype) else torch.float32
    else:
        c.dtype = getattr(torch, cfg.output.dtype)
    E = len(c.expert_idx) * m
    c.target = target_config(anchor.config, num_experts=E, top_k=cfg.experts.top_k, expert_size=f // m,
                             shared_expert_size=f if cfg.experts.shared_expert == "mean" else 0,
                             vocab_size=c.vocab.size, dtype=c.dtype,
                             max_position_embeddings=min(s.config.max_position_embeddings for s in c.sources))
    c.plan = _plan(cfg, c, perms={}, routers=lambda layer: torch.zeros(E, anchor.hidden_size))
    c.weight_bytes = sum(e.nbytes for e in plan_entries(c.plan))  # names and shapes checked against transformers
    return c


def _plan(cfg: BuildConfig, c: _Checked, *, perms, routers):
    from symphony.build.assemble import MoEPlan

    return MoEPlan(sources=c.sources, anchor_index=cfg.anchor_index, vocab=c.vocab, config=c.target,
                   expert_sources=c.expert_idx, per_source=cfg.experts.per_source,
                   shared_expert=cfg.experts.shared_expert, attention=cfg.fusion.attention,
                   layer_weights=c.layer_weights, embeddings=cfg.fusion.embeddings, norms=cfg.fusion.norms,
                   routers=routers, perms=perms, layout=cfg.output.expert_layout)


def _layers_per_pass(cfg: BuildConfig, anchor, device: torch.device) -> tuple[int, str]:
    """(layers per alignment pass, a line for the summary): `alignment.layers_per_pass` N (at most the number
    of layers), or for "auto" symphony.build.correlate.auto_layers_per_pass within its memory_budget (a
    quarter of the free GPU memory, taken now, before any model is loaded; on the CPU min(4 GiB, a quarter of
    the available RAM))."""
    layers, f = anchor.num_layers, anchor.intermediate_size
    a = cfg.alignment
    kw = dict(batch_tokens=min(a.batch_size * a.seq_len, a.max_tokens),
              update_tokens=default_update_tokens(device), itemsize=_forward_dtype(device).itemsize,
              device=device)
    if a.layers_per_pass == "auto":
        budget = memory_budget(device)
        k = auto_layers_per_pass(layers, f, budget_bytes=budget, **kw)
        how = f"auto, budget {size_text(budget)}"
    else:
        k, how = min(a.layers_per_pass, layers), "alignment.layers_per_pass"
    passes = -(-layers // k)
    need = pass_memory(k, f, **kw)
    note = f"{passes} pass{'es' if passes > 1 else ''} of <= {k} layers, <= {size_text(need)} of correlation memory " \
           f"each ({how})"
    if a.layers_per_pass == "auto" and need > budget:
        note += "; one layer alone exceeds the budget"
    return k, note


def _check_perm(p, layers: int, f: int, name: str) -> torch.Tensor:
    p = torch.as_tensor(p).long().cpu()
    if p.shape != (layers, f) or not bool((p.sort(dim=1).values == torch.arange(f)).all()):
        raise SymphonyError(f"alignment returned no valid permutation for source {name!r} "
                            f"(shape {tuple(p.shape)}, expected {(layers, f)})")
    return p


def _run_alignment(cfg: BuildConfig, c: _Checked, progress: bool):
    idx = [i for i in range(len(c.sources)) if i == cfg.anchor_index or i in c.expert_idx]
    result = align_sources([c.sources[i] for i in idx], idx.index(cfg.anchor_index), c.calib_ids,
                                 device=c.device, dtype=_forward_dtype(c.device), batch_size=cfg.alignment.batch_size,
                                 seq_len=cfg.alignment.seq_len, max_tokens=cfg.alignment.max_tokens,
                                 solver=cfg.alignment.solver, id_maps=[c.sources[i].local_ids for i in idx],
                                 layers_per_pass=c.layers_per_pass, progress=progress)
    anchor = c.sources[cfg.anchor_index]
    perms = {i: _check_perm(result.perms[j], anchor.num_layers, anchor.intermediate_size, c.sources[i].name)
             for j, i in enumerate(idx) if i != cfg.anchor_index}
    return perms, result


def _routers(cfg: BuildConfig, c: _Checked, progress: bool):
    anchor = c.sources[cfg.anchor_index]
    E = len(c.expert_idx) * cfg.experts.per_source
    rows = None
    if cfg.experts.router_init == "hidden":
        srcs = [c.sources[i] for i in c.expert_idx]
        centroids, norms = hidden_centroids(
            srcs, [c.centroid_ids[s.name] for s in srcs], device=c.device, dtype=_forward_dtype(c.device),
            batch_size=cfg.alignment.batch_size, seq_len=cfg.alignment.seq_len, max_tokens=cfg.alignment.max_tokens,
            return_norms=True, progress=progress)
        rows = router_from_centroids(centroids, experts_per_source=cfg.experts.per_source, norms=norms)
        want = (anchor.num_layers, E, anchor.hidden_size)
        if tuple(rows.shape) != want or not bool(torch.isfinite(rows).all()):
            raise SymphonyError(f"the hidden router init gave {tuple(rows.shape)} (expected {want}, finite)")
    return router_weights(cfg.experts.router_init, num_layers=anchor.num_layers, num_experts=E,
                          hidden_size=anchor.hidden_size, per_source=cfg.experts.per_source, seed=cfg.seed,
                          std=getattr(anchor.config, "initializer_range", 0.02), hidden_rows=rows)


def _inputs(cfg: BuildConfig, extra) -> list:
    """(label, path) of everything a build reads, which its output must not replace."""
    inputs = [(f"source {s.name!r}", s.path) for s in cfg.sources]
    for path in [*cfg.calibration_files(), *cfg.training_files(), *(p for s in cfg.sources for p in s.calibration)]:
        inputs.append((f"text file {path.name}", path))
    return inputs + list(dict(extra or {}).items())


def _check_free_space(out_dir: Path, c: _Checked, stage2: bool):
    """Refuse a build that cannot fit on the output's filesystem: the checkpoint's planned bytes, twice with
    stage 2 (the stage 1 and the trained checkpoint exist side by side until the end). A lower bound, so a
    refusal is never wrong; the writes themselves turn a full disk into one line (symphony.outputs)."""
    need = c.weight_bytes * (2 if stage2 else 1)
    free = shutil.disk_usage(out_dir.parent).free
    if free < need:
        raise SymphonyError(f"not enough disk space for {out_dir}: the build writes at least {size_text(need)}, "
                            f"{size_text(free)} are free there")


def build(config, out_dir, *, force: bool = False, progress: bool = True, inputs=None, nproc: int = 1) -> dict:
    """Build a Symphony-MoE checkpoint into `out_dir` from `config` (a BuildConfig, a dict or a YAML path).
    `inputs` ({label: path}) names more paths that the output must not replace (the CLI passes the config
    file); the sources and text files are always protected (symphony.outputs.check_output_path). `nproc` > 1
    runs stage 2 on that many processes of this machine (symphony.train.launch: FSDP2).

    Returns {"out", "architecture", "num_experts", "top_k", "expert_sources", "alignment" ({"ran", "reason", "passes",
    "table"}), "stage2" (train_router's summary without the per-step losses, or None), "timings_s",
    "peak_rss_bytes", "peak_cuda_bytes", "total_size"}.
    """
    from symphony.build.assemble import write_model
    from symphony.data import write_json
    from symphony.evaluate import REPORT

    start = time.perf_counter()
    cfg = _as_config(config)
    if isinstance(config, (str, os.PathLike)):
        inputs = {"the config": Path(config), **dict(inputs or {})}
    out_dir = output_path(out_dir)
    check_nproc(nproc, cfg.router_training)
    timings = {}
    with atomic_output(out_dir, force=force, inputs=_inputs(cfg, inputs)) as tmp:
        c = _checks(cfg)
        _check_free_space(out_dir, c, bool(c.train_texts))
        timings["checks"] = time.perf_counter() - start
        memory = MemoryMonitor(c.device)
        try:
            t = time.perf_counter()
            memory.stage("alignment")
            perms, align_result = _run_alignment(cfg, c, progress) if c.align else ({}, None)
            timings["alignment"] = time.perf_counter() - t

            t = time.perf_counter()
            memory.stage("router_init")
            routers = _routers(cfg, c, progress)
            timings["router_init"] = time.perf_counter() - t

            t = time.perf_counter()
            memory.stage("assembly")
            plan = _plan(cfg, c, perms=perms, routers=lambda layer: routers[layer])
            report = build_report(cfg, c, plan, align_result)
            stage1 = tmp / ("stage1" if c.train_texts else "model")
            stage1.mkdir()
            written = write_model(plan, stage1, max_shard_size=cfg.output.max_shard_size, report=report,
                                  progress=progress)
            _write_build_config(stage1, cfg)
            timings["assembly"] = time.perf_counter() - t

            stage2 = None
            if c.train_texts:
                from symphony.train import train_router

                t = time.perf_counter()
                memory.stage("stage2")
                if nproc > 1:
                    summary = launch(stage1, cfg.training_files(), cfg.router_training, tmp / "model", nproc=nproc,
                                     checkpoint_dir=tmp / "stage2-checkpoints", progress=progress)
                else:
                    summary = train_router(stage1, c.train_texts, cfg.router_training, tmp / "model",
                                           checkpoint_dir=tmp / "stage2-checkpoints", progress=progress)
                shutil.rmtree(stage1)
                timings["stage2"] = time.perf_counter() - t
                stage2 = {k: v for k, v in summary.items() if k != "losses"}
        finally:
            memory.close()
        final = tmp / "model"
        timings["total"] = time.perf_counter() - start
        report["stage2"] = stage2
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["peak_memory_bytes"] = memory.peaks
        write_json(final / REPORT, report)
        publish(final, out_dir)
    table = align_result.table() if align_result is not None and hasattr(align_result, "table") else None
    return {"out": str(out_dir), "architecture": c.target.architectures[0], "num_experts": len(plan.expert_names),
            "top_k": cfg.experts.top_k, "expert_sources": plan.expert_names,
            "alignment": {"ran": c.align, "reason": c.align_reason, "table": table,
                          "passes": getattr(c, "passes_note", None)}, "stage2": stage2,
            "timings_s": timings, "peak_rss_bytes": peak_rss(),
            "peak_cuda_bytes": max([p["cuda"] for p in memory.peaks.values()] + [0]),
            "stage_peaks": memory.peaks, "total_size": written["total_size"]}


def _write_build_config(folder: Path, cfg: BuildConfig):
    import yaml

    (folder / "symphony_build.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
