"""`symphony build`: the two-stage Symphony-MoE pipeline, from local dense checkpoints to a standard MoE checkpoint.

Order of work (symphony.config describes the YAML):
1. Checks, all cheap, before any heavy work: the config; the output (an existing one needs --force; its parent
   folder must exist and be writable); every source (config, tokenizer, safetensors headers: missing or
   truncated files; tensor names and shapes); identical architectures (the first difference is named); the
   union vocabulary; the calibration and training text (readable, not empty, long enough); the target
   model's tensor plan against the installed transformers (on the meta device).
2. Stage 1b, alignment (symphony.align), where it can change the result (`alignment.enabled: auto`): a shared
   expert made from several sources' FFNs, or FFNs split into finer experts. Where every expert is one whole
   source FFN it is skipped, and the report says why: permuting an FFN's neurons does not change its function.
3. Router init ("hidden": per-source hidden-state centroids, symphony.align.hidden_centroids).
4. Stage 1a + assembly (symphony.fusion, symphony.assemble): every output tensor made and written one at a time.
5. Stage 2 (symphony.train.train_router; `router_training.steps: 0` skips it).
Everything is written into a temporary folder beside the output and renamed into place at the end; a failure
or Ctrl-C removes it, so nothing is left behind.

Memory. What each stage holds at once (host RAM unless said; "checkpoint" = the MoE's weights on disk):
- checks: configs, tokenizers, safetensors headers, the calibration token ids (the baseline: Python, torch and
  transformers, 0.43 GiB RSS here).
- alignment (only where it runs; symphony.align): the anchor and one source, loaded whole (on the CPU in
  float32, on CUDA in bfloat16), their forwards over one batch, and one pass's correlation memory
  (symphony.align.pass_memory: per layer of the pass 12 * f^2 bytes of float64 state and float32
  correlation matrix, plus the FFN activations of one accumulator update; once, the accumulator's scratch).
  `alignment.layers_per_pass: auto` puts as many layers in a pass as fit symphony.align.memory_budget (a
  quarter of the GPU memory free before the models load; on the CPU min(4 GiB, a quarter of the available
  RAM)); each further pass reruns both models' forwards. On CUDA the batches are concatenated into updates
  of 16384 tokens (the accumulator's per-update pass over its float64 state dominates below that), on the
  CPU each batch is its own update. Loading a source on the way to the GPU holds it on the host for a moment.
- router init "hidden" (symphony.align.hidden_centroids): one dense source at a time and one batch's
  activations.
- fusion + assembly (symphony.fusion, symphony.assemble): one output tensor plus the N source tensors it is
  made of (an attention weight: N + 1 tensors of d x d; an expert tensor: f x d and its permuted copy),
  float64 chunks of 4M elements per source, and the embedding / lm_head in 8192-row chunks (with
  `expert_layout: fused`, a layer's whole gate_up_proj, E x 2f x d). So it stays under about 1 GiB above the
  baseline for any model size.
- stage 2 (symphony.train.train_router): the whole MoE, loaded by transformers (on CUDA in bfloat16, the
  routers' float32 master copies and their AdamW states beside it: a few MB), the activations of one
  8 x 256-token batch kept for the backward pass (the routers of the first layer get their gradient through
  every layer above), then the save. In "router" mode nothing is reloaded any more: the save copies the
  stage 1 checkpoint tensor by tensor with the routers replaced (symphony.assemble.replace_tensors, one
  tensor at a time), after the model is dropped. "full" mode still reloads the model whole on the host
  for its save (train.py: from_pretrained + save_pretrained). On disk, the stage 1 checkpoint and the
  trained one exist side by side until the end (2x the checkpoint).

Measured: `symphony build` prints each stage's peak RSS (sampled from /proc every 20 ms) and, on GPU, CUDA's
peak. On the CPU, 4 fixture sources of 63M parameters (float32, d=1024, f=4096, 4 layers), an 819 MiB
Qwen2-MoE, router_init hidden, 37568 calibration tokens, stage 2 5 steps of 8 x 128 tokens, made and built by
(from an empty folder, with the project installed; the second build took 24 min on 2 cores):

    python - <<'PY'
    import pathlib, yaml
    from symphony.testing import domain_text, make_family
    root, doms = pathlib.Path("mem"), ("prose", "code", "math", "legal")
    paths = make_family(root / "src", arch="qwen2", domains=doms, steps=1, base_steps=1, n_lines=100,
                        hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4)
    for d in doms:
        (root / f"{d}.txt").write_text("\\n".join(domain_text(d, 300)))
    for m in (1, 2):
        (root / f"build{m}.yaml").write_text(yaml.safe_dump({
            "sources": [{"path": f"src/{p.name}", "calibration": [f"{d}.txt"]} for p, d in zip(paths, doms)],
            "experts": {"per_source": m}, "device": "cpu",
            "router_training": {"steps": 5, "batch_size": 8, "seq_len": 128}}))
    PY
    symphony build mem/build1.yaml --out mem/moe1 --quiet
    symphony build mem/build2.yaml --out mem/moe2 --quiet

| peak RSS | checks (baseline) | alignment | router init | fusion + assembly | stage 2 |
|---|---|---|---|---|---|
| per_source 1 (alignment skipped) | 0.43 GiB | – | 1.08 GiB | 622 MiB | 2.70 GiB |
| per_source 2 (alignment: 1 pass of 4 layers) | 0.43 GiB | 2.54 GiB | 1.07 GiB | 680 MiB | 2.52 GiB |

Stage 2 was 3.66 / 3.65 GiB when its save reloaded the model and called save_pretrained. Its peak is now
the training itself, 2.1-2.3 GiB above the baseline for the 0.82 GiB checkpoint: the model, the checkpoint
file, which transformers keeps mmapped while some parameters are views of it (clean file pages that count
in RSS and that the kernel can reclaim; RssAnon / RssFile in /proc/self/status right after
`symphony.data.load_model("mem/moe1", device="cpu")`: 1.02 / 0.90 GiB), and the CPU training step; the save
itself holds one tensor at a time. Alignment: 2.1 GiB above the baseline: the two float32 sources (0.47
GiB) and one pass, which pass_memory bounds by 1.75 GiB (4 x 201 MB of state and matrix, 4 x 134 MB of one
4096-token batch of both models' float32 activations, 512 MiB of scratch).

Expected peaks (derived from the above, not measured), router mode on one 80 GB H100 (78 GiB free: an
alignment budget of 19.5 GiB), bfloat16, default settings (alignment batches 8 x 512 tokens, stage 2
batches 8 x 256):
- 4 x Qwen2.5-0.5B (24 layers, d=896, f=4864, tied 151936-token embedding) -> a 1.43B-parameter Qwen2-MoE,
  2.9 GB. Alignment (when it runs): 2 GB of models + one pass of all 24 layers, 18.5 GB (6.8 GB of state and
  matrix, 9.6 GB of activations: a 16384-token update and a 4096-token batch of both models, 2 GiB of
  scratch): about 21 GB of GPU. Hidden init: one source (1 GB). Stage 2: 2.9 GB of weights + activations
  (the experts keep [T*k, 3f] per layer for the backward, 0.12 GB per layer at T = 2048, k = 2: 2.9 GB; the
  logits, 2048 x 151936 in bf16 and float32 with their gradient, about 3 GB; hidden states and attention,
  about 1 GB): about 10 GB of GPU. Host: the baseline + about one checkpoint while a model is loaded on the
  CPU before it moves to the GPU (1 GB for a source, 2.9 GB, plus its file pages, for the MoE).
- 4 x 7B: Llama-2-7B (32 layers, d=4096, f=11008) -> a 19.7B-parameter Mixtral, 39 GB; Mistral-7B
  (f=14336) -> 24.2B, 48 GB. Assembly: still baseline + < 1 GiB. Hidden init: one source (13.5-14.5 GB of
  GPU). Alignment: 27-29 GB of models + one pass, 2.36 GB per layer at f=11008 (1.45 GB of state and matrix)
  and 3.64 GB at f=14336, so `auto` gives 5 passes of <= 7 layers (18.6 GB) or 7 passes of <= 5 layers
  (20.8 GB): about 47-51 GB of GPU. (One pass of all 32 layers, what alignment did before
  `layers_per_pass: auto`, holds 46.5 / 78.9 GB of state and matrix alone: 74-108 GB with the models, past
  an 80 GB GPU.) Stage 2: 39-48 GB of weights + activations (experts 0.27 / 0.35 GB per layer at T = 2048,
  8.7 / 11.3 GB; hidden states and attention about 5 GB; logits under 1 GB): about 55-66 GB, which fits one
  80 GB GPU. Host: the baseline + about one checkpoint while the MoE is loaded on the CPU before it moves to
  the GPU (39-48 GB of anonymous memory for the fused experts, plus up to as much in file pages), then one
  tensor at a time for the save.
- Full post-training (`router_training.train: full`): train.py keeps every parameter in float32 (4 bytes)
  with its float32 gradient (4) and AdamW's two float32 states (8): 16 bytes per parameter plus activations.
  4 x 0.5B: 23 GB + activations, about 30 GB: one 80 GB GPU. 4 x 7B: 316 GB (19.7B) / 386 GB (24.2B)
  before activations: beyond one GPU (even a 141 GB H200); it needs the parameters and optimizer states
  sharded over 4-8 GPUs (FSDP / ZeRO-3), which train.py does not do. Its save reloads the model whole on
  the host (39-48 GB) and writes it with save_pretrained.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from symphony.config import BuildConfig, load_config, parse_config
from symphony.errors import SymphonyError

HELP = "build a Symphony-MoE checkpoint from dense sources (YAML config)"
_STAGE_NAMES = {"checks": "checks", "alignment": "alignment (stage 1b)", "router_init": "router init",
                "assembly": "fusion + assembly (stage 1a)", "stage2": "router training (stage 2)", "total": "total"}


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


def _check_output(out_dir: Path, force: bool):
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise SymphonyError(f"output {out_dir} already exists (use --force to replace it)")
        if not out_dir.is_dir():
            raise SymphonyError(f"output {out_dir} exists and is not a folder; remove it first")
    parent = out_dir.parent
    if not parent.is_dir():
        raise SymphonyError(f"cannot write {out_dir}: {parent} is not an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SymphonyError(f"cannot write {out_dir}: folder {parent} is not writable")


def _make_tmp(out_dir: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise SymphonyError(f"cannot write {out_dir}: {e}") from e
    tmp.chmod(0o755)
    return tmp


def _publish(folder: Path, out_dir: Path):
    """Move the finished `folder` to `out_dir`; an old output is replaced only once the new one is in place."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):  # safetensors writes its files private (0600); outputs are for everyone to read
        p.chmod(0o755 if p.is_dir() else 0o644)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(folder, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _need_align_module(what: str):
    if importlib.util.find_spec("symphony.align") is None:
        raise SymphonyError(f"{what} needs symphony.align, which this installation lacks")


def _tokens(tokenizer, texts, what: str, at_least: int) -> torch.Tensor:
    from symphony.data import token_stream

    ids = token_stream(tokenizer, texts)
    if ids.numel() < at_least:
        raise SymphonyError(f"the {what} has {ids.numel()} tokens, fewer than the {at_least} needed "
                            "(give more text or a smaller seq_len)")
    return ids


def _forward_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the calibration forwards: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryMonitor:
    """Peak resident memory (RSS, sampled every 20 ms from /proc on Linux) and peak CUDA memory allocated by
    torch, per stage. `stage(name)` starts a stage; `peaks` maps each stage to {"rss", "cuda"} bytes."""

    def __init__(self, device: torch.device):
        import threading

        self.device, self.peaks, self._stage = device, {}, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.02):
            self._note()

    def _note(self):
        rss = _rss()
        stage = self._stage
        if stage is not None and rss is not None:
            self.peaks[stage]["rss"] = max(self.peaks[stage]["rss"], rss)

    def stage(self, name: str | None):
        self._note()
        if self._stage is not None and self.device.type == "cuda":
            self.peaks[self._stage]["cuda"] = torch.cuda.max_memory_allocated(self.device)
        if name is not None:  # the entry first: the sampling thread reads self.peaks[self._stage]
            self.peaks[name] = {"rss": _rss() or 0, "cuda": 0}
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        self._stage = name

    def close(self):
        self.stage(None)
        self._stop.set()
        self._thread.join()


