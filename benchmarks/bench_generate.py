"""transformers generate() end to end, per experts implementation (symphony, grouped_mm, batched_mm, eager), on
random-init MoE models built on the device from a config (benchmarks/generate_models.py: Qwen3-MoE-like,
Mixtral-like, Qwen3-Next-like).

    python benchmarks/bench_generate.py --out DIR [--models NAME ...] [--quick] [--impls ...] [--batch-sizes ...]
    python benchmarks/bench_generate.py --merge DIR1 DIR2 ... --out DIR     # one table and plot of several runs
    python benchmarks/bench_generate.py --device cpu --tiny --out DIR       # the same logic at test sizes on CPU

Per model, bf16, same weights for every implementation (one model, switched with set_experts_implementation;
the fresh processes below rebuild it from the same seed):
1. warm: greedy generate() of exactly --new-tokens tokens (min_new_tokens = max_new_tokens) after a prompt of
   --prompt-tokens random ids, at each batch size B; tok/s = B * new tokens / wall time of the whole call (its
   prefill included), median of up to --reps calls after a 2-token warm-up call (whose wall time is kept as
   `first_call_s`: the first call at that B in this process). A cell whose estimated time exceeds
   --cell-budget-s generates fewer tokens (noted); batched_mm cells whose per-layer copy of expert weights
   would exceed --batched-mm-max-gb are skipped (noted). Note: on accelerators transformers 5.x decodes a
   "grouped_mm" model with batched_mm (GenerationMixin._optimize_model_for_decode): grouped_mm's numbers are
   what a user of experts_implementation="grouped_mm" gets, prefill on grouped_mm and decode on batched_mm;
2. prefill: one forward of --prefill-tokens tokens (B = 1, no cache, last logits only), median of --prefill-reps;
3. cold: a fresh process per implementation with empty compile caches (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR
   and any --fresh-cache-env name point at new empty folders) runs its first generate() at each of
   --cold-batch-sizes in turn: wall time and tok/s of the first call at each B in that process;
4. compiled: a fresh process per implementation (empty caches again) generates with a static cache, which makes
   transformers compile the decode forward (torch.compile, mode "reduce-overhead" = CUDA graphs; fullgraph
   unless --no-fullgraph, falling back to fullgraph=False with the error noted): wall time of the first
   compiled generate at each of --compile-batch-sizes (the second B recompiles in the same process), then warm
   tok/s (median of up to --reps calls). This is transformers' own static-cache path: every generate() call
   makes a new StaticCache (sized to the longest seen), the prefill runs uncompiled, the decode steps compiled.
Compile modes: symphony_kernels by default serves an eager call whose kernels are still compiling with torch's
batched or grouped GEMM while they compile in the background. Phases 1 and 2 (and the warm timing of phase 4) run with
blocking compiles, so that they time the kernels; the first calls of phases 3 and 4 run in the mode a new
process starts in (SYMPHONY_COMPILE, default "background": what a user gets), recorded as `compile_mode`.
Also checked: the first experts layer's output under each implementation against grouped_mm's on the same input.
Ratios ("x grouped_mm") are speed ratios against grouped_mm timed in the same run: > 1 means faster.
Time: each model gets an equal share of --budget-s (of what is left when it starts); its warm and prefill cells
leave the expected time of its fresh processes (FRESH_S) to them, a fresh process starts only when its expected
time is left and is killed when the share is spent (the rows it wrote are kept); nothing new starts once the
budget is spent (what is left is listed as skipped). Writes
DIR/bench_generate.json (after every phase), DIR/bench_generate.png and DIR/bench_generate.md; prints the table
last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import generate_models as gm  # noqa: E402
from benchmarks import generate_report as report  # noqa: E402
from benchmarks.run_info import (FRESH_CACHE_ENV, Budget, base_parser, blocking_compiles,  # noqa: E402
                                 compile_mode_of_new_processes, fresh_cache_env, header, log, write_json)

PROFILES = {  # defaults per profile; command-line options override them
    "default": dict(models=["qwen3-moe"], impls=list(gm.IMPLS), batch_sizes=[1, 4, 16, 64, 256], new_tokens=32,
                    prompt_tokens=16, reps=3, cell_budget_s=3.0, prefill_tokens=4096, prefill_reps=3,
                    cold_impls=["symphony", "grouped_mm"], cold_batch_sizes=[1, 16, 64],
                    compile_impls=["symphony", "grouped_mm"], compile_batch_sizes=[1, 16], budget_s=270.0),
    "quick": dict(models=["qwen3-moe"], impls=["symphony", "grouped_mm"], batch_sizes=[1, 16], new_tokens=16,
                  prompt_tokens=16, reps=2, cell_budget_s=2.0, prefill_tokens=4096, prefill_reps=2,
                  cold_impls=["symphony", "grouped_mm"], cold_batch_sizes=[1], compile_impls=[],
                  compile_batch_sizes=[1], budget_s=100.0),
    "tiny": dict(models=list(gm.TINY), impls=list(gm.IMPLS), batch_sizes=[1, 2], new_tokens=3, prompt_tokens=4,
                 reps=1, cell_budget_s=20.0, prefill_tokens=24, prefill_reps=1, cold_impls=["symphony"],
                 cold_batch_sizes=[1, 2], compile_impls=["symphony"], compile_batch_sizes=[1], budget_s=600.0),
}
# Expected seconds of one fresh process (start, imports, build, its generate calls; compiled: two compilations):
# the in-process cells leave this much of a model's budget to them, and one starts only with this much left.
FRESH_S = {"cold": 25.0, "compiled": 55.0}


def parse_args(argv):
    ap = base_parser(__doc__, "test-size models (with --device cpu: float32)",
                     "~1 minute: symphony and grouped_mm, B 1 and 16, no compiled phase")
    ap.add_argument("--merge", type=Path, nargs="+", help="combine the bench_generate.json of these run folders")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--impls", nargs="+", choices=gm.IMPLS)
    ap.add_argument("--batch-sizes", nargs="+", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--prompt-tokens", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--cell-budget-s", type=float)
    ap.add_argument("--budget-s", type=float, help="stop starting new work after this many seconds")
    ap.add_argument("--prefill-tokens", type=int)
    ap.add_argument("--prefill-reps", type=int)
    ap.add_argument("--cold-impls", nargs="*", choices=gm.IMPLS)
    ap.add_argument("--cold-batch-sizes", nargs="+", type=int)
    ap.add_argument("--compile-impls", nargs="*", choices=gm.IMPLS)
    ap.add_argument("--compile-batch-sizes", nargs="+", type=int)
    ap.add_argument("--no-fullgraph", action="store_true")
    ap.add_argument("--batched-mm-max-gb", type=float, default=64.0,
                    help="skip batched_mm (and grouped_mm's batched_mm decode) cells copying more expert weights "
                         "per layer than this")
    ap.add_argument("--fresh-cache-env", nargs="*", default=list(FRESH_CACHE_ENV),
                    help="environment variables that point at new empty folders in the fresh processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "default"]
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not args.merge and not args.worker and not torch.cuda.is_available():
        raise SystemExit("bench_generate.py: no CUDA device (use --device cpu --tiny for the CPU check)")
    return args


def settings(args) -> dict:
    keys = ("device", "tiny", "seed", "new_tokens", "prompt_tokens", "reps", "cell_budget_s", "prefill_tokens",
            "prefill_reps", "batched_mm_max_gb", "budget_s", "fresh_cache_env")
    out = {k: getattr(args, k) for k in keys}
    out["dtype"] = str(dtype_of(args)).replace("torch.", "")
    out["fullgraph"] = not args.no_fullgraph
    return out


def dtype_of(args):
    # Triton's CPU interpreter computes bf16 wrongly (numpy has no bf16), so the CPU check runs in float32.
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def max_positions(args) -> int:
    return max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 64


def weight_copy_bytes(impl, spec, B, prompt, device):
    """Bytes of expert weights that batched_mm copies per layer in one generate of this batch (0 if none)."""
    prefill, decode = B * prompt * spec["k"], B * spec["k"]
    if impl == "batched_mm":
        return max(prefill, decode) * gm.expert_pair_bytes(spec)
    if impl == "grouped_mm" and device != "cpu":  # transformers decodes grouped_mm with batched_mm
        return decode * gm.expert_pair_bytes(spec)
    return 0


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def free_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ warm phase
def timed_tokens(model, ids, args, budget_s, cc=None) -> dict:
    """Median tok/s of generate() at this batch, up to args.reps calls within budget_s. Eager (cc None): fewer
    new tokens than asked when one call would not fit, by a 2-token probe of the per-forward time. Compiled:
    always args.new_tokens (another length would be another static cache shape, hence a recompile)."""
    B, n, row, times = ids.shape[0], args.new_tokens, {}, []
    if cc is None:
        probe = gm.generate_s(model, ids, 2, args.device)
        if probe / 2 * n > budget_s:
            n = max(2, int(budget_s / (probe / 2)))
            row["note"] = f"{n} new tokens instead of {args.new_tokens}: the {budget_s:g} s cell budget"
        if n == 2:
            times.append(probe)
    while not times or (len(times) < args.reps and sum(times) + times[0] <= budget_s):
        times.append(gm.generate_s(model, ids, n, args.device, cc))
    row.update(new_tokens=n, times_s=times, tok_s=B * n / statistics.median(times))
    return row


def warm_cell(model, spec, impl, B, args, budget, reserve=0.0) -> dict:
    row = {"model": spec["name"], "impl": impl, "B": B, "prompt_tokens": args.prompt_tokens}
    copy = weight_copy_bytes(impl, spec, B, args.prompt_tokens, args.device)
    if copy > args.batched_mm_max_gb * 1e9:
        row["skipped"] = (f"would copy {copy / 1e9:.0f} GB of expert weights per layer (batched_mm"
                          f"{' decode' if impl == 'grouped_mm' else ''}; limit --batched-mm-max-gb "
                          f"{args.batched_mm_max_gb:g})")
        return row
    if not budget.allows(2 * args.cell_budget_s, reserve):
        row["skipped"] = "run budget spent"
        return row
    ids = gm.prompt_ids(spec["vocab"], B, args.prompt_tokens, args.device, seed=B)
    try:
        row["first_call_s"] = gm.generate_s(model, ids, 2, args.device)  # compiles what this B needs
        row.update(timed_tokens(model, ids, args, args.cell_budget_s))
    except Exception as e:  # noqa: BLE001 - record (OOM, an unsupported shape) and go on
        row["error"] = error_text(e)
    free_memory(args.device)
    log(f"  warm {spec['name']} {impl} B={B}: " + (f"{row['tok_s']:.1f} tok/s ({row['new_tokens']} new tokens)"
                                                   if "tok_s" in row else row.get("skipped") or row.get("error")))
    return row


def prefill_cell(model, spec, impl, args, budget, reserve=0.0) -> dict:
    row = {"model": spec["name"], "impl": impl, "tokens": args.prefill_tokens}
    copy = weight_copy_bytes("batched_mm", spec, 1, args.prefill_tokens, args.device) if impl == "batched_mm" else 0
    if copy > args.batched_mm_max_gb * 1e9:
        row["skipped"] = f"batched_mm would copy {copy / 1e9:.0f} GB of expert weights per layer"
        return row
    if not budget.allows(args.cell_budget_s, reserve):
        row["skipped"] = "run budget spent"
        return row
    ids = gm.prompt_ids(spec["vocab"], 1, args.prefill_tokens, args.device, seed=7)
    try:
        gm.forward_s(model, ids, args.device)
        times = [gm.forward_s(model, ids, args.device) for _ in range(args.prefill_reps)]
        row.update(times_ms=[1e3 * t for t in times], ms=1e3 * statistics.median(times))
    except Exception as e:  # noqa: BLE001
        row["error"] = error_text(e)
    free_memory(args.device)
    log(f"  prefill {spec['name']} {impl} T={args.prefill_tokens}: "
        + (f"{row['ms']:.2f} ms" if "ms" in row else row.get("skipped") or row.get("error")))
    return row


def run_in_process(name, args, budget, results, reserve):
    """Warm generate, prefill and an output check for every implementation on one model, leaving `reserve`
    seconds of the budget to what follows."""
    spec = dict(gm.spec_of(name, args.tiny), name=name)
    impls = sorted(args.impls, key=lambda i: i != gm.BASELINE)  # the baseline first: the output check needs it
    t0 = time.perf_counter()
    model = gm.build_model(spec, impls[0], args.device, dtype_of(args), args.seed, max_positions(args))
    results["models"][name] = dict(spec, params=sum(p.numel() for p in model.parameters()),
                                   build_s=time.perf_counter() - t0)
    log(f"{name}: {results['models'][name]['params'] / 1e9:.2f} B parameters, built in "
        f"{results['models'][name]['build_s']:.1f} s")
    check_ids = gm.prompt_ids(spec["vocab"], 1, 16, args.device, seed=99)
    reference = None
    for impl in impls:
        model.set_experts_implementation(impl)
        check = {"model": name, "impl": impl}
        try:
            if weight_copy_bytes(impl, spec, 1, 16, "cpu") <= args.batched_mm_max_gb * 1e9:
                out = gm.first_experts_output(model, check_ids)
                if impl == gm.BASELINE:
                    reference = out
                elif reference is not None:
                    check["rel_err_vs_grouped_mm"] = ((out - reference).norm() / reference.norm()).item()
        except Exception as e:  # noqa: BLE001
            check["error"] = error_text(e)
        results["check"].append(check)
        for B in args.batch_sizes:
            results["warm"].append(warm_cell(model, spec, impl, B, args, budget, reserve))
        results["prefill"].append(prefill_cell(model, spec, impl, args, budget, reserve))
    del model, reference
    free_memory(args.device)


# --------------------------------------------------------------------------------------------- fresh processes
def run_fresh(kind, name, impl, args, budget, tmp_root) -> list[dict]:
    """Rows of a fresh-process measurement ("cold" or "compiled"), or one row naming why there are none."""
    base = {"model": name, "impl": impl}
    if not budget.allows(FRESH_S[kind] if not args.tiny else 1.0):
        return [dict(base, skipped="run budget spent")]
    spec_path = Path(tempfile.mkdtemp(prefix="worker-", dir=tmp_root)) / "spec.json"
    out_path = spec_path.with_name("out.json")
    spec = dict(kind=kind, model=name, impl=impl, settings=settings(args), out=str(out_path),
                batch_sizes=args.cold_batch_sizes if kind == "cold" else args.compile_batch_sizes,
                max_positions=max_positions(args), launched_at=time.time(), batched_mm_max_gb=args.batched_mm_max_gb)
    spec_path.write_text(json.dumps(spec))
    env = fresh_cache_env(args.fresh_cache_env, tmp_root)
    t0 = time.perf_counter()
    failure = None
    try:
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--worker", str(spec_path)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(1.0, budget.left()))
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            failure = f"fresh process exit {proc.returncode}: " + " | ".join(tail)[-400:]
    except subprocess.TimeoutExpired:
        failure = f"fresh process killed after {time.perf_counter() - t0:.0f} s (run budget)"
    process_s = time.perf_counter() - t0
    out = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": [], "process": {}}
    rows = [dict(base, **row, process_s=process_s, **out["process"]) for row in out["rows"]]
    if failure:
        rows.append(dict(base, error=failure))
    for row in rows:
        text = row.get("skipped") or row.get("error", "")
        if "first_s" in row:
            text = f"first call {row['first_s']:.2f} s ({row['first_tok_s']:.1f} tok/s)"
        if "tok_s" in row:
            text += f", then {row['tok_s']:.1f} tok/s"
        log(f"  {kind} {name} {impl} B={row.get('B', '?')}: {text}")
    return rows


def worker(spec_path: Path) -> None:
    """The fresh process: build the model, then time first generate() calls (cold) or compiled ones."""
    spec = json.loads(spec_path.read_text())
    started = time.time() - spec["launched_at"]
    # the caches this process must start without: how many entries each held (0 when fresh)
    spec["cache_entries_at_start"] = {name: len(os.listdir(os.environ[name])) if os.path.isdir(os.environ.get(
        name, "")) else None for name in spec["settings"]["fresh_cache_env"]}
    s = argparse.Namespace(**spec["settings"], batch_sizes=None)
    import symphony  # noqa: F401
    import transformers  # noqa: F401

    imported = time.time() - spec["launched_at"]
    mspec = dict(gm.spec_of(spec["model"], s.tiny), name=spec["model"])
    t0 = time.perf_counter()
    model = gm.build_model(mspec, spec["impl"], s.device, getattr(torch, s.dtype), s.seed, spec["max_positions"])
    process = {"started_s": started, "imported_s": imported, "build_s": time.perf_counter() - t0,
               "cache_entries_at_start": spec["cache_entries_at_start"],
               "compile_mode": compile_mode_of_new_processes()}
    rows = []
    cc = gm.compile_config(s.device, s.fullgraph) if spec["kind"] == "compiled" else None
    for B in spec["batch_sizes"]:
        row = {"B": B, "new_tokens": s.new_tokens}
        copy = weight_copy_bytes(spec["impl"], mspec, B, s.prompt_tokens, s.device)
        if copy > spec["batched_mm_max_gb"] * 1e9:
            rows.append(dict(row, skipped=f"would copy {copy / 1e9:.0f} GB of expert weights per layer"))
            continue
        ids = gm.prompt_ids(mspec["vocab"], B, s.prompt_tokens, s.device, seed=B)
        try:
            try:
                row["first_s"] = gm.generate_s(model, ids, s.new_tokens, s.device, cc)
            except Exception as e:  # noqa: BLE001 - fullgraph refused: say why, retry without it
                if cc is None or not cc.fullgraph:
                    raise
                row["fullgraph_error"] = error_text(e)
                torch._dynamo.reset()
                model.__dict__.pop("_compiled_call", None)
                cc = gm.compile_config(s.device, False)
                row["first_s"] = gm.generate_s(model, ids, s.new_tokens, s.device, cc)
            row["first_tok_s"] = B * s.new_tokens / row["first_s"]
            if cc is not None:
                row.update(fullgraph=cc.fullgraph, compiled="_compiled_call" in model.__dict__)
                with blocking_compiles():  # the uncompiled prefill's kernels too, before timing
                    row.update(timed_tokens(model, ids, s, s.cell_budget_s, cc))
        except Exception as e:  # noqa: BLE001
            row["error"] = error_text(e)
        rows.append(row)
        write_json(Path(spec["out"]), {"rows": rows, "process": process})  # kept if a later B is killed


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cpu":  # the Triton kernels through the interpreter (read when triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.worker:
        return worker(args.worker)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = report.merge([json.loads((d / "bench_generate.json").read_text()) for d in args.merge])
        results["command"] = header("cpu", argv)["command"]
        return report.finish(results, args.out)
    budget = Budget(args.budget_s)
    results = dict(header(args.device, argv), settings=settings(args), models={}, check=[], warm=[], prefill=[],
                   cold=[], compiled=[])
    out_json = args.out / "bench_generate.json"
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_root:
        for name in args.models:
            gm.spec_of(name, args.tiny)  # unknown names fail before any work
        for i, name in enumerate(args.models):
            slot = Budget(budget.left() / (len(args.models) - i))  # this model's share of what is left
            fresh = sum(FRESH_S["cold"] for _ in args.cold_impls) + sum(FRESH_S["compiled"] for _ in args.compile_impls)
            with blocking_compiles():  # time the kernels, not the stand-in that serves calls while they compile
                run_in_process(name, args, slot, results, reserve=min(0.6 * slot.seconds, fresh))
            write_json(out_json, results)
            for impl in args.cold_impls:
                results["cold"] += run_fresh("cold", name, impl, args, slot, tmp_root)
            write_json(out_json, results)
            for impl in args.compile_impls:
                results["compiled"] += run_fresh("compiled", name, impl, args, slot, tmp_root)
            write_json(out_json, results)
    results["seconds"] = budget.elapsed()
    return report.finish(results, args.out)


if __name__ == "__main__":
    main()
