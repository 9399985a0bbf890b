"""bench_generate.py's outputs: ratios against grouped_mm, the markdown tables, the plot, and merging runs."""
from __future__ import annotations

from pathlib import Path

from benchmarks.generate_models import BASELINE, IMPLS
from benchmarks.run_info import log, pyplot, write_json

PHASES = ("check", "warm", "prefill", "cold", "compiled")
# phase -> (key of the time or rate, whether larger is faster, key of the ratio it gets)
RATIOS = {"warm": [("tok_s", True, "x_grouped_mm")], "prefill": [("ms", False, "x_grouped_mm")],
          "cold": [("first_s", False, "x_grouped_mm")],
          "compiled": [("first_s", False, "first_x_grouped_mm"), ("tok_s", True, "x_grouped_mm")]}


def add_ratios(results: dict) -> None:
    """Speed ratio of every row against grouped_mm's row of the same model (and B) in the same run: > 1 faster."""
    for phase, keys in RATIOS.items():
        base = {(r["model"], r.get("B")): r for r in results[phase] if r["impl"] == BASELINE}
        for row in results[phase]:
            ref = base.get((row["model"], row.get("B")))
            for key, larger_is_faster, ratio in keys:
                if ref is not None and row.get(key) and ref.get(key):
                    row[ratio] = row[key] / ref[key] if larger_is_faster else ref[key] / row[key]


def merge(runs: list[dict]) -> dict:
    """One result of several runs (e.g. one per model): rows concatenated, run headers kept."""
    out = {k: v for k, v in runs[0].items() if k not in PHASES + ("models", "seconds")}
    out["models"] = {}
    out["runs"] = [{k: r.get(k) for k in ("device", "command", "settings", "seconds")} for r in runs]
    for phase in PHASES:
        out[phase] = [dict(row) for r in runs for row in r.get(phase, [])]
    for r in runs:
        out["models"].update(r.get("models", {}))
    return out


def _cell(row, value_key, fmt, ratio_key="x_grouped_mm"):
    if row is None:
        return "–"
    if value_key not in row:
        return "skipped" if "skipped" in row else "error" if "error" in row else "–"
    text = fmt.format(row[value_key])
    if ratio_key in row and row["impl"] != BASELINE:
        text += f" ({row[ratio_key]:.2f}x)"
    if "note" in row:
        text += "*"
    return text


def _grid(rows):
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["impl"]), {})[r.get("B")] = r
    return by


