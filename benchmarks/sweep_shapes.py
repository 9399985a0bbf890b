"""The experts forward on random shapes: `symphony_kernels.moe_experts` against transformers' grouped_mm.

    python benchmarks/sweep_shapes.py --out DIR [--seed S] [--shapes N] [--tokens T ...] [--quick]
    python benchmarks/sweep_shapes.py --device cpu --tiny --out DIR     # the same logic at test sizes on CPU

Shapes (d, f, E, k) are drawn from --seed: d and f multiples of 8, log-uniform in 256..8192, E log-uniform in
2..512, k uniform in 1..min(10, E), redrawn while the bf16 expert weights (E * 3 * d * f * 2 bytes) exceed
--max-weight-gb; every second shape has d and f multiples of 16, the others have d, f or both an odd multiple of
8 (Triton specialises on 16-divisible sizes; these lose that). Each shape runs at every T of --tokens, on
identical weights (bf16, seeded) and routing (softmax top-k of seeded logits, renormalised, bf16 weights:
what a Qwen3-MoE block hands its experts), precomputed once per cell and the same for both sides:
- ours: `symphony_kernels.moe_experts(x, gate_up_proj, down_proj, topk_weights, topk_ids)`, ids as int32;
- peer: a real `Qwen3MoeExperts` module with experts_implementation "grouped_mm", called as the model calls it
  (transformers.integrations.moe's grouped_mm_experts_forward). Where grouped_mm raises, that is recorded and
  the peer is batched_mm (when its per-pair weight copy stays under 8 GB) or else eager, named in the cell.
The first call of each side in each cell is timed on its own (synchronised wall time: it includes Triton's
compilation of whatever that shape and T need, from an empty TRITON_CACHE_DIR unless --keep-caches; the kernels
compile in the caller here, not in symphony_kernels' default background mode, whose stand-in would be timed
instead); then the median ms through triton.testing.do_bench (time.perf_counter on CPU). ratio = peer ms /
ours ms (> 1: ours faster). The outputs are compared (relative difference, float32 norms) in every cell.
A run stops starting new shapes when --budget-s is spent. Writes DIR/sweep_shapes.json (after every shape),
DIR/sweep_shapes.png (ratio against T, coloured by alignment) and DIR/sweep_shapes.md; prints the summary last.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_info import (FRESH_CACHE_ENV, Budget, base_parser, blocking_compiles, header, log,  # noqa: E402
                                 median_ms, pyplot, wall, write_json)

TOKENS = (1, 37, 300, 5000, 16384)
PROFILES = {
    "default": dict(shapes=30, tokens=TOKENS, lo=256, hi=8192, e_max=512, k_max=10, budget_s=270.0),
    "quick": dict(shapes=10, tokens=(1, 300, 16384), lo=256, hi=8192, e_max=512, k_max=10, budget_s=80.0),
    "tiny": dict(shapes=4, tokens=(1, 7, 37), lo=16, hi=64, e_max=8, k_max=3, budget_s=600.0),
}
BATCHED_MM_MAX_BYTES = 8 << 30
BELOW = 0.9  # cells slower than this fraction of the peer are counted
LARGE_T = 4096


def parse_args(argv):
    ap = base_parser(__doc__, "test sizes (d, f in 16..64, E <= 8; float32 on CPU)",
                     "~1 minute: 10 shapes at T = 1, 300, 16384")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", type=int, help="number of random shapes")
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--max-weight-gb", type=float, default=6.0)
    ap.add_argument("--budget-s", type=float, help="stop starting new shapes after this many seconds")
    ap.add_argument("--keep-caches", action="store_true",
                    help="keep the compile caches (default: empty ones, so that first calls include compilation)")
    ap.add_argument("--fresh-cache-env", nargs="*", default=list(FRESH_CACHE_ENV),
                    help="environment variables pointed at new empty folders for this run")
    args = ap.parse_args(argv)
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "default"]
    args.shapes = args.shapes or profile["shapes"]
    args.tokens = tuple(args.tokens or profile["tokens"])
    args.budget_s = args.budget_s or profile["budget_s"]
    args.draw = {k: profile[k] for k in ("lo", "hi", "e_max", "k_max")}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sweep_shapes.py: no CUDA device (use --device cpu --tiny for the CPU check)")
    return args


def _log_uniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _multiple(x, of, lo, hi, odd=False):
    """A multiple of `of` near x within [lo, hi]; with odd, an odd multiple of `of` (x = of * (2m + 1))."""
    m = max(lo // of, min(hi // of, round(x / of)))
    if odd and m % 2 == 0:
        m = m + 1 if (m + 1) * of <= hi else m - 1
    return m * of


def draw_shapes(n, seed, lo=256, hi=8192, e_max=512, k_max=10, max_bytes=6e9):
    """n shapes (d, f, E, k), the same for the same arguments; every second one with d and f multiples of 16,
    the others with d, f or both an odd multiple of 8; bf16 expert weights under max_bytes."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < n:
        x, y = _log_uniform(rng, lo, hi), _log_uniform(rng, lo, hi)
        if len(shapes) % 2 == 0:
            d, f = _multiple(x, 16, lo, hi), _multiple(y, 16, lo, hi)
        else:
            odd = rng.choice(("d", "f", "both"))
            d, f = _multiple(x, 8, lo, hi, odd=odd != "f"), _multiple(y, 8, lo, hi, odd=odd != "d")
        E = max(2, min(e_max, round(_log_uniform(rng, 2, e_max))))
        k = rng.randint(1, min(k_max, E))
        if E * 3 * d * f * 2 <= max_bytes:
            shapes.append((d, f, E, k))
    return shapes


