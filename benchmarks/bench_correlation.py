"""Benchmark the correlation accumulator and the neuron matching on a CUDA GPU.

    python benchmarks/bench_correlation.py --out DIR [--quick]

1. Ceilings measured in the same run: a bf16 8192^3 matmul, and the bare bf16 X^T Y product (fp32 output) of
   each correlation shape.
2. CorrelationAccumulator.update on [L, T, f] bf16 (and fp32) activations, per backend: TFLOP/s counting
   2*L*T*f_a*f_b, and the fraction of the measured bf16 matmul rate.
3. linear_assignment on correlation-like matrices (a planted partner per neuron with correlation 0.15-0.95 over
   a noise floor and a low-rank common part; values in [-1, 1]) and on uniform random ones: the GPU auction for
   24 layers x 3 sources at n = 4864 and 32 x 3 at n = 11008; scipy timed on one or two layers on the same host
   and extrapolated (said so in the table), with the auction's objective gap to scipy's exact optimum.
Writes DIR/bench_correlation.json (updated after each section); prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from symphony_kernels import _ext  # noqa: E402
from symphony_kernels.correlation import CorrelationAccumulator  # noqa: E402
from symphony_kernels.matching import linear_assignment, matching_objective  # noqa: E402


def cuda_median(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() over reps runs, timed with CUDA events (after warmup runs)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(reps: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_median(lambda: torch.mm(a, b), reps, warmup=3)
    return 2 * 8192 ** 3 / t / 1e12


def bench_correlation(cfgs, peak, reps, results, save):
    for cfg in cfgs:
        L, f, T, dtype, kind = cfg["L"], cfg["f"], cfg["T"], cfg["dtype"], cfg["data"]
        g = torch.Generator(device="cuda").manual_seed(0)
        xa = torch.randn(L, T, f, device="cuda", generator=g)
        xb = 0.6 * xa + 0.8 * torch.randn(L, T, f, device="cuda", generator=g)
        if kind == "offset":  # columns far from zero mean: the shifted path
            xa += 50.0
            xb -= 20.0
        xa, xb = xa.to(dtype), xb.to(dtype)
        flops = 2.0 * L * T * f * f
        row = dict(L=L, f=f, T=T, dtype=str(dtype).replace("torch.", ""), data=kind)
        if dtype != torch.float32:
            gemm = cuda_median(lambda: torch.bmm(xa.transpose(1, 2), xb, out_dtype=torch.float32), reps)
            row["bare_gemm_tflops"] = flops / gemm / 1e12
        for backend in cfg["backends"]:
            acc = CorrelationAccumulator(L, f, f, device="cuda", backend=backend)
            t = cuda_median(lambda: acc.update(xa, xb), reps)
            tflops = flops / t / 1e12
            row[f"{backend}_ms"] = t * 1e3
            row[f"{backend}_tflops"] = tflops
            row[f"{backend}_of_peak"] = tflops / peak
            del acc
            torch.cuda.empty_cache()
        results["correlation"].append(row)
        save()
        del xa, xb
        torch.cuda.empty_cache()


def corr_like(L: int, n: int, seed: int) -> torch.Tensor:
    """[L, n, n] float32 on the GPU, shaped like a neuron correlation matrix of two related models."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = torch.randn(L, n, n, device="cuda", generator=g).mul_(0.08)
    u = torch.randn(L, n, 4, device="cuda", generator=g) / 2
    v = torch.randn(L, 4, n, device="cuda", generator=g) / 2
    s.baddbmm_(u, v, alpha=0.1)
    perm = torch.argsort(torch.rand(L, n, device="cuda", generator=g), dim=1)
    strength = 0.15 + 0.8 * torch.rand(L, n, device="cuda", generator=g)
    s.scatter_(2, perm[:, :, None], strength[:, :, None])
    return s.clamp_(-1.0, 1.0)


