"""What a build reports: the JSON report written beside the model (alignment_report.json) and the printed summary."""
from __future__ import annotations

from symphony.build.memory import size_text

_STAGE_NAMES = {"checks": "checks", "alignment": "alignment (stage 1b)", "router_init": "router init",
                "assembly": "fusion + assembly (stage 1a)", "stage2": "router training (stage 2)", "total": "total"}


def _flat_alignment(report: dict) -> dict:
    """symphony.build.align's report as flat records (what `symphony inspect` prints as tables): the settings, one
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


def build_report(cfg, c, plan, align_result) -> dict:
    """The JSON report of a build (its config, sources, experts, vocabulary and alignment); `c` holds what the
    pipeline's checks found."""
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


def format_summary(s: dict) -> str:
    """The printed summary of a build: what was built, each stage's time, the alignment table, stage 2's loss."""
    lines = [f"built {s['out']}: {s['architecture']}, {s['num_experts']} experts "
             f"({', '.join(s['expert_sources'])}), top-{s['top_k']}, {size_text(s['total_size'])} of weights"]
    lines.append(f"  {'stage':<30} {'time':>10}  {'peak RSS':>10}" + ("  peak CUDA" if s["peak_cuda_bytes"] else ""))
    for key, label in _STAGE_NAMES.items():
        if key in s["timings_s"]:
            peak = s["stage_peaks"].get(key)
            mem = f"  {size_text(peak['rss']):>10}" if peak else " " * 12
            if peak and s["peak_cuda_bytes"]:
                mem += f"  {size_text(peak['cuda']):>10}"
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
    lines.append(f"  peak memory of the process: {size_text(s['peak_rss_bytes'])} RSS"
                 + (f", {size_text(s['peak_cuda_bytes'])} CUDA" if s["peak_cuda_bytes"] else ""))
    if s["alignment"]["table"]:
        lines += ["", "alignment (mean matched neuron correlation per layer, before -> after):",
                  s["alignment"]["table"]]
    return "\n".join(lines)