def routing(T, E, k, device, seed):
    """(topk_weights bf16-or-float32 [T, k], topk_ids int64 [T, k]) of softmax top-k over seeded logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(device)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def peer_candidates(T, d, f, k):
    return ["grouped_mm"] + (["batched_mm"] if T * k * 3 * d * f * 2 <= BATCHED_MM_MAX_BYTES else ["eager"])


def run_cell(shape, T, gate_up, down, args, dtype, quick) -> dict:
    import symphony_kernels as sk
    from benchmarks.bench_moe import hf_module

    d, f, E, k = shape
    w, ids = routing(T, E, k, args.device, seed=T * 1000 + E)
    w = w.to(dtype)
    x = torch.randn(T, d, generator=torch.Generator(args.device).manual_seed(T), device=args.device, dtype=dtype)
    ids32 = ids.to(torch.int32)
    row = {"d": d, "f": f, "E": E, "k": k, "T": T, "d16": d % 16 == 0, "f16": f % 16 == 0}
    row["aligned16"] = row["d16"] and row["f16"]
    with torch.no_grad():
        ours = lambda: sk.moe_experts(x, gate_up, down, w, ids32)  # noqa: E731
        seconds, out = wall(ours, args.device)
        row["first_ms_ours"] = 1e3 * seconds
        for impl in peer_candidates(T, d, f, k):
            try:
                module = hf_module(gate_up, down, impl, k)
                peer = lambda m=module: m(x, ids, w)  # noqa: E731
                seconds, ref = wall(peer, args.device)
            except Exception as e:  # noqa: BLE001 - a refused shape: record, try the next peer
                row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:200]
                continue
            row.update(peer=impl, first_ms_peer=1e3 * seconds)
            break
        else:
            return row
        ref = ref.float()
        row["rel_err"] = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        row["ours_ms"] = median_ms(ours, args.device, quick)
        row["peer_ms"] = median_ms(peer, args.device, quick)
    row["ratio"] = row["peer_ms"] / row["ours_ms"]
    return row


def summary(cells) -> dict:
    done = [c for c in cells if "ratio" in c]
    if not done:
        return {"cells": 0, "failed": len(cells)}
    below = [c for c in done if c["ratio"] < BELOW]
    large = [c["ratio"] for c in done if c["T"] >= LARGE_T]
    out = {"cells": len(done), "failed": len(cells) - len(done), f"below_{BELOW}x": len(below),
           "median_ratio": statistics.median(c["ratio"] for c in done),
           f"median_ratio_T_ge_{LARGE_T}": statistics.median(large) if large else None,
           "worst": sorted(done, key=lambda c: c["ratio"])[:8],
           "peers": {p: sum(c["peer"] == p for c in done) for p in sorted({c["peer"] for c in done})},
           "max_rel_err": max(c["rel_err"] for c in done),
           "first_calls_s_ours": sum(c["first_ms_ours"] for c in done) / 1e3,
           "first_calls_s_peer": sum(c["first_ms_peer"] for c in done) / 1e3,
           # a first call's excess over the median: compilation (and first-touch) cost
           "compile_s_ours": sum(max(0.0, c["first_ms_ours"] - c["ours_ms"]) for c in done) / 1e3,
           "compile_s_peer": sum(max(0.0, c["first_ms_peer"] - c["peer_ms"]) for c in done) / 1e3}
    for name, pick in (("aligned16", True), ("not_aligned16", False)):
        r = [c["ratio"] for c in done if c["aligned16"] == pick]
        out[f"median_ratio_{name}"] = statistics.median(r) if r else None
        out[f"cells_{name}"] = len(r)
    return out


def _shape(c):
    return f"({c['d']}, {c['f']}, {c['E']}, {c['k']})"


def table(results) -> str:
    s = results["summary"]
    lines = [f"device: {results['device']}; torch {results['torch']}, triton {results['triton']}, transformers "
             f"{results['transformers']}", f"command: `{results['command']}`", ""]
    if s["failed"]:
        lines.append(f"- {s['failed']} cells without a ratio (ours or every peer raised: the error is in the table)")
    if s["cells"]:
        lt = s[f"median_ratio_T_ge_{LARGE_T}"]
        lines += [f"- {s['cells']} cells ({len(results['shapes'])} shapes (d, f, E, k) x T in "
                  f"{', '.join(map(str, results['settings']['tokens']))}); ratio = peer ms / ours ms, > 1: ours faster",
                  f"- below {BELOW}x: {s[f'below_{BELOW}x']} cells; median ratio {_fmt(s['median_ratio'])}, at T >= "
                  f"{LARGE_T}: {_fmt(lt)}",
                  "- median ratio, d and f multiples of 16: " + _fmt(s["median_ratio_aligned16"])
                  + f" ({s['cells_aligned16']} cells); otherwise: " + _fmt(s["median_ratio_not_aligned16"])
                  + f" ({s['cells_not_aligned16']} cells)",
                  "- peers: " + ", ".join(f"{p} {n} cells" for p, n in s["peers"].items())
                  + f"; largest relative difference of the outputs {s['max_rel_err']:.2e}",
                  f"- first calls (compilation included): ours {s['first_calls_s_ours']:.1f} s in all, "
                  f"{s['compile_s_ours']:.1f} s over the warm times; peer {s['first_calls_s_peer']:.1f} s, "
                  f"{s['compile_s_peer']:.1f} s over", "", "Worst cells:", ""]
        lines += _rows(s["worst"])
    lines += ["", "All cells:", ""] + _rows(results["cells"])
    if results.get("skipped_shapes"):
        lines += ["", f"Not run (budget spent): {', '.join(map(str, results['skipped_shapes']))}"]
    if "seconds" in results:
        lines += ["", f"{results['seconds']:.0f} s of wall time."]
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3g}x" if v is not None else "–"


def _rows(cells):
    out = ["| shape (d, f, E, k) | d, f divisible by | T | ours ms | peer | peer ms | ratio | "
           "first call ours / peer ms |",
           "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        align = f"{16 if c['d16'] else 8}, {16 if c['f16'] else 8}"
        if "ratio" not in c:
            errs = "; ".join(v for key, v in c.items() if key.endswith("_error"))
            out.append(f"| {_shape(c)} | {align} | {c['T']} | – | none | – | – | {errs} |")
            continue
        out.append(f"| {_shape(c)} | {align} | {c['T']} | {c['ours_ms']:.3f} | {c['peer']} | {c['peer_ms']:.3f} | "
                   f"{c['ratio']:.3g}x | {c['first_ms_ours']:.0f} / {c['first_ms_peer']:.0f} |")
    return out


def plot(results, out_png):
    plt = pyplot()
    done = [c for c in results["cells"] if "ratio" in c]
    if plt is None or not done:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for aligned, colour, label in ((True, "tab:blue", "d and f multiples of 16"),
                                   (False, "tab:red", "d or f an odd multiple of 8")):
        pts = [(c["T"] * (1 + 0.03 * (n % 7 - 3)), c["ratio"])  # spread the shapes a little along T
               for n, c in enumerate(done) if c["aligned16"] == aligned]
        if pts:
            ax.scatter(*zip(*pts), c=colour, s=18, alpha=0.75, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(BELOW, color="k", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="peer ms / ours ms (> 1: ours faster)",
           title=f"experts forward, {len(results['shapes'])} random shapes ({results['device']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def sweep(args, results, out_json, budget):
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # bf16 is wrong in the CPU interpreter
    for i, shape in enumerate(results["shapes"]):
        spent = budget.elapsed() / i if i else 0.0
        if i and not budget.allows(spent):  # another shape like the average so far would not fit
            results["skipped_shapes"] = results["shapes"][i:]
            break
        d, f, E, k = shape
        g = torch.Generator(args.device).manual_seed(args.seed * 7919 + i)
        gate_up = torch.randn(E, 2 * f, d, generator=g, device=args.device, dtype=dtype).div_(d ** 0.5)
        down = torch.randn(E, d, f, generator=g, device=args.device, dtype=dtype).div_(f ** 0.5)
        for T in args.tokens:
            try:
                row = run_cell(shape, T, gate_up, down, args, dtype, args.quick)
            except Exception as e:  # noqa: BLE001 - ours failed (or OOM): record it, go on
                row = {"d": d, "f": f, "E": E, "k": k, "T": T, "d16": d % 16 == 0, "f16": f % 16 == 0,
                       "ours_error": f"{type(e).__name__}: {e}"[:200]}
                row["aligned16"] = row["d16"] and row["f16"]
            results["cells"].append(row)
            log(f"  {_shape(row)} T={T}: " + (f"ours {row['ours_ms']:.3f} ms, {row['peer']} {row['peer_ms']:.3f} ms, "
                                               f"{row['ratio']:.2f}x (first call {row['first_ms_ours']:.0f} ms)"
                                               if "ratio" in row else "no ratio: " + str(row)[:200]))
        del gate_up, down
        if args.device == "cuda":
            torch.cuda.empty_cache()
        results["summary"] = summary(results["cells"])
        write_json(out_json, results)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in args.fresh_cache_env + ["TRITON_INTERPRET"]}
    with tempfile.TemporaryDirectory(prefix="sweep-caches-") as tmp:
        try:
            if args.device == "cpu":
                os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported
            if not args.keep_caches:
                for name in args.fresh_cache_env:
                    os.environ[name] = tempfile.mkdtemp(prefix=name.lower() + "-", dir=tmp)
            return run(args, argv)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run(args, argv):
    budget = Budget(args.budget_s)
    shapes = draw_shapes(args.shapes, args.seed, max_bytes=args.max_weight_gb * 1e9, **args.draw)
    results = dict(header(args.device, argv), shapes=shapes, cells=[], summary={"cells": 0, "failed": 0},
                   settings={"seed": args.seed, "tokens": list(args.tokens), "max_weight_gb": args.max_weight_gb,
                             "tiny": args.tiny, "quick": args.quick, "budget_s": args.budget_s,
                             "compile_mode": "blocking",
                             "fresh_caches": [] if args.keep_caches else args.fresh_cache_env, **args.draw})
    out_json = args.out / "sweep_shapes.json"
    with blocking_compiles():  # first calls compile in the caller (timed), later ones run the kernels
        sweep(args, results, out_json, budget)
    results["seconds"] = budget.elapsed()
    write_json(out_json, results)
    plot(results, args.out / "sweep_shapes.png")
    text = table(results)
    (args.out / "sweep_shapes.md").write_text(text + "\n")
    log("")
    log(text)
    return results


if __name__ == "__main__":
    main()