class _Checked:
    """Everything the cheap checks found, for the heavy stages."""


def _checks(cfg: BuildConfig, out_dir: Path, force: bool) -> _Checked:
    from symphony.assemble import TARGETS, plan_entries, target_config, unsupported
    from symphony.data import read_texts, resolve_device, resolve_dtype
    from symphony.fusion import layer_schedule, source_weights
    from symphony.sources import build_vocabulary, check_same_architecture, open_source

    c = _Checked()
    _check_output(out_dir, force)
    for spec in cfg.sources:
        src = spec.path.resolve()
        if out_dir.resolve() == src or out_dir.resolve() in src.parents:
            raise SymphonyError(f"output {out_dir} would replace source {spec.name!r} ({spec.path}); choose another "
                                "--out")
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
        _need_align_module("alignment")
        seq = cfg.alignment.seq_len
        c.calib_ids = _tokens(c.vocab.tokenizer, c.calib_texts, "alignment calibration text", 2)
        if c.calib_ids.numel() < seq:
            c.align_note = f"calibration text shorter than alignment.seq_len={seq}: one window of " \
                           f"{c.calib_ids.numel()} tokens"
        c.layers_per_pass, c.passes_note = _layers_per_pass(cfg, anchor, c.device)
    if cfg.experts.router_init == "hidden":
        _need_align_module("experts.router_init: hidden")
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
    plan_entries(c.plan)  # names and shapes against the installed transformers
    return c


