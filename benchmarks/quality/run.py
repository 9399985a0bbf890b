"""The quality study in one command (issue 6): family, contenders, metrics, JSON + markdown + PNG.

    python benchmarks/quality/run.py --out DIR [--stage family|contenders|all] [--toy]

--toy: the whole study at toy size on a CPU (about 1-2 minutes), on toy data prepared into DIR/data from
Python's stdlib. Otherwise the data comes from --data (default benchmarks/quality/data, made by
`python benchmarks/quality/data.py --out benchmarks/quality/data`). README.md in this folder has the GPU
commands and the expected times.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).resolve().parent
EXPORTED = ("results.json", "results.md", "results.png", "family/family.json", "family/drift.json")


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _overrides(items, what: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--{what} takes KEY=VALUE, not {item!r}")
        value = _value(value)
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (family, results.json, results.md, results.png)")
    p.add_argument("--stage", default="all", choices=("family", "contenders", "all"),
                   help="family: train the family only; contenders: (train the family if missing, then) evaluate "
                        "the contenders; all: both (default)")
    p.add_argument("--toy", action="store_true", help="toy sizes on toy data (CPU, about 1-2 minutes)")
    p.add_argument("--data", help="prepared data folder (default: benchmarks/quality/data; with --toy: DIR/data)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these contenders")
    p.add_argument("--all-contenders", action="store_true",
                   help="with --toy: every contender (default: one of every code path, contenders.SMOKE)")
    p.add_argument("--previous", metavar="RESULTS_JSON",
                   help="keep the contenders of an earlier results.json of the same preset that this run does not "
                        "make again (default with --stage contenders: DIR/results.json)")
    p.add_argument("--missing-only", action="store_true",
                   help="with --previous: run only the contenders it lacks, skipped, or ran with fewer seeds")
    p.add_argument("--seeds", type=int, help="seeds per trained contender (default 3; toy 2)")
    p.add_argument("--budget-s", type=float, help="stop starting new contenders (and seeds) after this many seconds; "
                                                   "the rest are recorded as skipped")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--family", nargs="*", metavar="KEY=VALUE", help="override FamilyConfig fields")
    p.add_argument("--study", nargs="*", metavar="KEY=VALUE", help="override StudySettings fields")
    p.add_argument("--compile", action="store_true", help="torch.compile the family's training forward")
    p.add_argument("--retrain", action="store_true", help="train the family again even if DIR/family has one")
    p.add_argument("--keep-models", action="store_true", help="keep every built/trained model under DIR/work")
    p.add_argument("--export", metavar="DIR", help="also copy the small result files (results.*, family.json, "
                                                   "drift.json) to DIR, e.g. $OUT on the GPU machine")
    p.add_argument("--verbose", action="store_true", help="progress bars of the pipeline and stage 2")
    return p.parse_args(argv)


def export(out: Path, target: Path) -> list[Path]:
    """Copy the small result files of `out` into `target` (flat); returns the copies."""
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for rel in EXPORTED:
        src = out / rel
        if src.is_file():
            dst = target / rel.replace("/", "-")
            shutil.copy2(src, dst)
            copied.append(dst)
    return copied


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from benchmarks.quality import data as qdata
    from benchmarks.quality.family import FamilyConfig
    from benchmarks.quality.study import StudySettings, run_study, select
    from symphony.errors import SymphonyError

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    preset = "toy" if args.toy else "gpu"
    start = time.perf_counter()
    try:  # bad input: one line, before any heavy work
        family = _overrides(args.family, "family")
        study = _overrides(args.study, "study")
        if args.compile:
            family["compile"] = True
        if args.seeds is not None:
            study["seeds"] = args.seeds
        FamilyConfig.preset(preset, **family)
        StudySettings.preset(preset, **study)
        if args.previous and not Path(args.previous).is_file():
            raise ValueError(f"--previous: no file {args.previous}")
        if args.missing_only and not args.previous and args.stage != "contenders":
            raise ValueError("--missing-only needs --previous (or --stage contenders with DIR/results.json)")
        if args.data:
            data_dir = Path(args.data)
        elif args.toy:
            data_dir = out / "data"
            try:
                qdata.read_manifest(data_dir)
            except qdata.DataError:
                qdata.prepare(data_dir, toy=True, progress=False)
        else:
            data_dir = HERE / "data"
        manifest = qdata.read_manifest(data_dir)
        if manifest.get("toy") and not args.toy:
            raise qdata.DataError(f"{data_dir} holds toy data; use --toy, or prepare the study's data")
        select(qdata.domains_with_role(manifest, "train"), args.only)
    except (qdata.DataError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        results = run_study(data_dir, out, stage=args.stage, preset=preset, family_overrides=family, study_overrides=study,
                  only=args.only, all_contenders=args.all_contenders, previous=args.previous,
                  missing_only=args.missing_only,
                  budget_s=args.budget_s, device=args.device, keep_models=args.keep_models, retrain=args.retrain)
    except (qdata.DataError, SymphonyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.export:
            for path in export(out, Path(args.export)):
                print(f"exported {path}")
    print(f"done in {time.perf_counter() - start:.0f} s: {out / 'results.json'}"
          + (f", {out / 'results.md'}, {out / 'results.png'}" if args.stage != "family" else ""))
    if args.stage != "family" and (out / "results.md").is_file():
        print()
        print((out / "results.md").read_text())
    if results.get("failed"):
        print(f"error: contenders failed: {', '.join(results['failed'])} (tracebacks above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
