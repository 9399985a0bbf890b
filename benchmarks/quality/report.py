"""The study's draft report: verdicts on the goals, the markdown table, the alignment comparison and a plot.

Goals (issue 6), judged on the mean over seeds of `symphony`'s test losses:
1. the lowest mean in-domain loss among all single models (the base, the specialists) and dense merges;
2. within 3% of each specialist's loss on that specialist's own domain;
3. a lower OOD loss than every source model (the specialists), on each OOD domain and on their mean.
A verdict carries the margin, so a miss says by how much.
"""
from __future__ import annotations

from pathlib import Path

TOLERANCE = 0.03
ALIGNMENT_PAIRS = (("symphony", "no-align"), ("full-post", "full-post-no-align"), ("shared", "shared-no-align"),
                   ("split2", "split2-no-align"), ("merge-linear-aligned", "merge-linear"))


def _summary(results: dict, name: str) -> dict | None:
    entry = results["contenders"].get(name)
    return entry["summary"] if entry and entry.get("summary") else None


def verdicts(results: dict, name: str = "symphony") -> dict:
    """{"goal1": {...}, "goal2": {...}, "goal3": {...}} for contender `name`; each with "pass" (True/False, or
    None when a needed contender was not run) and the numbers behind it."""
    train, ood = results["data"]["train"], results["data"]["ood"]
    me = _summary(results, name)
    out = {}
    if me is None:
        return {g: {"pass": None, "why": f"{name} was not run"} for g in ("goal1", "goal2", "goal3")}

    rivals = {n: e["summary"]["in_domain"] for n, e in results["contenders"].items()
              if e.get("group") in ("source", "merge") and e.get("summary")}
    if rivals:
        best = min(rivals, key=rivals.get)
        margin = me["in_domain"] - rivals[best]
        out["goal1"] = {"pass": margin < 0, "in_domain": me["in_domain"], "best_rival": best,
                        "best_rival_in_domain": rivals[best], "margin": margin,
                        "relative_margin": margin / rivals[best]}
    else:
        out["goal1"] = {"pass": None, "why": "no single model or merge was run"}

    per = {}
    for d in train:
        spec = _summary(results, f"spec-{d}")
        if spec is None:
            continue
        ratio = me["loss"][d] / spec["loss"][d] - 1
        per[d] = {"symphony": me["loss"][d], "specialist": spec["loss"][d], "relative_gap": ratio,
                  "pass": ratio <= TOLERANCE}
    out["goal2"] = ({"pass": all(v["pass"] for v in per.values()), "tolerance": TOLERANCE, "domains": per}
                    if len(per) == len(train) else {"pass": None, "why": "not every specialist was run"})

    specs = {d: _summary(results, f"spec-{d}") for d in train}
    if ood and all(specs.values()):
        checks = {}
        for key in [*ood, "mean"]:
            mine = me["ood"] if key == "mean" else me["loss"][key]
            theirs = {d: (s["ood"] if key == "mean" else s["loss"][key]) for d, s in specs.items()}
            best = min(theirs, key=theirs.get)
            checks[key] = {"symphony": mine, "best_source": f"spec-{best}", "best_source_loss": theirs[best],
                           "margin": mine - theirs[best], "pass": mine < theirs[best]}
        out["goal3"] = {"pass": all(v["pass"] for v in checks.values()), "ood": checks}
    else:
        out["goal3"] = {"pass": None, "why": "no OOD domain, or not every specialist was run"}
    return out