def _plan(cfg: BuildConfig, c: _Checked, *, perms, routers):
    from symphony.assemble import MoEPlan

    return MoEPlan(sources=c.sources, anchor_index=cfg.anchor_index, vocab=c.vocab, config=c.target,
                   expert_sources=c.expert_idx, per_source=cfg.experts.per_source,
                   shared_expert=cfg.experts.shared_expert, attention=cfg.fusion.attention,
                   layer_weights=c.layer_weights, embeddings=cfg.fusion.embeddings, norms=cfg.fusion.norms,
                   routers=routers, perms=perms, layout=cfg.output.expert_layout)


def _layers_per_pass(cfg: BuildConfig, anchor, device: torch.device) -> tuple[int, str]:
    """(layers per alignment pass, a line for the summary): `alignment.layers_per_pass` N (at most the number
    of layers), or for "auto" symphony.align.auto_layers_per_pass within symphony.align.memory_budget (a
    quarter of the free GPU memory, taken now, before any model is loaded; on the CPU min(4 GiB, a quarter of
    the available RAM))."""
    from symphony import align

    layers, f = anchor.num_layers, anchor.intermediate_size
    a = cfg.alignment
    kw = dict(batch_tokens=min(a.batch_size * a.seq_len, a.max_tokens),
              update_tokens=align.default_update_tokens(device), itemsize=_forward_dtype(device).itemsize,
              device=device)
    if a.layers_per_pass == "auto":
        budget = align.memory_budget(device)
        k = align.auto_layers_per_pass(layers, f, budget_bytes=budget, **kw)
        how = f"auto, budget {_size(budget)}"
    else:
        k, how = min(a.layers_per_pass, layers), "alignment.layers_per_pass"
    passes = -(-layers // k)
    need = align.pass_memory(k, f, **kw)
    note = f"{passes} pass{'es' if passes > 1 else ''} of <= {k} layers, <= {_size(need)} of correlation memory " \
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
    from symphony import align

    idx = [i for i in range(len(c.sources)) if i == cfg.anchor_index or i in c.expert_idx]
    result = align.align_sources([c.sources[i] for i in idx], idx.index(cfg.anchor_index), c.calib_ids,
                                 device=c.device, dtype=_forward_dtype(c.device), batch_size=cfg.alignment.batch_size,
                                 seq_len=cfg.alignment.seq_len, max_tokens=cfg.alignment.max_tokens,
                                 solver=cfg.alignment.solver, id_maps=[c.sources[i].local_ids for i in idx],
                                 layers_per_pass=c.layers_per_pass, progress=progress)
    anchor = c.sources[cfg.anchor_index]
    perms = {i: _check_perm(result.perms[j], anchor.num_layers, anchor.intermediate_size, c.sources[i].name)
             for j, i in enumerate(idx) if i != cfg.anchor_index}
    return perms, result


def _routers(cfg: BuildConfig, c: _Checked, progress: bool):
    from symphony.assemble import router_weights

    anchor = c.sources[cfg.anchor_index]
    E = len(c.expert_idx) * cfg.experts.per_source
    rows = None
    if cfg.experts.router_init == "hidden":
        from symphony import align

        srcs = [c.sources[i] for i in c.expert_idx]
        centroids, norms = align.hidden_centroids(
            srcs, [c.centroid_ids[s.name] for s in srcs], device=c.device, dtype=_forward_dtype(c.device),
            batch_size=cfg.alignment.batch_size, seq_len=cfg.alignment.seq_len, max_tokens=cfg.alignment.max_tokens,
            return_norms=True, progress=progress)
        rows = align.router_from_centroids(centroids, experts_per_source=cfg.experts.per_source, norms=norms)
        want = (anchor.num_layers, E, anchor.hidden_size)
        if tuple(rows.shape) != want or not bool(torch.isfinite(rows).all()):
            raise SymphonyError(f"the hidden router init gave {tuple(rows.shape)} (expected {want}, finite)")
    return router_weights(cfg.experts.router_init, num_layers=anchor.num_layers, num_experts=E,
                          hidden_size=anchor.hidden_size, per_source=cfg.experts.per_source, seed=cfg.seed,
                          std=getattr(anchor.config, "initializer_range", 0.02), hidden_rows=rows)


def _flat_alignment(report: dict) -> dict:
    """symphony.align's report as flat records (what `symphony inspect` prints as tables): the settings, one
    record per aligned source, and one record per layer with each source's mean matched correlation before and
    after alignment and the fraction of its neurons that moved."""
    sources = [s for s in report.get("sources", []) if isinstance(s, dict) and not s.get("anchor")]
    out = {k: v for k, v in report.items() if k != "sources"}
    out["sources"] = [{k: v for k, v in s.items() if k not in ("layers", "anchor")} for s in sources]
    layers = {}
    for src in sources:
        for rec in src.get("layers", []):
            row = layers.setdefault(rec["layer"], {"layer": rec["layer"]})
            for key in ("before", "after", "moved"):
                if key in rec:
                    row[f"{src['name']} {key}"] = rec[key]
    out["layers"] = [layers[k] for k in sorted(layers)]
    return out


def _report(cfg: BuildConfig, c: _Checked, plan, align_result) -> dict:
    import symphony

    alignment = {"ran": c.align, "reason": c.align_reason}
    if c.align:
        alignment["calibration_tokens"] = int(c.calib_ids.numel())
        alignment["passes"] = c.passes_note
        if getattr(c, "align_note", None):
            alignment["note"] = c.align_note
        if align_result is not None and isinstance(getattr(align_result, "report", None), dict):
            alignment.update(_flat_alignment(align_result.report))
    return {
        "symphony_version": symphony.__version__,
        "architecture": c.target.architectures[0],
        "anchor": cfg.anchor,
        "sources": [{"name": s.name, "path": str(s.path), "model_type": c.sources[i].family}
                    for i, s in enumerate(cfg.sources)],
        "expert_sources": plan.expert_names,
        "experts": {"num_experts": len(plan.expert_names), "top_k": cfg.experts.top_k,
                    "per_source": cfg.experts.per_source,
                    "expert_intermediate_size": c.sources[0].intermediate_size // cfg.experts.per_source,
                    "shared_expert": cfg.experts.shared_expert, "router_init": cfg.experts.router_init},
        "fusion": {"attention": cfg.fusion.attention, "t": cfg.fusion.t, "embeddings": cfg.fusion.embeddings,
                   "norms": cfg.fusion.norms},
        "vocabulary": {"size": c.vocab.size, "tokens": len(c.vocab.tokenizer), "added_tokens": dict(c.vocab.added)},
        "alignment": alignment,
    }


def build(config, out_dir, *, force: bool = False, progress: bool = True) -> dict:
    """Build a Symphony-MoE checkpoint into `out_dir` from `config` (a BuildConfig, a dict or a YAML path).

    Returns {"out", "architecture", "num_experts", "top_k", "expert_sources", "alignment" ({"ran", "reason", "passes",
    "table"}), "stage2" (train_router's summary without the per-step losses, or None), "timings_s",
    "peak_rss_bytes", "peak_cuda_bytes", "total_size"}.
    """
    from symphony.assemble import write_model
    from symphony.data import write_json
    from symphony.inspect_cmd import REPORT

    start = time.perf_counter()
    cfg = _as_config(config)
    out_dir = Path(out_dir).absolute()
    timings = {}
    c = _checks(cfg, out_dir, force)
    tmp = _make_tmp(out_dir)
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
        report = _report(cfg, c, plan, align_result)
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
            summary = train_router(stage1, c.train_texts, cfg.router_training, tmp / "model",
                                   checkpoint_dir=tmp / "stage2-checkpoints", progress=progress)
            shutil.rmtree(stage1)
            timings["stage2"] = time.perf_counter() - t
            stage2 = {k: v for k, v in summary.items() if k != "losses"}
        final = tmp / "model"
        memory.close()
        timings["total"] = time.perf_counter() - start
        report["stage2"] = stage2
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["peak_memory_bytes"] = memory.peaks
        write_json(final / REPORT, report)
        _publish(final, out_dir)
    except BaseException:
        memory.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    table = align_result.table() if align_result is not None and hasattr(align_result, "table") else None
    return {"out": str(out_dir), "architecture": c.target.architectures[0], "num_experts": len(plan.expert_names),
            "top_k": cfg.experts.top_k, "expert_sources": plan.expert_names,
            "alignment": {"ran": c.align, "reason": c.align_reason, "table": table,
                          "passes": getattr(c, "passes_note", None)}, "stage2": stage2,
            "timings_s": timings, "peak_rss_bytes": _peak_rss(),
            "peak_cuda_bytes": max([p["cuda"] for p in memory.peaks.values()] + [0]),
            "stage_peaks": memory.peaks, "total_size": written["total_size"]}


def _write_build_config(folder: Path, cfg: BuildConfig):
    import yaml

    (folder / "symphony_build.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_summary(s: dict) -> str:
    """The printed summary of a build: what was built, each stage's time, the alignment table, stage 2's loss."""
    lines = [f"built {s['out']}: {s['architecture']}, {s['num_experts']} experts "
             f"({', '.join(s['expert_sources'])}), top-{s['top_k']}, {_size(s['total_size'])} of weights"]
    lines.append(f"  {'stage':<30} {'time':>10}  {'peak RSS':>10}" + ("  peak CUDA" if s["peak_cuda_bytes"] else ""))
    for key, label in _STAGE_NAMES.items():
        if key in s["timings_s"]:
            peak = s["stage_peaks"].get(key)
            mem = f"  {_size(peak['rss']):>10}" if peak else " " * 12
            if peak and s["peak_cuda_bytes"]:
                mem += f"  {_size(peak['cuda']):>10}"
            note = ""
            if key == "alignment":
                note = f"  {s['alignment'].get('passes') or ''}" if s["alignment"]["ran"] \
                    else f"  {s['alignment']['reason']}"
            if key == "stage2" and s["stage2"] and s["stage2"]["steps"]:
                st = s["stage2"]
                note = f"  {st['steps']} steps, loss {st['first_loss']:.4f} -> {st['last_loss']:.4f}"
            lines.append(f"  {label:<30} {s['timings_s'][key]:8.1f} s{mem}{note}")
    if s["stage2"] is None:
        lines.append(f"  {_STAGE_NAMES['stage2']:<30}    skipped (router_training.steps: 0)")
    lines.append(f"  peak memory of the process: {_size(s['peak_rss_bytes'])} RSS"
                 + (f", {_size(s['peak_cuda_bytes'])} CUDA" if s["peak_cuda_bytes"] else ""))
    if s["alignment"]["table"]:
        lines += ["", "alignment (mean matched neuron correlation per layer, before -> after):",
                  s["alignment"]["table"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="build config (YAML; see examples/build.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--device", help="override the config's device: auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    cfg = load_config(args.config)
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    if args.device:
        cfg.device = args.device
        cfg.router_training.device = args.device
    summary = build(cfg, args.out, force=args.force, progress=not args.quiet)
    print(format_summary(summary))
    return 0
