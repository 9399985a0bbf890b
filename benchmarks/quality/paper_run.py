"""The paper-protocol study (issue 13), one part per GPU run of at most 10 minutes.

    python benchmarks/quality/paper_run.py --part N --out DIR [--work DIR] [--preset gpu|cpu|toy|micro]

Every part builds the paper family (paperfamily.py) unless WORK/family holds one of the same recipe and data
(a warm machine keeps it between calls; a fresh one trains it again, deterministically), then makes, post-trains
and evaluates its contenders and writes OUT/results-partN.json (again after every contender, so a run cut
short keeps what it finished). paper_report.py turns the parts' files into the table, the plot and the
comparison with the paper's claims.

    part 1: the family, its drift and inter-expert CKA; base_a, base_b, the four sources, the dense merges
    part 2: the dense controls (the anchor and the best merge, post-trained like the MoEs)
    part 3: symphony (preset: paper)         part 4: no-align
    part 5: btx                              part 6: drop-upcycling
    part 7: bam (attention experts in plain PyTorch: the slowest)
    part 8: linear-attn                      part 9: calib-general, plain-embed (not trained when it is
                                                     symphony's model bit for bit)
    part 10: router-only (stage 2 trains the router alone: the first arXiv version, the project's default)
    part 0: all of them (toy sizes on a CPU)
One MoE contender per part: three seeds of 10M tokens each fill most of a 10-minute run (README.md has the
estimates). no-align and calib-general can only differ from symphony by the GPU's non-determinism (alignment
permutes whole-FFN experts, and the router starts random), so parts 4 and 9 come last.

--budget-s: no contender or seed starts after that many seconds (the family's time included); what is not
started is recorded as skipped, and `--missing-only --previous FILE` runs only those later. Data: the paper
layout (`python benchmarks/quality/paperdata.py --out benchmarks/quality/data-paper`, carried to the GPU);
with --preset toy or micro and no --data, toy data is prepared into WORK/data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).resolve().parent
PARTS = {1: ["base_a", "base_b", "src-*", "merge-linear", "merge-linear-aligned", "merge-base-a"],
         2: ["anchor-post", "merge-post"], 3: ["symphony"], 4: ["no-align"], 5: ["btx"], 6: ["drop-upcycling"],
         7: ["bam"], 8: ["linear-attn"], 9: ["calib-general", "plain-embed"], 10: ["router-only"]}


def _overrides(items) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, not {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def complete(entry: dict | None, seeds: int) -> bool:
    """Whether an earlier entry needs no more runs (a trained contender: `seeds` of them)."""
    if not entry:
        return False
    if entry.get("same_as"):
        return True
    runs = entry.get("runs") or []
    return bool(runs) and (entry.get("kind") in ("checkpoint", "merge") or len(runs) >= seeds)


def chosen(part: int, everything: list, only=None, previous: dict | None = None, seeds: int = 3) -> list:
    """The contenders of a part (all for part 0), or `only`; without those `previous` has complete."""
    names = [c.name for c in everything]
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise ValueError(f"unknown contender {bad[0]!r}; known: {', '.join(names)}")
        picked = [c for c in everything if c.name in only]
    elif part == 0:
        picked = list(everything)
    else:
        pats = PARTS[part]
        picked = [c for c in everything if c.name in pats or ("src-*" in pats and c.name.startswith("src-"))]
    if previous:
        picked = [c for c in picked if not complete(previous.get(c.name), seeds)]
    return picked


def _write(path: Path, obj):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", type=int, required=True, choices=[0, *PARTS])
    p.add_argument("--out", required=True, help="folder for results-partN.json (e.g. $OUT on the GPU machine)")
    p.add_argument("--work", help="folder for the family, texts and models (default: a folder in the temp dir)")
    p.add_argument("--data", help="paper-layout data (default benchmarks/quality/data-paper; toy: WORK/data)")
    p.add_argument("--preset", default="gpu", choices=("gpu", "cpu", "toy", "micro"))
    p.add_argument("--only", nargs="+", metavar="NAME")
    p.add_argument("--previous", help="results-partN.json of an earlier run of this part: keep its contenders")
    p.add_argument("--missing-only", action="store_true", help="with --previous: run only what it lacks")
    p.add_argument("--seeds", type=int)
    p.add_argument("--budget-s", type=float)
    p.add_argument("--device", default="auto")
    p.add_argument("--family-set", nargs="*", metavar="KEY=VALUE", help="override PaperFamilyConfig fields")
    p.add_argument("--study-set", nargs="*", metavar="KEY=VALUE", help="override PaperSettings fields")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def run_part(args) -> dict:
    import torch

    from benchmarks.quality import data as qdata
    from benchmarks.quality import paperdata
    from benchmarks.quality import papercontenders as pc
    from benchmarks.quality.paperfamily import PaperFamilyConfig
    from benchmarks.quality.paperstudy import PaperSettings, PaperStudy

    start = time.perf_counter()
    deadline = start + args.budget_s if args.budget_s else None
    study_set = _overrides(args.study_set)
    if args.seeds is not None:
        study_set["seeds"] = args.seeds
    fam_cfg = PaperFamilyConfig.preset(args.preset, **_overrides(args.family_set))
    settings = PaperSettings.preset(args.preset, **study_set)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / f"paper-study-{args.preset}"
    full_data = args.preset in ("gpu", "cpu")  # the paper layout of paperdata.py; toy sizes make toy data
    data_dir = Path(args.data) if args.data else (HERE / "data-paper" if full_data else work / "data")
    if not args.data and not full_data:
        try:
            paperdata.roles(qdata.read_manifest(data_dir))
        except qdata.DataError:
            paperdata.prepare(data_dir, toy=True, progress=False)
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    if args.missing_only and not previous:
        raise ValueError("--missing-only needs --previous")
    st = PaperStudy(data_dir, work, family_cfg=fam_cfg, settings=settings, device=args.device,
                    progress=not args.quiet)
    kept = previous.get("contenders", {}) if previous else {}
    picked = chosen(args.part, pc.contenders(st.roles), args.only, kept if args.missing_only else None,
                    settings.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results-part{args.part}.json"
    results = {"part": args.part, "preset": args.preset, "device": str(st.device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(st.device) if st.device.type == "cuda" else None,
               "roles": st.roles, "ood": st.ood, "family_config": fam_cfg.to_dict(), "settings": settings.to_dict(),
               "contenders": dict(previous.get("contenders", {})) if previous else {}, "timings_s": {}}
    t = time.perf_counter()
    fam = st.family()
    results["family"] = {k: fam.get(k) for k in ("weights", "params", "vocab", "train_tokens", "seconds", "reused",
                                                 "roles", "parents", "device")}
    results["family"]["models"] = {n: {k: m.get(k) for k in ("tokens", "seconds", "tokens_per_s", "val_loss")}
                                   for n, m in fam["models"].items()}
    results["timings_s"]["family"] = time.perf_counter() - t
    st.prepare_texts()
    if args.part in (0, 1) and not args.only:
        t = time.perf_counter()
        results["drift"] = st.drift()
        results["cka"] = st.cka()
        results["timings_s"]["drift_cka"] = time.perf_counter() - t
    _write(path, results)
    failed = []
    for c in picked:
        if deadline is not None and time.perf_counter() > deadline:
            results["contenders"][c.name] = {"group": c.group, "kind": c.kind, "about": c.about, "runs": [],
                                             "summary": {}, "skipped": "time budget reached"}
            continue
        st.log(f"{c.name}: {c.about}")
        try:
            done = kept.get(c.name, {}).get("runs") if args.missing_only else None
            entry = st.run(c, deadline, done_runs=done or [])
        except Exception as e:  # noqa: BLE001 - one broken contender must not cost the others
            traceback.print_exc()
            entry = {"group": c.group, "kind": c.kind, "about": c.about, "runs": [], "summary": {},
                     "error": f"{type(e).__name__}: {e}"}
            failed.append(c.name)
        entry["family"] = fam["weights"]
        for run in entry.get("runs", []):
            run.setdefault("family", fam["weights"])
        results["contenders"][c.name] = entry
        s = entry.get("summary") or {}
        st.log(f"  {c.name}: in-domain {s.get('in_domain', float('nan')):.4f}, OOD {s.get('ood', float('nan')):.4f} "
               f"({entry.get('seconds', 0):.0f} s)")
        _write(path, results)
    results["failed"] = failed
    results["timings_s"]["total"] = time.perf_counter() - start
    _write(path, results)
    return results


def main(argv=None) -> int:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from benchmarks.quality import data as qdata
    from symphony.errors import SymphonyError

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        results = run_part(args)
    except (qdata.DataError, SymphonyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"part {args.part} done in {results['timings_s']['total']:.0f} s: {Path(args.out) / f'results-part{args.part}.json'}")
    if results["failed"]:
        print(f"error: contenders failed: {', '.join(results['failed'])} (tracebacks above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
