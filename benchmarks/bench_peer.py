"""Our experts beside the tuned peer: vLLM's fused-MoE Triton kernel with vLLM's tuned tables, in one run.

    python tools/make_peer.py VLLM_SOURCE --out .carry/peer        # once: extracts the peer (git-ignored)
    python benchmarks/bench_peer.py --peer .carry/peer --out OUT [--quick] [--shapes NAME ...] [--tokens T ...]
    TRITON_INTERPRET=1 python benchmarks/bench_peer.py --peer .carry/peer --out OUT --device cpu --tiny

On one CUDA device, bf16, per shape (d, f, E, k) (benchmarks/generate_models.py's mixtral, qwen3-moe and
qwen3-next) and token count T, on identical random weights (transformers' layout, which is also vLLM's: no
conversion) and router logits:
- `peer`: routing, alignment, up GEMM, silu_and_mul, down GEMM with the routing weight, sum over k, as
  benchmarks/peer_moe.py drives vLLM's kernel with the tuned table entry vLLM would pick for T;
- `ours`: `symphony_kernels.route` + `symphony_kernels.moe_experts(..., plan=plan)`;
- `peer_planned` / `ours_planned`: the same with routing and alignment done beforehand (what the experts
  kernels cost alone).
Each is timed launched eagerly and replayed from a CUDA graph (bench_moe's timing); the better of the two
counts. The roofline floor is bench_moe's (ceilings measured in this run). Before timing, peer and ours are run
on the same ids and weights and their outputs compared (relative Frobenius error; "match" under a bf16
tolerance). Where vLLM runs CUDA ops (top-k routing, alignment, silu_and_mul, sum) the peer runs torch or
small Triton stand-ins (see peer_moe.py), so the `peer` column can overstate what vLLM spends on routing and
alignment; the planned columns compare the experts kernels alone.

Writes OUT/peer.json and OUT/peer.md and prints the table: each time over the floor, and ours / peer (below 1:
ours is faster). `--device cpu --tiny` runs the same harness on tiny shapes in float32 through Triton's
interpreter (a check of the logic; its times mean nothing).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_moe  # noqa: E402
from benchmarks import generate_models as gm  # noqa: E402
from benchmarks import peer_moe as pm  # noqa: E402
from benchmarks.run_info import base_parser, blocking_compiles, header, log, median_ms, write_json  # noqa: E402

SHAPES = ("mixtral", "qwen3-moe", "qwen3-next")
TINY_TOKENS = (1, 5, 40)
# CPU runs: a tile that every tiny shape takes (vLLM's tables are for real shapes on real devices).
TINY_CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4,
               "num_stages": 2}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
VARIANTS = ("peer", "ours", "peer_planned", "ours_planned")


def parse_args(argv=None):
    ap = base_parser(__doc__, "tiny shapes in float32 (with --device cpu: the CPU check of the harness)",
                     "token counts (1, 64, 4096) and shorter timing")
    ap.add_argument("--peer", type=Path, default=Path(".carry/peer"), help="folder written by tools/make_peer.py")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--tokens", nargs="+", type=int)
    ap.add_argument("--device-name", help="the device name of the tuned tables (default: this GPU's)")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = TINY_TOKENS if args.tiny else bench_moe.QUICK_TOKENS if args.quick else bench_moe.TOKENS
    if any(t < 1 for t in args.tokens):
        ap.error("--tokens must be positive")
    return args


def check_environment(args):
    """SystemExit with one line when this run cannot work."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_peer.py: error: no CUDA device (use --device cpu --tiny for the CPU check)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("bench_peer.py: error: --device cpu runs the kernels through Triton's interpreter: set "
                         "TRITON_INTERPRET=1")


def ceilings(device, quick):
    """(copy bandwidth B/s, matmul rate FLOP/s): bench_moe's on CUDA, a small float32 probe on CPU."""
    if device == "cuda":
        return bench_moe.ceilings(quick)
    a, A = torch.randn(1 << 22), torch.randn(256, 256)
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a), "cpu")
    mm_ms = median_ms(lambda: A @ A, "cpu")
    return 2 * a.numel() * 4 / (copy_ms * 1e-3), 2 * 256 ** 3 / (mm_ms * 1e-3)


