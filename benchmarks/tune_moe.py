"""Sweep launch configurations of the experts kernels on the GPU and print the best per kernel and shape.

    python benchmarks/tune_moe.py --out DIR [--phase fwd|bwd|all] [--jobs N]

Each candidate configuration is forced through `symphony_kernels._configs.OVERRIDE` and timed on its own
(the forward GEMMs through `_experts_launch.up_gemm` / `_experts_launch.down_gemm`; the backward kernels through
`_experts_launch.experts_backward` with one gradient asked at a time, minus the shared d(inter) GEMM). Compilation
runs first in N worker processes (filling Triton's cache), then one process times everything.
Writes DIR/tune_<phase>.json and prints, last, the best configuration per (kernel, shape class, N, K): the
points that `_configs.rule`'s size thresholds are fitted to.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_moe import SHAPES  # noqa: E402
from symphony_kernels._configs import Config, rule, shape_class  # noqa: E402
FWD_CASES = [("mixtral-8x7b", 1), ("mixtral-8x7b", 64), ("mixtral-8x7b", 512), ("mixtral-8x7b", 4096),
             ("mixtral-8x7b", 16384), ("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 8), ("qwen3-30b-a3b", 512),
             ("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 16384), ("qwen2-0.5b-x4", 1), ("qwen2-0.5b-x4", 64),
             ("qwen2-0.5b-x4", 4096), ("qwen2-0.5b-x4", 16384), ("qwen2-1.5b-x4", 1), ("qwen2-1.5b-x4", 512)]
BWD_CASES = [("mixtral-8x7b", 4096), ("qwen2-1.5b-x4", 4096), ("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 32768),
             ("qwen2-0.5b-x4", 4096)]

C = Config
CANDIDATES = {
    ("up", "decode"): [C(16, 32, 128, 1, 4, 4), C(16, 64, 128, 1, 4, 4), C(16, 64, 256, 1, 4, 3),
                       C(16, 128, 128, 1, 4, 3), C(16, 64, 64, 1, 4, 5), C(16, 32, 256, 1, 4, 4)],
    ("down", "decode"): [C(16, 32, 128, 1, 4, 4), C(16, 64, 128, 1, 4, 4), C(16, 64, 256, 1, 4, 3),
                         C(16, 128, 128, 1, 4, 3), C(16, 64, 64, 1, 4, 5), C(16, 128, 64, 1, 4, 4)],
    ("up", "small"): [C(64, 64, 64, 8, 4, 4), C(64, 128, 64, 8, 4, 3), C(32, 64, 128, 8, 4, 4),
                      C(64, 64, 128, 8, 4, 3), C(128, 64, 64, 8, 8, 4), C(16, 64, 128, 8, 4, 4),
                      C(128, 128, 64, 8, 8, 3)],
    ("down", "small"): [C(64, 128, 64, 8, 4, 4), C(64, 64, 128, 8, 4, 4), C(32, 128, 128, 8, 4, 3),
                        C(128, 128, 64, 8, 8, 3), C(64, 256, 64, 8, 8, 3), C(16, 128, 128, 8, 4, 4),
                        C(128, 256, 64, 8, 8, 3)],
    ("up", "large"): [C(128, 64, 64, 8, 8, 4), C(128, 128, 64, 8, 8, 3), C(128, 128, 32, 8, 8, 4),
                      C(64, 128, 64, 8, 4, 4), C(256, 64, 64, 8, 8, 3), C(128, 64, 64, 8, 4, 4)],
    ("down", "large"): [C(128, 128, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 4),
                        C(64, 128, 64, 8, 4, 4), C(256, 128, 64, 8, 8, 3), C(128, 128, 32, 8, 4, 4),
                        C(128, 256, 32, 8, 8, 4)],
}
BWD_CANDIDATES = {  # "dinter" is a plain gathered GEMM since issue 11 (+ the activation-backward pass)
    "dinter": [C(128, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 4),
               C(128, 256, 32, 8, 8, 4), C(256, 128, 64, 8, 8, 3), C(64, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 4, 4)],
    "dx": [C(128, 128, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 4),
           C(128, 128, 32, 8, 4, 4), C(256, 128, 64, 8, 8, 3), C(128, 256, 32, 8, 8, 4), C(128, 128, 64, 8, 8, 4)],
    "wgrad": [C(128, 128, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 4),
              C(256, 128, 64, 8, 8, 3), C(128, 256, 32, 8, 8, 4), C(128, 128, 32, 8, 4, 4), C(64, 128, 64, 8, 4, 4)],
}


def problem(name, T, grad=False):
    d, f, E, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
    gu = torch.randn(E, 2 * f, d, device="cuda", dtype=torch.bfloat16, generator=g) / d ** 0.5
    dn = torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16, generator=g) / f ** 0.5
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).contiguous()
    ids = ids.int().contiguous()
    from symphony_kernels.routing import dispatch

    _, offsets, sorted_pairs = dispatch(ids, E)
    return x, gu, dn, w, ids, offsets, sorted_pairs


def fwd_calls(name, T):
    from symphony_kernels import _experts_launch as X

    x, gu, dn, w, ids, off, srt = problem(name, T)
    d, f, E, k = SHAPES[name]
    S = T * k
    inter, _ = X.up_gemm(x, gu, w, ids, off, srt, "silu", False)
    return {
        "up": lambda: X.up_gemm(x, gu, w, ids, off, srt, "silu", False),
        "down": lambda: X.down_gemm(inter, dn, w, ids, off, srt, S, E, d, f),
    }


def bwd_calls(name, T):
    from symphony_kernels import _experts_launch as X

    x, gu, dn, w, ids, off, srt = problem(name, T)
    out, g_u = X.experts_forward(x, gu, dn, w, ids, off, srt, "silu", True)
    grad = torch.randn_like(out)

    def b(*need):
        return lambda: X.experts_backward(grad, x, gu, dn, w, ids, off, srt, g_u, "silu", *need)
    return {"dinter": b(False, False, False, True), "dx": b(True, False, False, False),
            "wgrad": b(False, False, True, False), "wgrad_gate_up": b(False, True, False, False)}


def cases(phase, fwd_cases=None):
    out = []
    if phase in ("fwd", "all"):
        for name, T in fwd_cases or FWD_CASES:
            d, f, E, k = SHAPES[name]
            cls = shape_class(T * k, E)
            n = max(len(CANDIDATES[("up", cls)]), len(CANDIDATES[("down", cls)]))
            out += [("fwd", name, T, i) for i in range(n)]
    if phase in ("bwd", "all"):
        n = max(len(v) for v in BWD_CANDIDATES.values())
        out += [("bwd", name, T, i) for name, T in BWD_CASES for i in range(n)]
    return out


def configs_for(kind, name, T, i):
    d, f, E, k = SHAPES[name]
    cls = shape_class(T * k, E)
    if kind == "fwd":
        cands = {kern: CANDIDATES[(kern, cls)] for kern in ("up", "down")}
    else:
        cands = BWD_CANDIDATES
    return {kern: c[i] for kern, c in cands.items() if i < len(c)}


def run_case(kind, name, T, i, time_it, kernels=None):
    from triton.testing import do_bench

    from symphony_kernels import _configs

    cfgs = {k: v for k, v in configs_for(kind, name, T, i).items() if not kernels or k in kernels}
    calls = fwd_calls(name, T) if kind == "fwd" else bwd_calls(name, T)
    res = {}
    timed = list(cfgs) + (["wgrad_gate_up"] if "wgrad" in cfgs else [])
    _configs.OVERRIDE.clear()
    _configs.OVERRIDE.update(cfgs)
    for kern in timed:
        try:
            calls[kern]()
            torch.cuda.synchronize()
            if time_it:
                res[kern] = float(do_bench(calls[kern], warmup=5, rep=25, return_mode="median"))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a config
            res[kern + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    if kind == "bwd" and time_it and "dinter" in res:
        base = res["dinter"]  # asking for dX (or d gate_up) alone also runs the d(inter) GEMM: subtract it
        for kern in ("dx", "wgrad_gate_up"):
            if kern in res:
                res[kern] = max(res[kern] - base, 1e-6)
    _configs.OVERRIDE.clear()
    return {"kind": kind, "shape": name, "T": T, "i": i, "configs": {k: list(v) for k, v in cfgs.items()}, **res}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phase", default="all", choices=("fwd", "bwd", "all"))
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--kernels", nargs="*", help="only these kernels (up, down, dinter, dx, wgrad)")
    ap.add_argument("--cases", nargs="*", help="forward cases as NAME:T (default: the built-in list)")
    ap.add_argument("--shard", default=None, help="internal: i/n, compile only")
    args = ap.parse_args(argv)
    fwd_cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases] if args.cases else None
    todo = cases(args.phase, fwd_cases)
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        for case in todo[i::n]:
            run_case(*case, time_it=False, kernels=args.kernels)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    extra = (["--kernels", *args.kernels] if args.kernels else []) + (["--cases", *args.cases] if args.cases else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--phase", args.phase,
                               "--shard", f"{j}/{args.jobs}", *extra], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
             for j in range(args.jobs)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            print("compile worker failed:", err.decode()[-800:], flush=True)
    print(f"compiled in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for case in todo:
        rows.append(run_case(*case, time_it=True, kernels=args.kernels))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / f"tune_{args.phase}.json").write_text(json.dumps(rows, indent=1))
    print(f"swept in {time.time() - t0:.0f} s", flush=True)
    # best config per (kernel, shape, T), then per (kernel, class, N, K) by summed relative time
    best = {}
    for r in rows:
        for kern, cfg in r["configs"].items():
            for timed in (kern, kern + "_gate_up"):
                if timed in r:
                    best.setdefault((timed, r["shape"], r["T"]), []).append((r[timed], tuple(cfg)))
    per_key = {}
    for (kern, name, T), lst in sorted(best.items()):
        lst.sort()
        d, f, E, k = SHAPES[name]
        cls = shape_class(T * k, E)
        N, K = {"up": (f, d), "down": (d, f), "dinter": (f, d), "dx": (d, 2 * f), "wgrad": (f, d),
                "wgrad_gate_up": (d, 2 * f)}[kern]
        print(f"{kern:7s} {name:15s} T={T:6d} best {lst[0][1]} {lst[0][0]:.4f} ms; worst {lst[-1][0]:.4f} ms")
        key = (kern.replace("_gate_up", ""), cls, N, K)
        for ms, cfg in lst:
            per_key.setdefault(key, {}).setdefault(cfg, 0.0)
            per_key[key][cfg] += ms / lst[0][0]
    print("\nbest per (kernel, class, N, K), against _configs.rule:")
    for key, scores in per_key.items():
        cfg = min(scores, key=scores.get)
        print(f"    {key!r}: Config{cfg[:6]!r}  (rule: {tuple(rule(*key))[:6]})")


if __name__ == "__main__":
    main()