def table(results: dict) -> str:
    add_ratios(results)
    lines = [f"device: {results['device']}; torch {results['torch']}, triton {results['triton']}, transformers "
             f"{results['transformers']}", f"command: `{results['command']}`", ""]
    models = results["models"]
    for name, spec in models.items():
        lines.append(f"- {name}: {spec['layers']} layers, d {spec['d']}, {spec['E']} experts x {spec['f']}, top-"
                     f"{spec['k']}, {spec['heads']}/{spec['kv']} heads of {spec['head_dim']}, vocab {spec['vocab']}, "
                     f"{spec['params'] / 1e9:.3g} B parameters")
    lines.append("")
    warm, batches = _grid(results["warm"]), sorted({r["B"] for r in results["warm"]})
    prefill = {(r["model"], r["impl"]): r for r in results["prefill"]}
    check = {(r["model"], r["impl"]): r for r in results["check"]}
    tokens = sorted({r["tokens"] for r in results["prefill"]})
    lines.append("Warm generate() tok/s (x grouped_mm), prefill ms of one forward of "
                 f"{'/'.join(map(str, tokens))} tokens (x grouped_mm), and the relative difference of the first "
                 "experts layer's output from grouped_mm's on the same input:")
    lines.append("")
    lines.append("| model | impl | " + " | ".join(f"B={b}" for b in batches) + " | prefill ms | output diff |")
    lines.append("|---|---|" + "---|" * (len(batches) + 2))
    for (model, impl), cells in warm.items():
        err = check.get((model, impl), {}).get("rel_err_vs_grouped_mm")
        lines.append(f"| {model} | {impl} | " + " | ".join(_cell(cells.get(b), "tok_s", "{:.1f}") for b in batches)
                     + f" | {_cell(prefill.get((model, impl)), 'ms', '{:.2f}')} | "
                     + (f"{err:.2%}" if err is not None else "–") + " |")
    for phase, title in (
            ("cold", "First generate() in a fresh process with empty compile caches: wall s (x grouped_mm), "
                     "then the first call at each next B in that process"),
            ("compiled", "Static cache + torch.compile, fresh process: first compiled generate() wall s "
                         "(x grouped_mm); warm tok/s (x grouped_mm)")):
        rows = results[phase]
        if not rows:
            continue
        grid = _grid(rows)
        bs = sorted({r["B"] for r in rows if r.get("B") is not None}) or [None]
        lines += ["", title + ":", "", "| model | impl | " + " | ".join(f"B={b}" if b else "result" for b in bs)
                  + " |", "|---|---|" + "---|" * len(bs)]
        for (model, impl), cells in grid.items():
            # a row without B: the fresh process failed or was skipped before its next batch size
            at = [cells.get(b) or cells.get(None) for b in bs]
            if phase == "cold":
                texts = [_cell(r, "first_s", "{:.2f} s")
                         + (f", {r['first_tok_s']:.1f} tok/s" if r and "first_tok_s" in r else "") for r in at]
            else:
                texts = [_cell(r, "first_s", "{:.1f} s", "first_x_grouped_mm") + "; " + _cell(r, "tok_s", "{:.1f}")
                         for r in at]
            lines.append(f"| {model} | {impl} | " + " | ".join(texts) + " |")
    notes = [f"- {phase} {r['model']} {r['impl']}" + (f" B={r['B']}" if r.get("B") is not None else "") + ": "
             + "; ".join(str(r[k]) for k in ("note", "skipped", "error", "fullgraph_error") if k in r)
             for phase in PHASES for r in results[phase]
             if any(k in r for k in ("note", "skipped", "error", "fullgraph_error"))]
    if notes:
        lines += ["", "Notes (* = fewer new tokens than asked):", ""] + notes
    if "seconds" in results:
        lines += ["", f"{results['seconds']:.0f} s of wall time."]
    return "\n".join(lines)


def plot(results: dict, out_png: Path) -> None:
    plt = pyplot()
    models = list(results["models"])
    if plt is None or not models:
        return
    colour = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        ax = axes[0][col]
        for phase, style, suffix in (("warm", "o-", ""), ("compiled", "s--", " static+compile")):
            for (m, impl), cells in _grid(results[phase]).items():
                pts = sorted((b, r["tok_s"]) for b, r in cells.items() if m == model and b and "tok_s" in r)
                if pts:
                    ax.plot(*zip(*pts), style, color=colour[impl], label=impl + suffix)
        batches = sorted({r["B"] for r in results["warm"] if r["model"] == model})
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="tok/s", title=f"{model}: warm generate")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax = axes[1][col]
        cold = [(r["impl"], r["B"], r["first_s"]) for r in results["cold"] if r["model"] == model and "first_s" in r]
        impls = list(dict.fromkeys(i for i, _, _ in cold))
        bs = sorted({b for _, b, _ in cold})
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = {b: s for i, b, s in cold if i == impl}
            ax.bar([x + (j - (len(impls) - 1) / 2) * width for x in range(len(bs))], [vals.get(b, 0) for b in bs],
                   width=width, color=colour[impl], label=impl)
        ax.set_xticks(range(len(bs)), [f"B={b}" for b in bs])
        ax.set(ylabel="wall s of the first call", title=f"{model}: first generate in a fresh process")
        if impls:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def finish(results: dict, out: Path) -> dict:
    """Write the JSON, the plot and the markdown table into out; print the table; return the results."""
    text = table(results)
    write_json(out / "bench_generate.json", results)
    plot(results, out / "bench_generate.png")
    (out / "bench_generate.md").write_text(text + "\n")
    log("")
    log(text)
    return results