def timed(fn, args) -> dict:
    """{"eager": ms, "graph": ms, "best": ms} (no graph on CPU; an error that stops a mode is recorded)."""
    row = {}
    if args.device == "cpu":
        row["eager"] = median_ms(fn, "cpu", quick=True)
    else:
        row["eager"] = bench_moe.bench(fn, args.quick)
        try:
            graph = bench_moe.graph_of(fn)
            row["graph"] = bench_moe.bench(graph.replay, args.quick)
            del graph
        except Exception as e:  # noqa: BLE001 - recorded; the eager time still counts
            row["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    row["best"] = min(row[m] for m in ("eager", "graph") if m in row)
    return row


def table_for(peer, E, f, args):
    if args.tiny:
        return {1: dict(TINY_CONFIG)}
    return peer.table(E, f, args.device_name or torch.cuda.get_device_name())


def bench_shape(peer, name, args, copy_bw, rate, rows):
    import symphony_kernels as sk

    shape = (gm.TINY if args.tiny else gm.MODELS)[name]
    d, f, E, k = (shape[key] for key in ("d", "f", "E", "k"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    table = table_for(peer, E, f, args)
    g = torch.Generator(device=args.device).manual_seed(1)
    gu = (torch.randn(E, 2 * f, d, device=args.device, generator=g) / d ** 0.5).to(dtype)
    dn = (torch.randn(E, d, f, device=args.device, generator=g) / f ** 0.5).to(dtype)
    for T in args.tokens:
        x = torch.randn(T, d, device=args.device, generator=g).to(dtype)
        logits = torch.randn(T, E, device=args.device, generator=g).to(dtype)
        key, config = pm.nearest(table, T)
        plan = sk.route(logits, k)
        assign = pm.assignment(plan.topk_ids, config["BLOCK_SIZE_M"], E)
        row = {"shape": name, "dfEk": [d, f, E, k], "T": T, "table_key": key, "config": config,
               "one_block_per_pair": assign[0] is None,
               "touched": int(torch.unique(plan.topk_ids).numel())}
        row["floor"] = bench_moe.floor_ms((d, f, E, k), T, row["touched"], copy_bw, rate, gu.element_size())

        def ours():
            p = sk.route(logits, k)
            return sk.moe_experts(x, gu, dn, p.topk_weights, p.topk_ids, plan=p)

        fns = {"peer": lambda: pm.moe(peer, x, logits, gu, dn, k, table), "ours": ours,
               "peer_planned": lambda: pm.experts(peer, x, gu, dn, plan.topk_weights, plan.topk_ids, config, assign),
               "ours_planned": lambda: sk.moe_experts(x, gu, dn, plan.topk_weights, plan.topk_ids, plan=plan)}
        with torch.no_grad():
            try:
                ours, theirs = fns["ours_planned"]().float(), fns["peer_planned"]().float()
                row["rel_err"] = ((theirs - ours).norm() / ours.norm().clamp_min(1e-30)).item()
                row["match"] = row["rel_err"] <= TOLERANCE[dtype]
            except Exception as e:  # noqa: BLE001 - recorded, and the cell's timing goes on
                row["check_error"] = f"{type(e).__name__}: {e}"[:300]
            for variant, fn in fns.items():
                try:
                    row[variant] = timed(fn, args)
                except Exception as e:  # noqa: BLE001 - OOM, compile errors: recorded, the run goes on
                    row[variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
        for variant in VARIANTS:
            if "best" in row[variant]:
                row[variant + "_over_floor"] = row[variant]["best"] / row["floor"]
        for plain in ("", "_planned"):
            if "best" in row["ours" + plain] and "best" in row["peer" + plain]:
                row["ours_over_peer" + plain] = row["ours" + plain]["best"] / row["peer" + plain]["best"]
        rows.append(row)
        log(f"  {name} T={T}: " + ", ".join(f"{v}={row[v].get('best', float('nan')):.4g}" for v in VARIANTS)
            + f", floor={row['floor']:.4g} ms, rel_err={row.get('rel_err', float('nan')):.2e}")


def table(results) -> str:
    c = results["ceilings"]
    p = results["peer"]
    lines = [f"device: {results['device']}; copy {c['copy_TBps']:.3f} TB/s, matmul {c['matmul_TFLOPs']:.1f} TFLOP/s; "
             f"peer: vLLM {p['vllm_version']} (commit {p['commit']}) fused_moe_kernel with its tuned tables",
             "", "time / floor (best of eager and CUDA graph); ours / peer below 1: ours is faster", "",
             "| shape (d,f,E,k) | T | floor ms | peer | ours | ours / peer | peer planned | ours planned | "
             "ours / peer planned | rel err | match |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda r, key, fmt="{:.2f}": fmt.format(r[key]) if key in r else "–"  # noqa: E731
    for r in results["rows"]:
        lines.append(f"| {r['shape']} {tuple(r['dfEk'])} | {r['T']} | {r['floor']:.4f} | "
                     f"{cell(r, 'peer_over_floor')} | {cell(r, 'ours_over_floor')} | {cell(r, 'ours_over_peer')} | "
                     f"{cell(r, 'peer_planned_over_floor')} | {cell(r, 'ours_planned_over_floor')} | "
                     f"{cell(r, 'ours_over_peer_planned')} | {cell(r, 'rel_err', '{:.1e}')} | "
                     f"{r.get('match', '–')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_environment(args)
    try:
        peer = pm.Peer(args.peer)
    except pm.PeerError as e:
        raise SystemExit(f"bench_peer.py: error: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {**header(args.device, sys.argv[1:] if argv is None else argv), "peer": peer.about(),
               "dtype": "float32" if args.tiny else "bfloat16", "rows": []}
    copy_bw, rate = ceilings(args.device, args.quick)
    results["ceilings"] = {"copy_TBps": copy_bw / 1e12, "matmul_TFLOPs": rate / 1e12}
    log(f"ceilings: copy {copy_bw / 1e12:.3f} TB/s, matmul {rate / 1e12:.1f} TFLOP/s")
    with blocking_compiles():
        for name in args.shapes:
            try:
                bench_shape(peer, name, args, copy_bw, rate, results["rows"])
            except pm.PeerError as e:
                raise SystemExit(f"bench_peer.py: error: {e}") from None
            if args.device == "cuda":
                torch.cuda.empty_cache()  # this shape's weights
            write_json(args.out / "peer.json", results)
    results["seconds"] = time.time() - t0
    write_json(args.out / "peer.json", results)
    text = table(results)
    (args.out / "peer.md").write_text(text + "\n")
    log("")
    log(text)


if __name__ == "__main__":
    main()
