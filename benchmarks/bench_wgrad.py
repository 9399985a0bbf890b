"""The experts' weight-gradient GEMM three ways, on identical operands: the Triton kernel reading the by-token
operand through the plan inside its row loop, the Triton kernel on a row-ordered copy, and torch._grouped_mm's
2D x 2D form (cuBLAS's grouped GEMM). d(gate_up)[e] = d(gate_up rows)^T x[token rows] per expert, bf16.

    python benchmarks/bench_wgrad.py [--out DIR]       # one CUDA device; prints one JSON row per shape

Per shape (name, T): ms (median of triton.testing.do_bench) and TFLOP/s (2 * S * d * 2f) of each, and the
relative difference of grouped_mm's result from the row-ordered Triton kernel's. The numbers behind
`symphony_kernels._experts_launch.GATHER_ROWS` and `GROUPED_MM_WGRAD` (benchmarks/RESULTS.md, issue 11).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"mixtral": (4096, 14336, 8, 2), "1.5b": (1536, 8960, 4, 2), "qwen3": (2048, 768, 128, 8)}
CASES = [("mixtral", 4096), ("1.5b", 4096), ("qwen3", 4096), ("qwen3", 32768)]


def measure(name: str, T: int) -> dict:
    from triton.testing import do_bench

    from symphony_kernels import _experts_launch as X
    from symphony_kernels._launch import Call
    from symphony_kernels.routing import dispatch

    d, f, E, k = SHAPES[name]
    S = T * k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
    dgu = torch.randn(S, 2 * f, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.argsort(torch.rand(T, E, device="cuda", generator=g), dim=1)[:, :k].int().contiguous()
    w = torch.rand(T, k, device="cuda")
    _, off, srt = dispatch(ids, E)
    saved = X.GATHER_ROWS, X.GROUPED_MM_WGRAD

    def triton_wgrad(rows_first: bool):
        X.GATHER_ROWS, X.GROUPED_MM_WGRAD = rows_first, False
        try:
            call = Call(x.device)
            out = X._wgrad(call, dgu, False, x, True, w, ids, off, srt, S, E, 2 * f, d, torch.bfloat16, k, False)
            call.run()
            return out
        finally:
            X.GATHER_ROWS, X.GROUPED_MM_WGRAD = saved

    x_rows = x.index_select(0, torch.div(srt, k, rounding_mode="floor"))
    ends = off[1:].contiguous()
    flop = 2 * S * d * 2 * f
    row = {"shape": name, "T": T}
    for key, fn in (("ours_loop_gather", lambda: triton_wgrad(False)), ("ours_rows_first", lambda: triton_wgrad(True)),
                    ("grouped_mm_2d", lambda: torch._grouped_mm(dgu.t(), x_rows, offs=ends))):
        ms = float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
        row[key], row[key + "_tflops"] = round(ms, 4), round(flop / ms / 1e9, 1)
    a, b = triton_wgrad(True).float(), torch._grouped_mm(dgu.t(), x_rows, offs=ends).float()
    row["max_rel_diff"] = float(((a - b).norm() / b.norm()).item())
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for wgrad.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_wgrad.py needs a CUDA device")
    rows = []
    for name, T in CASES:
        rows.append(measure(name, T))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "wgrad.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
