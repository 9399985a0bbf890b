"""Benchmark of the MoE kernels against transformers' experts implementations and the roofline floor.

    python benchmarks/bench_moe.py --out DIR [--quick] [--shapes NAME|d,f,E,k ...] [--tokens T ...]
                                   [--skip-routing] [--skip-fwd-bwd]

In one run, on one CUDA device, bf16:
1. the two ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 8192^3 matmul rate;
2. experts forward, per shape (d, f, E, k) and token count T, on identical weights and routing:
   transformers' `eager`, `batched_mm` (skipped where its per-pair weight copy would exceed 8 GB) and
   `grouped_mm` implementations (the functions in transformers.integrations.moe, called through a real
   `Qwen3MoeExperts` module), ours launched eagerly and replayed from a CUDA graph, and the floor
   max(bytes / copy bandwidth, 6*T*k*d*f / matmul rate), bytes = weights of the experts actually touched +
   hidden states in and out;
3. forward + backward at T = 4096 (`--fwd-bwd-tokens`; gradients for hidden, routing weights and both expert
   weights): eager (up to T = 4096), grouped_mm, ours, each with the memory its forward keeps for the backward
   (saved tensors, inputs and weights excluded) and the peak one step adds, gradients included;
4. routing: ours (`symphony_kernels.route`) against the torch chain (softmax in fp32, topk, renormalise,
   stable argsort of the flattened ids, bincount), bf16 logits.
Median milliseconds through triton.testing.do_bench; where one shape's weights fit in L2 several copies are
rotated. Prints the tables last, writes DIR/bench_moe.json and DIR/bench_moe.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "qwen2-0.5b-x4": (896, 4864, 4, 2),
    "qwen2-1.5b-x4": (1536, 8960, 4, 2),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
TOKENS = (1, 8, 64, 512, 4096, 16384)
QUICK_TOKENS = (1, 64, 4096)
ROUTING = [(E, k) for E in (8, 128, 256) for k in (2, 8)]
ROUTING_TOKENS = (64, 4096, 16384, 65536)
BATCHED_MM_MAX_BYTES = 8 << 30
L2_ROTATE_BYTES = 200 << 20


def log(*a):
    print(*a, flush=True)


def bench(fn, quick=False):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median"))


def ceilings(quick):
    n = 1 << 29
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), quick)
    copy_bw = 2 * a.numel() * a.element_size() / (ms * 1e-3)
    del a, b
    A = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: A @ B, quick)
    rate = 2 * 8192 ** 3 / (ms * 1e-3)
    return copy_bw, rate


def floor_ms(shape, T, touched, copy_bw, rate, itemsize=2):
    """The roofline floor of one experts forward in ms: max(bytes / copy bandwidth, flops / matmul rate), bytes =
    the weights of the `touched` experts + hidden states in and out, flops = 6*T*k*d*f."""
    d, f, E, k = shape
    return max((touched * 3 * d * f + 2 * T * d) * itemsize / copy_bw, 6 * T * k * d * f / rate) * 1e3


def hf_module(gate_up, down, impl, k, trainable=False):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, f2, d = gate_up.shape
    cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f2 // 2, num_experts=E, num_experts_per_tok=k,
                         hidden_act="silu")
    cfg._experts_implementation = impl
    with torch.device("meta"):
        m = Qwen3MoeExperts(cfg)
    m.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=trainable)
    m.down_proj = torch.nn.Parameter(down, requires_grad=trainable)
    return m


def routing_for(T, E, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(torch.bfloat16), ids


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def rotating(fns):
    state = [0]

    def call():
        state[0] = (state[0] + 1) % len(fns)
        return fns[state[0]]()
    return call


def bench_experts(name, shape, tokens, copy_bw, rate, quick, results):
    import symphony_kernels as sk

    d, f, E, k = shape
    wbytes = 3 * E * d * f * 2
    copies = max(1, math.ceil(L2_ROTATE_BYTES / wbytes))
    g = torch.Generator(device="cuda").manual_seed(1)
    weights = [(torch.randn(E, 2 * f, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5,
                torch.randn(E, d, f, device="cuda", generator=g, dtype=torch.bfloat16) / f ** 0.5)
               for _ in range(copies)]
    for T in tokens:
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
        w, ids = routing_for(T, E, k, seed=T)
        touched = int(torch.unique(ids).numel())
        row = {"shape": name, "dfEk": shape, "T": T, "floor": floor_ms(shape, T, touched, copy_bw, rate),
               "touched": touched}
        with torch.no_grad():
            ref = None
            for impl in ("eager", "batched_mm", "grouped_mm"):
                if impl == "batched_mm" and T * k * 3 * d * f * 2 > BATCHED_MM_MAX_BYTES:
                    continue
                try:
                    mods = [hf_module(gu, dn, impl, k) for gu, dn in weights]
                    out = mods[0](x, ids, w)
                    if impl == "grouped_mm":
                        ref = out.float()
                    row[impl] = bench(rotating([lambda m=m: m(x, ids, w) for m in mods]), quick)
                except Exception as e:  # noqa: BLE001 - record and continue (OOM and the like)
                    row[impl + "_error"] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.empty_cache()
            calls = [lambda gu=gu, dn=dn: sk.moe_experts(x, gu, dn, w, ids) for gu, dn in weights]
            out = calls[0]().float()
            if ref is not None:
                row["rel_err_vs_grouped_mm"] = ((out - ref).norm() / ref.norm()).item()
            row["ours"] = bench(rotating(calls), quick)
            graphs = [graph_of(c) for c in calls]
            row["ours_graph"] = bench(rotating([gr.replay for gr in graphs]), quick)
            del graphs
        hf = [row[i] for i in ("eager", "batched_mm", "grouped_mm") if i in row]
        row["best_hf"] = min(hf) if hf else float("nan")
        results.append(row)
        log(f"  {name} T={T}: " + ", ".join(f"{key}={row[key]:.4g}" for key in
                                            ("eager", "batched_mm", "grouped_mm", "ours", "ours_graph", "floor")
                                            if key in row))
        torch.cuda.empty_cache()


def bench_fwd_bwd(name, shape, T, rate, quick, results):
    import symphony_kernels as sk

    d, f, E, k = shape
    g = torch.Generator(device="cuda").manual_seed(2)
    gu = torch.randn(E, 2 * f, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5
    dn = torch.randn(E, d, f, device="cuda", generator=g, dtype=torch.bfloat16) / f ** 0.5
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w, ids = routing_for(T, E, k, seed=3)
    w.requires_grad_()
    grad = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    row = {"shape": name, "dfEk": shape, "T": T, "flop": 3 * 6 * T * k * d * f}

    def step(fn, params):
        def run():
            for p in params:
                p.grad = None
            fn().backward(grad)
        return run

    def timed(key, run, forward, params):
        row[key] = bench(run, quick)
        # Memory: what the forward keeps for the backward (the saved tensors' storages, inputs and weights
        # excluded), and the peak of one step above what is allocated before it with no gradients held.
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        kept = {}
        known = {t.untyped_storage().data_ptr() for t in params}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in known:
                kept[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        out.backward(grad)
        del out
        torch.cuda.synchronize()
        row[key + "_saved_mb"] = sum(kept.values()) / 2 ** 20
        row[key + "_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    for impl in ("eager", "grouped_mm"):
        if impl == "eager" and T > 4096:
            continue  # a Python loop over experts: minutes of timing at this size, and no contender
        try:
            m = hf_module(gu, dn, impl, k, trainable=True)
            params = [x, w, m.gate_up_proj, m.down_proj]
            timed(impl, step(lambda: m(x, ids, w), params), lambda: m(x, ids, w), params)
        except Exception as e:  # noqa: BLE001
            row[impl + "_error"] = f"{type(e).__name__}: {e}"[:200]
        torch.cuda.empty_cache()
    gup = torch.nn.Parameter(gu)
    dnp = torch.nn.Parameter(dn)
    params = [x, w, gup, dnp]
    timed("ours", step(lambda: sk.moe_experts(x, gup, dnp, w, ids), params),
          lambda: sk.moe_experts(x, gup, dnp, w, ids), params)
    for key in ("eager", "grouped_mm", "ours"):
        if key in row:
            row[key + "_tflops"] = row["flop"] / (row[key] * 1e-3) / 1e12
    row["peak_fraction_ours"] = row["flop"] / (row["ours"] * 1e-3) / rate
    results.append(row)
    log(f"  fwd+bwd {name} T={T}: " + ", ".join(
        f"{key}={row[key]:.4g} ms (saved {row[key + '_saved_mb']:.0f} MB, "
        f"step peak {row[key + '_peak_extra_mb']:.0f} MB)"
        for key in ("eager", "grouped_mm", "ours") if key in row))
    torch.cuda.empty_cache()


def torch_route(logits, k):
    E = logits.shape[1]
    s = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(s, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    order = torch.argsort(ids.view(-1), stable=True)
    counts = torch.bincount(ids.view(-1), minlength=E)
    return w, ids, order, counts


def bench_routing(quick, results, tokens):
    import symphony_kernels as sk
    from symphony_kernels.reference import dispatch_reference, route_reference

    for E, k in ROUTING:
        for T in tokens:
            logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
            plan = sk.route(logits, k)
            _, ref_ids = route_reference(logits, k)  # ties (common in bf16) go to the lower id, as ours
            same = bool(torch.equal(plan.topk_ids, ref_ids)
                        and torch.equal(plan.sorted_pairs, dispatch_reference(ref_ids, E)[2]))
            row = {"E": E, "k": k, "T": T, "ids_and_order_equal": same,
                   "torch": bench(lambda: torch_route(logits, k), quick),
                   "ours": bench(lambda: sk.route(logits, k), quick)}
            gr = graph_of(lambda: sk.route(logits, k))
            row["ours_graph"] = bench(gr.replay, quick)
            row["speedup"] = row["torch"] / row["ours"]
            results.append(row)
            log(f"  route E={E} k={k} T={T}: torch={row['torch']:.4f} ours={row['ours']:.4f} "
                f"graph={row['ours_graph']:.4f} equal={same}")


def profile_eager(out_txt):
    """Host time of eager calls (no sync) against their device time, and a cProfile of them."""
    import cProfile
    import io
    import pstats

    import symphony_kernels as sk

    d, f, E, k = SHAPES["qwen2-0.5b-x4"]
    gu = torch.randn(E, 2 * f, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
    dn = torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16) / f ** 0.5
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    w, ids = routing_for(1, E, k)
    logits = torch.randn(4096, 8, device="cuda", dtype=torch.bfloat16)
    lines = []
    for name, fn in (("moe_experts qwen2-0.5b T=1", lambda: sk.moe_experts(x, gu, dn, w, ids)),
                     ("route E=8 k=2 T=4096", lambda: sk.route(logits, 2)),
                     ("torch routing chain E=8 k=2 T=4096", lambda: torch_route(logits, 2))):
        with torch.no_grad():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            n = 300
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t0) / n
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                fn()
            prof.disable()
            torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        lines.append(f"== {name}: host time per eager call {host * 1e6:.1f} us\n{buf.getvalue()}")
        log(f"  host time per eager call, {name}: {host * 1e6:.1f} us")
    Path(out_txt).write_text("\n".join(lines))


def plot(results, out_png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in results["experts"]))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        rows = [r for r in results["experts"] if r["shape"] == name]
        for key, style in (("eager", "s--"), ("batched_mm", "^--"), ("grouped_mm", "v--"), ("ours", "o-"),
                           ("ours_graph", "o-"), ("floor", "k:")):
            pts = [(r["T"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{name} {tuple(rows[0]['dfEk'])}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def table(results):
    lines = []
    c = results["ceilings"]
    lines.append(f"device: {results['device']}; copy {c['copy_TBps']:.3f} TB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} "
                 "TFLOP/s")
    lines.append("")
    lines.append("| shape (d,f,E,k) | T | eager | batched_mm | grouped_mm | ours | ours (graph) | floor | "
                 "best HF / ours | ours / floor | ours (graph) / floor |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "–"  # noqa: E731
    for r in results["experts"]:
        lines.append(f"| {r['shape']} {tuple(r['dfEk'])} | {r['T']} | {fmt(r, 'eager')} | {fmt(r, 'batched_mm')} | "
                     f"{fmt(r, 'grouped_mm')} | {fmt(r, 'ours')} | {fmt(r, 'ours_graph')} | {r['floor']:.3f} | "
                     f"{r['best_hf'] / r['ours']:.2f}x | {r['ours'] / r['floor']:.2f} | "
                     f"{r['ours_graph'] / r['floor']:.2f} |")
    if results["fwd_bwd"]:
        lines.append("")
        lines.append("| fwd+bwd (d,f,E,k) | T | eager ms (TFLOP/s) | grouped_mm ms (TFLOP/s) | ours ms (TFLOP/s) | "
                     "grouped_mm / ours | ours % of peak | saved for backward MB grouped_mm / ours | "
                     "step peak MB grouped_mm / ours |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in results["fwd_bwd"]:
            cell = lambda k: f"{r[k]:.3f} ({r[k + '_tflops']:.0f})" if k in r else "–"  # noqa: E731
            ratio = f"{r['grouped_mm'] / r['ours']:.2f}x" if "grouped_mm" in r else "–"
            mem = lambda suffix: " / ".join(f"{r[k + suffix]:.0f}" if k + suffix in r else "–"  # noqa: E731
                                            for k in ("grouped_mm", "ours"))
            lines.append(f"| {r['shape']} {tuple(r['dfEk'])} | {r['T']} | {cell('eager')} | {cell('grouped_mm')} | "
                         f"{cell('ours')} | {ratio} | {100 * r['peak_fraction_ours']:.0f}% | {mem('_saved_mb')} | "
                         f"{mem('_peak_extra_mb')} |")
    if results["routing"]:
        lines.append("")
        lines.append("| routing E | k | T | torch chain | ours | ours (graph) | torch / ours | plan = reference |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in results["routing"]:
            lines.append(f"| {r['E']} | {r['k']} | {r['T']} | {r['torch']:.4f} | {r['ours']:.4f} | "
                         f"{r['ours_graph']:.4f} | {r['speedup']:.2f}x | {r['ids_and_order_equal']} |")
    return "\n".join(lines)


def parse_shape(s):
    if s in SHAPES:
        return s, SHAPES[s]
    parts = tuple(int(p) for p in s.split(","))
    if len(parts) != 4:
        raise SystemExit(f"--shapes takes names ({', '.join(SHAPES)}) or d,f,E,k; got {s!r}")
    return s, parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer token counts, shorter timing")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int)
    ap.add_argument("--skip-routing", action="store_true")
    ap.add_argument("--skip-fwd-bwd", action="store_true")
    ap.add_argument("--fwd-bwd-tokens", nargs="+", type=int, default=[4096],
                    help="token counts of the forward + backward part (default 4096)")
    ap.add_argument("--skip-experts", action="store_true", help="no forward-only part")
    ap.add_argument("--profile", action="store_true", help="also profile the host side of eager calls")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = tuple(args.tokens or (QUICK_TOKENS if args.quick else TOKENS))
    shapes = [parse_shape(s) for s in args.shapes]
    from benchmarks.run_info import header

    t0 = time.time()
    results = {**header("cuda", sys.argv[1:] if argv is None else argv), "experts": [], "fwd_bwd": [], "routing": []}
    copy_bw, rate = ceilings(args.quick)
    results["ceilings"] = {"copy_TBps": copy_bw / 1e12, "matmul_TFLOPs": rate / 1e12}
    log(f"ceilings: copy {copy_bw / 1e12:.3f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    out_json = args.out / "bench_moe.json"
    for name, shape in shapes if not args.skip_experts else ():
        bench_experts(name, shape, tokens, copy_bw, rate, args.quick, results["experts"])
        out_json.write_text(json.dumps(results, indent=1))
    if not args.skip_fwd_bwd:
        for name, shape in shapes:
            for T in args.fwd_bwd_tokens:
                bench_fwd_bwd(name, shape, T, rate, args.quick, results["fwd_bwd"])
                out_json.write_text(json.dumps(results, indent=1))
    if not args.skip_routing:
        bench_routing(args.quick, results["routing"], (4096, 65536) if args.quick else ROUTING_TOKENS)
    if args.profile:
        profile_eager(args.out / "profile_eager.txt")
    results["seconds"] = time.time() - t0
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bench_moe.png")
    text = table(results)
    (args.out / "bench_moe.md").write_text(text + "\n")
    log("")
    log(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
