"""The decode paths side by side at small token counts: which tiles the experts should take, what routing costs.

    python3 benchmarks/bench_decode.py --out OUT [--shapes NAME ...] [--tokens T ...]

On one CUDA device, bf16, per shape (d, f, E, k) and token count T, on the same weights and routing:
- experts (`moe_experts` with the plan of `route`, as a model that routes with `route` calls it) with each tile mode of `_configs.decode_mode` forced: 0 the
  sorted tiles after a dispatch, 1 the masked per-expert tiles (S = T*k <= 64 pairs), 2 one program row per pair;
  each checked against the float32 reference before it is timed; "rule" marks the mode the rule picks;
- `route` with the one-launch plan for calls of one count block (`_routing_launch._ONE_LAUNCH`) and without.
Times are medians of CUDA-graph replays (GPU time without the host), in microseconds, with the experts' roofline
floor (bench_moe's, ceilings measured in this run). Writes OUT/decode.json and prints the table last.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_moe  # noqa: E402
from benchmarks.run_info import blocking_compiles, header, log, write_json  # noqa: E402

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "qwen3-next": (2048, 512, 512, 10),
          "mixtral-8x7b": (4096, 14336, 8, 2), "qwen2-0.5b-x4": (896, 4864, 4, 2)}
TOKENS = (1, 2, 4, 8, 16, 32, 64)


@contextlib.contextmanager
def patched(module, name, value, *clears):
    """`module.name` is `value` inside; each of `clears` (cache clearers) runs on the way in and out."""
    before = getattr(module, name)
    setattr(module, name, value)
    for clear in clears:
        clear()
    try:
        yield
    finally:
        setattr(module, name, before)
        for clear in clears:
            clear()


def forced_mode(mode):
    """Every experts call inside takes tile mode `mode` (None: the rule's)."""
    import symphony_kernels.experts as ex
    from symphony_kernels import _configs

    rule = _configs.decode_mode if mode is None else (lambda S, E: mode)
    return patched(_configs, "decode_mode", rule, _configs.pick.cache_clear, ex._REPLAYS.clear)


def one_launch(on):
    """Routing calls inside take the one-launch plan where they can (`on`) or always two launches."""
    import symphony_kernels.routing as rt
    from symphony_kernels import _routing_launch

    return patched(_routing_launch, "_ONE_LAUNCH", on, rt._REPLAYS.clear)


def graph_us(fn):
    g = bench_moe.graph_of(fn)
    return 1e3 * bench_moe.bench(g.replay)


def weights(shape, copies, seed=0):
    d, f, E, _ = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [((torch.randn(E, 2 * f, d, device="cuda", generator=g) / d ** 0.5).bfloat16(),
             (torch.randn(E, d, f, device="cuda", generator=g) / f ** 0.5).bfloat16()) for _ in range(copies)]


def run_shape(name, shape, tokens, copy_bw, rate):
    import symphony_kernels as sk
    from symphony_kernels import _configs
    from symphony_kernels.reference import moe_experts_reference

    d, f, E, k = shape
    copies = max(1, -(-bench_moe.L2_ROTATE_BYTES // (3 * E * d * f * 2)))
    ws = weights(shape, copies)
    rows = []
    for T in tokens:
        x = torch.randn(T, d, device="cuda").bfloat16()
        logits = torch.randn(T, E, device="cuda").bfloat16()
        plan = sk.route(logits, k)
        w, ids = plan.topk_weights, plan.topk_ids
        touched = int(ids.unique().numel())
        ref = moe_experts_reference(x.float(), ws[0][0].float(), ws[0][1].float(), w.float(), ids).float()
        row = {"shape": name, "T": T, "pairs": T * k, "touched": touched, "rule": _configs.decode_mode(T * k, E),
               "floor_us": 1e3 * bench_moe.floor_ms(shape, T, touched, copy_bw, rate)}
        for mode in (0, 1, 2):
            if mode == 1 and E * _configs.decode_bm(T * k) > 8192:
                continue  # masked tiles of more than 8192 rows: far off any rule
            if mode == 2 and T * k > _configs.PAIR_ROWS_MAX_PAIRS:
                continue
            with forced_mode(mode):
                out = sk.moe_experts(x, *ws[0], w, ids, plan=plan)
                err = float((out.float() - ref).norm() / ref.norm())
                if not err < 2e-2:
                    raise SystemExit(f"{name} T={T} mode {mode}: relative error {err:.3g}")
                fns = [lambda gu=gu, dn=dn: sk.moe_experts(x, gu, dn, w, ids, plan=plan) for gu, dn in ws]
                row[f"mode{mode}_us"] = graph_us(bench_moe.rotating(fns))
                row[f"mode{mode}_err"] = err
        for on in (True, False):
            with one_launch(on):
                row["route_one_launch_us" if on else "route_two_launches_us"] = graph_us(lambda: sk.route(logits, k))
        log(f"{name:14s} T={T:3d} " + " ".join(f"{k_}={v:.1f}" for k_, v in row.items() if k_.endswith("_us")))
        rows.append(row)
    return rows


def table(rows):
    lines = ["| shape | T | floor us | mode 0 (sorted) | mode 1 (masked) | mode 2 (per pair) | rule | route 1 launch"
             " | route 2 launches |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        modes = [f"{r[f'mode{m}_us']:.1f}" if f"mode{m}_us" in r else "-" for m in (0, 1, 2)]
        lines.append(f"| {r['shape']} | {r['T']} | {r['floor_us']:.1f} | {' | '.join(modes)} | {r['rule']} | "
                     f"{r['route_one_launch_us']:.1f} | {r['route_two_launches_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    copy_bw, rate = bench_moe.ceilings(quick=True)
    result = {**header("cuda", argv if argv is not None else sys.argv[1:]), "copy_bytes_per_s": copy_bw,
              "matmul_flops_per_s": rate, "rows": []}
    with blocking_compiles():
        for name in args.shapes:
            result["rows"] += run_shape(name, SHAPES[name], args.tokens, copy_bw, rate)
            write_json(args.out / "decode.json", result)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
