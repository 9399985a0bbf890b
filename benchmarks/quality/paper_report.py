"""The paper-protocol study's report: the parts' results merged, the table, the plot, drift and CKA, and every
claim of the paper set against what was measured here.

    python benchmarks/quality/paper_report.py RESULTS_JSON ... --out DIR
        -> DIR/paper-results.json (merged), DIR/paper-results.md, DIR/paper-results.png

Claims. The paper reports accuracies (higher is better) at 1.5B; this study measures test losses (lower is
better). A claim "A beats B" is checked on the mean over seeds of the mean in-domain loss and of the OOD loss:
Δ = loss(B) - loss(A), with σ = sqrt(std_A² + std_B²) over seeds; "yes" when Δ > 2σ, "no, reversed" when
Δ < -2σ, "not resolved" otherwise (a single-run contender has std 0).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import papercontenders as pc  # noqa: E402
from benchmarks.quality import report as qreport  # noqa: E402
from benchmarks.quality.paperstudy import PaperSettings  # noqa: E402

CLAIMS = [("symphony", "drop-upcycling"), ("symphony", "bam"), ("symphony", "btx"), ("symphony", "best-dense"),
          ("drop-upcycling", "bam"), ("bam", "btx"), ("symphony", "no-align"), ("symphony", "linear-attn"),
          ("symphony", "plain-embed"), ("symphony", "calib-general")]
CONTROLS = ("anchor-post", "merge-post", "router-only")  # compared with symphony; not in the paper's tables
NOT_IN_PAPER = {"anchor-post": "no such control", "merge-post": "no such control",
                "router-only": "first version's stage 2; not compared"}


def merge(parts: list[dict]) -> dict:
    """One results dict from the parts' (a contender run in several parts: the entry with the most runs)."""
    if not parts:
        raise ValueError("no results to merge")
    first = parts[0]
    out = {k: first.get(k) for k in ("preset", "device", "gpu", "torch", "roles", "ood", "family_config", "settings")}
    out["parts"] = {}
    out["contenders"] = {}
    for r in parts:
        out["parts"][str(r["part"])] = {"family": r["family"]["weights"], "reused": r["family"].get("reused"),
                                        "seconds": r.get("timings_s", {}).get("total"), "family_s": r["family"]["seconds"]}
        for key in ("drift", "cka"):
            if r.get(key):
                out[key] = r[key]
        out.setdefault("family", r["family"])
        for name, e in r["contenders"].items():
            old = out["contenders"].get(name)
            if old is None or len(e.get("runs", [])) > len(old.get("runs", [])) or (e.get("same_as") and not old.get("runs")):
                out["contenders"][name] = dict(e, part=r["part"])
    same = out["contenders"].get("plain-embed", {}).get("same_as")
    if same and out["contenders"].get(same, {}).get("summary"):
        out["contenders"]["plain-embed"]["summary"] = out["contenders"][same]["summary"]
    order = [c.name for c in pc.contenders(out["roles"])]
    out["contenders"] = dict(sorted(out["contenders"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                    else len(order)))
    hashes = {p["family"] for p in out["parts"].values()}
    hashes |= {r["family"] for e in out["contenders"].values() for r in e.get("runs", []) if r.get("family")}
    out["families_agree"] = len(hashes) == 1
    # a part run with other settings (e.g. --study-set stage2_lr=...) is named, not silently mixed in; a setting
    # a part's file lacks (written before the setting existed) had the default's effect
    defaults = {f.name: f.default for f in fields(PaperSettings)}
    base = {**defaults, **(first.get("settings") or {})}
    differ = {}
    for r in parts[1:]:
        mine = {**defaults, **(r.get("settings") or {})}
        if d := {k: v for k, v in mine.items() if base.get(k) != v}:
            differ[str(r["part"])] = d
    out["settings_differ"] = differ
    return out


def _s(results: dict, name: str, key: str | None = None) -> tuple[dict | None, str]:
    """(summary, name) of a contender; "best-dense": the source with the lowest `key` loss."""
    if name == "best-dense":
        srcs = {n: e["summary"] for n, e in results["contenders"].items() if e.get("group") == "source" and e.get("summary")}
        if not srcs:
            return None, name
        best = min(srcs, key=lambda n: srcs[n][key])
        return srcs[best], best
    e = results["contenders"].get(name)
    return (e["summary"] if e and e.get("summary") else None), name


def check(results: dict, a: str, b: str) -> dict:
    """"a beats b" on in-domain and OOD loss (module docstring)."""
    out = {"a": a, "b": b, "paper": None}
    if a in pc.PAPER and b in pc.PAPER:
        out["paper"] = [round(x - y, 2) for x, y in zip(pc.PAPER[a], pc.PAPER[b])]
    for key in ("in_domain", "ood"):
        sa, na = _s(results, a, key)
        sb, nb = _s(results, b, key)
        if not sa or not sb or key not in sa or key not in sb:
            out[key] = None
            continue
        delta = sb[key] - sa[key]
        sigma = math.hypot(sa.get(key + "_std") or 0.0, sb.get(key + "_std") or 0.0)
        verdict = "yes" if delta > 2 * sigma else "no, reversed" if delta < -2 * sigma else "not resolved"
        out[key] = {"a": na, "b": nb, "delta": delta, "sigma": sigma, "verdict": verdict}
    return out


def goal(results: dict) -> dict:
    """Issue 13's goal: symphony's mean in-domain loss the lowest of every contender, and its OOD loss lower than
    every source's and baseline's; with the margins."""
    me = _s(results, "symphony")[0]
    if not me:
        return {"pass": None, "why": "symphony was not run"}
    others = {n: e["summary"] for n, e in results["contenders"].items() if n != "symphony" and e.get("summary")
              and n != "plain-embed"}
    best_in = min(others, key=lambda n: others[n]["in_domain"]) if others else None
    ood_rivals = {n: s for n, s in others.items() if results["contenders"][n]["group"] in ("source", "baseline")}
    best_ood = min(ood_rivals, key=lambda n: ood_rivals[n]["ood"]) if ood_rivals else None
    out = {"in_domain": None, "ood": None}
    if best_in:
        out["in_domain"] = {"best_other": best_in, "margin": me["in_domain"] - others[best_in]["in_domain"],
                            "pass": me["in_domain"] < others[best_in]["in_domain"]}
    if best_ood:
        out["ood"] = {"best_other": best_ood, "margin": me["ood"] - ood_rivals[best_ood]["ood"],
                      "pass": me["ood"] < ood_rivals[best_ood]["ood"]}
    return out


def markdown(results: dict) -> str:
    roles, ood = results["roles"], results["ood"]
    domains = list(roles.values())
    fam = results.get("family", {})
    lines = ["# Paper-protocol study: draft results", "",
             f"Preset `{results['preset']}` on {results.get('gpu') or results.get('device')}, torch {results['torch']}. "
             f"Family: {fam.get('params', 0) / 1e6:.1f}M parameters per dense model; anchor `{roles['general']}`; "
             + ("every part used the same family weights" if results["families_agree"] else
                "**the parts' families differ** (" + ", ".join(f"part {k}: {v['family']}"
                                                              for k, v in results["parts"].items()) + ")") + "."]
    if results.get("settings_differ"):
        lines += ["", "**The parts' settings differ** from part " + str(next(iter(results["parts"]))) + "'s: "
                  + "; ".join(f"part {p}: " + ", ".join(f"{k} = {v}" for k, v in d.items())
                              for p, d in results["settings_differ"].items()) + "."]
    lines += ["", "## Test loss (mean next-token NLL; mean ± std over seeds)", ""]
    lines += qreport.loss_table(results["contenders"], domains, ood, ood_mean=len(ood) > 1)
    g = goal(results)
    lines += ["", "## The issue's goal", ""]
    for key, what in (("in_domain", "lowest mean in-domain loss of every contender"),
                      ("ood", "lower OOD loss than every source and baseline")):
        v = g.get(key)
        lines.append(f"- symphony {what}: " + ("not measured" if not v else
                                               f"{'**yes**' if v['pass'] else '**no**'} (margin {v['margin']:+.4f} "
                                               f"against `{v['best_other']}`)"))
    lines += ["", "## The paper's claims, here", "",
              "| claim | paper (accuracy points, in-domain / OOD) | Δ in-domain loss (± 2σ) | Δ OOD loss (± 2σ) |",
              "|---|---|---|---|"]
    for a, b in CLAIMS + [("symphony", c) for c in CONTROLS]:
        r = check(results, a, b)

        def cell(v):
            return "–" if not v else f"{v['delta']:+.4f} ± {2 * v['sigma']:.4f}: {v['verdict']}" + (
                f" (`{v['b']}`)" if v["b"] != b else "")
        paper = NOT_IN_PAPER[b] if b in CONTROLS else (f"{r['paper'][0]:+.2f} / {r['paper'][1]:+.2f}" if r["paper"] else "–")
        lines.append(f"| `{a}` beats `{b}` | {paper} | {cell(r['in_domain'])} | {cell(r['ood'])} |")
    lines += _drift_lines(results) + _cka_lines(results)
    return "\n".join(lines) + "\n"


def _drift_lines(results: dict) -> list[str]:
    d = results.get("drift")
    if not d:
        return []
    parents = results.get("family", {}).get("parents", {})
    out = ["", f"## The family: drift from base A and neuron order against the anchor (`{d['anchor']}`)", "",
           "| source | parent | distance to base A | to its own base | neuron corr. in place | matched | moved |",
           "|---|---|---|---|---|---|---|"]
    for name, dist in d["to_base_a"]["to_base"].items():
        n = d["neurons"].get(name)
        corr = f"{n['mean_before']:.3f} | {n['mean_after']:.3f} | {100 * n['mean_moved']:.1f}%" if n else "(anchor) | – | –"
        out.append(f"| {name} | {parents.get(name)} | {dist['all']:.3f} | {d['to_own_base'][name]['all']:.3f} | {corr} |")
    return out


def _cka_lines(results: dict) -> list[str]:
    c = results.get("cka")
    if not c or "symphony" not in c or "no-align" not in c:
        return []
    keys = ("cka_intermediate", "cka_output", "neuron_corr", "weight_cos", "weight_cka")
    out = ["", "## Inter-expert similarity against the anchor's expert (stage 1, aligned / unaligned)", "",
           "| expert | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    names = c["symphony"]["expert_sources"] or []
    for e, v in c["symphony"]["vs_anchor"].items():
        u = c["no-align"]["vs_anchor"][e]
        label = names[int(e)] if names else e
        out.append(f"| {label} | " + " | ".join(f"{v[k]:.3f} / {u[k]:.3f}" for k in keys) + " |")
    out += ["", "Linear CKA of activations cannot change under alignment (cka.py says why); the neuron-paired "
                "measures can, and none of them enters the function of whole-FFN experts."]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results-partN.json files")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    results = merge([json.loads(Path(f).read_text()) for f in args.results])
    results["goal"] = goal(results)
    results["claims"] = [check(results, a, b) for a, b in CLAIMS + [("symphony", c) for c in CONTROLS]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "paper-results.md").write_text(markdown(results), encoding="utf-8")
    qreport.plot({"contenders": results["contenders"], "data": {"ood": results["ood"]}}, out / "paper-results.png")
    print(f"wrote {out / 'paper-results.md'}, {out / 'paper-results.png'}, {out / 'paper-results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