def _pm(mean, std, digits=4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def alignment_pairs(results: dict) -> list[dict]:
    """For every (aligned, unaligned) pair that ran: the differences of the in-domain and OOD means."""
    rows = []
    for a, b in ALIGNMENT_PAIRS:
        sa, sb = _summary(results, a), _summary(results, b)
        if not sa or not sb:
            continue
        entry = results["contenders"][a]
        rows.append({"aligned": a, "unaligned": b, "can_matter": entry.get("alignment_can_matter", True)
                     if entry.get("kind") == "moe" else True,
                     "in_domain_diff": sa["in_domain"] - sb["in_domain"],
                     "ood_diff": (sa["ood"] - sb["ood"]) if "ood" in sa and "ood" in sb else None,
                     "in_domain_std": max(v for v in (sa.get("in_domain_std"), sb.get("in_domain_std"), 0.0)
                                          if v is not None)})
    return rows


def _verdict_lines(v: dict) -> list[str]:
    def mark(p):
        return {True: "**yes**", False: "**no**", None: "not measured"}[p]

    lines = []
    g = v.get("goal1", {})
    if "margin" in g:
        lines.append(f"1. Lowest mean in-domain loss among single models and merges? {mark(g['pass'])}: "
                     f"symphony {g['in_domain']:.4f} vs best rival `{g['best_rival']}` "
                     f"{g['best_rival_in_domain']:.4f} ({100 * g['relative_margin']:+.2f}%).")
    else:
        lines.append(f"1. Lowest mean in-domain loss among single models and merges? {mark(None)} ({g.get('why')}).")
    g = v.get("goal2", {})
    if "domains" in g:
        parts = ", ".join(f"{d} {100 * x['relative_gap']:+.2f}%" for d, x in g["domains"].items())
        lines.append(f"2. Within {100 * g['tolerance']:.0f}% of each specialist on its own domain? "
                     f"{mark(g['pass'])}: {parts} (symphony vs specialist).")
    else:
        lines.append(f"2. Within 3% of each specialist on its own domain? {mark(None)} ({g.get('why')}).")
    g = v.get("goal3", {})
    if "ood" in g:
        parts = ", ".join(f"{k} {x['symphony']:.4f} vs {x['best_source']} {x['best_source_loss']:.4f}"
                          for k, x in g["ood"].items())
        lines.append(f"3. Lower OOD loss than every source model? {mark(g['pass'])}: {parts}.")
    else:
        lines.append(f"3. Lower OOD loss than every source model? {mark(None)} ({g.get('why')}).")
    return lines


def loss_table(contenders: dict, train: list[str], ood: list[str], *, ood_mean: bool = True) -> list[str]:
    """The markdown table of every contender's test losses (mean ± std over seeds), math EM, parameters and
    seeds; a contender without results shows why (its error, skip reason, or "not run")."""
    header = (["contender", "group"] + list(train) + ["in-domain"] + [f"{d} (OOD)" for d in ood]
              + (["OOD mean"] if ood and ood_mean else []) + ["math EM", "params (active)", "seeds"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, e in contenders.items():
        s = e.get("summary") or {}
        label = f"`{name}`" + (f" (= `{e['same_as']}`)" if e.get("same_as") else "")
        if not s:
            why = e.get("error") or e.get("skipped") or "not run"
            lines.append(f"| {label} | {e.get('group', '')} | " + " | ".join(["–"] * (len(header) - 3))
                         + f" | {why.replace('|', '/')[:120]} |")
            continue
        cells = [label, e.get("group", "")]
        cells += [_pm(s["loss"][d], s["loss_std"][d]) for d in train]
        cells.append(_pm(s["in_domain"], s.get("in_domain_std")))
        cells += [_pm(s["loss"][d], s["loss_std"][d]) for d in ood]
        if ood and ood_mean:
            cells.append(_pm(s["ood"], s.get("ood_std")))
        cells.append(_pm(s.get("math_em"), s.get("math_em_std"), 3) if "math_em" in s else "–")
        p = s.get("params") or {}
        total, active = p.get("total"), p.get("active")
        cells.append(f"{total / 1e6:.1f}M ({active / 1e6:.1f}M)" if total and active else "–")
        cells.append(str(s.get("seeds", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """The draft report (the lead edits it into RESULTS.md)."""
    train, ood = results["data"]["train"], results["data"]["ood"]
    lines = ["# Quality study: draft results", ""]
    gpu = results.get("gpu") or results.get("device")
    lines.append(f"Preset `{results['preset']}` on {gpu}, torch {results['torch']}; anchor `{results['anchor']}`; "
                 f"total {results.get('timings_s', {}).get('total', float('nan')):.0f} s.")
    fam = results.get("family", {}).get("summary")
    if fam:
        lines.append(f"Family: Qwen2, {fam['params'] / 1e6:.1f}M parameters, vocabulary {fam['vocab']}; "
                     + "; ".join(f"{n} {m['tokens'] / 1e6:.1f}M tokens at {m['tokens_per_s'] / 1e3:.0f}k tok/s"
                                 for n, m in fam["models"].items()) + ".")
    lines += ["", "## Goals (symphony, mean over seeds)", ""] + _verdict_lines(results.get("verdicts") or
                                                                            verdicts(results))
    lines += ["", "## Test loss (mean next-token NLL; mean ± std over seeds)", ""]
    lines += loss_table(results["contenders"], train, ood)
    lines += ["", "Contenders: " + "; ".join(f"`{n}`: {e['about']}" for n, e in results["contenders"].items()) + "."]
    current = results.get("family", {}).get("fingerprint")
    other = [n for n, e in results["contenders"].items() if e.get("family") and e["family"] != current]
    if other:
        lines += ["", f"Made on another training of the family (same recipe and seed; kept from an earlier run): "
                  + ", ".join(f"`{n}`" for n in other) + "."]

    pairs = alignment_pairs(results)
    if pairs:
        lines += ["", "## Alignment: aligned minus unaligned", "",
                  "| aligned | unaligned | can alignment matter? | Δ in-domain | Δ OOD | seed std |",
                  "|---|---|---|---|---|---|"]
        for r in pairs:
            ood_diff = f"{r['ood_diff']:+.5f}" if r["ood_diff"] is not None else "–"
            lines.append(f"| `{r['aligned']}` | `{r['unaligned']}` | {'yes' if r['can_matter'] else 'no'} | "
                         f"{r['in_domain_diff']:+.5f} | {ood_diff} | {r['in_domain_std']:.5f} |")
    drift = results.get("family", {}).get("drift")
    if drift:
        lines += ["", f"## Drift of the specialists (anchor `{drift['anchor']}`)", "",
                  "| specialist | distance to base | FFN neuron corr. in place | matched | neurons moved |",
                  "|---|---|---|---|---|"]
        for name, d in drift["parameters"]["to_base"].items():
            n = drift["neurons"].get(name)
            corr = (f"{n['mean_before']:.3f} | {n['mean_after']:.3f} | {100 * n['mean_moved']:.1f}%" if n
                    else "(anchor) | – | –")
            lines.append(f"| {name} | {d['all']:.3f} | {corr} |")
        cos = drift["parameters"]["task_vector_cosine"]
        if cos:
            lines.append("")
            lines.append("Task-vector cosine similarity: " + ", ".join(f"{k} {v:.3f}" for k, v in cos.items()) + ".")
    routing = (_summary(results, "symphony") or {}).get("routing")
    if routing and all("source_share" in r for r in routing.values()):
        sources = list(next(iter(routing.values()))["source_share"])
        lines += ["", "## Routing of `symphony` (seed 0): share of routed assignments per source expert", "",
                  "| domain | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
        for d, r in routing.items():
            lines.append(f"| {d} | " + " | ".join(f"{100 * r['source_share'][s]:.1f}%" for s in sources) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path):
    Path(path).write_text(markdown(results), encoding="utf-8")


def plot(results: dict, path):
    """Horizontal bars of the mean in-domain and OOD loss per contender (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, e["summary"]) for n, e in results["contenders"].items() if e.get("summary")]
    if not rows:
        return
    panels = [("in_domain", "mean in-domain test loss")]
    if results["data"]["ood"]:
        panels.append(("ood", "mean OOD test loss"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.32 * len(rows) + 1.5), squeeze=False)
    names = [n for n, _ in rows]
    colors = {"source": "#8c8c8c", "merge": "#c49a6c", "baseline": "#6c8ec4", "symphony": "#d1495b",
              "ablation": "#7fb77e"}
    for ax, (key, title) in zip(axes[0], panels):
        values = [s[key] for _, s in rows]
        errs = [s.get(f"{key}_std") or 0.0 for _, s in rows]
        ax.barh(range(len(rows)), values, xerr=errs,
                color=[colors.get(results["contenders"][n]["group"], "#999999") for n in names])
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        lo, hi = min(values), max(values)
        ax.set_xlim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