def uniform(L: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(L, n, n, device="cuda", generator=g)


def bench_matching(cfgs, results, save):
    from scipy.optimize import linear_sum_assignment

    for cfg in cfgs:
        L, n, sources, kind, scipy_layers = cfg["L"], cfg["n"], cfg["sources"], cfg["kind"], cfg["scipy_layers"]
        make = corr_like if kind == "correlation-like" else uniform
        total, gaps, warn_count = 0.0, [], 0
        scipy_s = []
        for src in range(sources):
            s = make(L, n, 1000 * n + src)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                perm = linear_assignment(s, solver="auction")
            torch.cuda.synchronize()
            total += time.perf_counter() - t0
            warn_count += len(caught)
            ok = bool((torch.sort(perm, dim=1).values == torch.arange(n, device="cuda")).all())
            assert ok, "not a permutation"
            if src == 0:
                for layer in range(scipy_layers):
                    host = s[layer].double().cpu().numpy()
                    t1 = time.perf_counter()
                    rows, cols = linear_sum_assignment(host, maximize=True)
                    scipy_s.append(time.perf_counter() - t1)
                    exact = float(host[rows, cols].sum())
                    got = float(matching_objective(s[layer], perm[layer]))
                    gaps.append((exact - got) / abs(exact))
            del s, perm
            torch.cuda.empty_cache()
        per_layer = sum(scipy_s) / len(scipy_s) if scipy_s else None
        results["matching"].append(dict(
            kind=kind, L=L, n=n, sources=sources, auction_total_s=total, auction_warnings=warn_count,
            scipy_layers_timed=len(scipy_s), scipy_per_layer_s=per_layer,
            scipy_total_s_extrapolated=None if per_layer is None else per_layer * L * sources,
            max_rel_gap_vs_scipy=max(gaps) if gaps else None))
        save()


def table(results) -> str:
    peak = results["bf16_matmul_tflops"]
    lines = [f"device: {results['device']}; torch {results['torch']}; extension: {results['extension']}",
             f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s (the peak below)", "",
             "correlation update (TFLOP/s = 2 L T f^2 / time; % of the bf16 matmul peak)",
             "| L | f | T | dtype | data | bare X^T Y GEMM | cuda backend | torch backend |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["correlation"]:
        def cell(b):
            if f"{b}_ms" not in r:
                return "-"
            return f"{r[f'{b}_ms']:.2f} ms, {r[f'{b}_tflops']:.0f} TF/s ({100 * r[f'{b}_of_peak']:.0f}%)"
        bare = f"{r['bare_gemm_tflops']:.0f} TF/s" if "bare_gemm_tflops" in r else "-"
        lines.append(f"| {r['L']} | {r['f']} | {r['T']} | {r['dtype']} | {r['data']} | {bare} | {cell('cuda')} | "
                     f"{cell('torch')} |")
    lines += ["", "matching (GPU auction, all layers of a source in one call; scipy: per layer on this host's CPU, "
              "extrapolated to all layers and sources)",
              "| scores | layers x sources | n | auction total | scipy per layer (layers timed) | scipy total "
              "(extrapolated) | max rel. gap to exact |", "|---|---|---|---|---|---|---|"]
    for r in results["matching"]:
        sp = "-" if r["scipy_per_layer_s"] is None else f"{r['scipy_per_layer_s']:.1f} s ({r['scipy_layers_timed']})"
        st = "-" if r["scipy_total_s_extrapolated"] is None else f"{r['scipy_total_s_extrapolated']:.0f} s"
        gap = "-" if r["max_rel_gap_vs_scipy"] is None else f"{r['max_rel_gap_vs_scipy']:.1e}"
        lines.append(f"| {r['kind']} | {r['L']} x {r['sources']} | {r['n']} | {r['auction_total_s']:.2f} s"
                     f"{' (warnings: %d)' % r['auction_warnings'] if r['auction_warnings'] else ''} | {sp} | {st} | "
                     f"{gap} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for bench_correlation.json")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: correlation,matching")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = _ext.info()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   extension=f"{info['origin']} (cuda={info['cuda']})" if info["available"] else
                   f"unavailable: {info['reason']}", command=" ".join(sys.argv), correlation=[], matching=[])
    path = out / "bench_correlation.json"

    def save():
        path.write_text(json.dumps(results, indent=1))

    reps = 3 if args.quick else 5
    results["bf16_matmul_tflops"] = matmul_peak(reps * 2)
    save()
    skip = set(filter(None, args.skip.split(",")))
    backends = ["cuda", "torch"] if info["cuda"] else ["torch"]
    if "correlation" not in skip:
        L = 2 if args.quick else 4
        cfgs = [dict(L=L, f=4096, T=65536, dtype=torch.bfloat16, data="zero-mean", backends=backends),
                dict(L=L, f=4096, T=65536, dtype=torch.bfloat16, data="offset", backends=backends[:1])]
        if not args.quick:
            cfgs += [dict(L=2, f=4864, T=65536, dtype=torch.bfloat16, data="zero-mean", backends=backends[:1]),
                     dict(L=2, f=4096, T=65536, dtype=torch.float32, data="zero-mean", backends=backends[:1]),
                     # pipeline-like: all 24 layers of a 0.5B model, small calibration batches
                     dict(L=24, f=4864, T=16384, dtype=torch.bfloat16, data="zero-mean", backends=backends[:1]),
                     dict(L=24, f=4864, T=4096, dtype=torch.bfloat16, data="zero-mean", backends=backends[:1])]
        bench_correlation(cfgs, results["bf16_matmul_tflops"], reps, results, save)
    if "matching" not in skip:
        if args.quick:
            cfgs = [dict(kind="correlation-like", L=8, n=4864, sources=1, scipy_layers=1)]
        else:
            cfgs = [dict(kind="correlation-like", L=24, n=4864, sources=3, scipy_layers=2),
                    dict(kind="uniform", L=24, n=4864, sources=1, scipy_layers=1),
                    dict(kind="correlation-like", L=32, n=11008, sources=3,
                         scipy_layers=int(os.environ.get("BENCH_SCIPY_11008_LAYERS", "1")))]
        bench_matching(cfgs, results, save)
    text = table(results)
    (out / "bench_correlation.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
