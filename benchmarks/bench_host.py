"""Host time per eager call of the kernels' public functions (issue 10: moe_experts <= 60 us, route <= 40 us).

A tiny shape (so the GPU work is far shorter than the host work) is called N times in a row without a sync;
host time per call = wall time of the N calls / N, the GPU queue never running dry. Each function is timed
with the short launch path (`_launch.Kernel`) and with Triton's own launch forced (`--no-short-path` in the
same run, by making `_launch._no_launch_hook` report a hook), so the ratio of the two is measured on the same
machine. Decode (T = 1, 8) and a prefill-sized call (T = 256, which adds the dispatch) are timed for
moe_experts; route at T = 1 and 256. `device_us` checks the premise that the GPU work is shorter: one call
captured in a CUDA graph and the graph replayed N times (an upper bound of the device time per call: the
graph launches cost a little host time too); where it comes near `host_us`, the call is bound by the device.

    python benchmarks/bench_host.py --out OUTDIR        # on a CUDA machine; prints a table, writes host.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402


def _time(fn, n: int, sync=None) -> float:
    """Microseconds per call: the best of 5 rounds of n calls after 20 warm-up calls; `sync` (by default the
    CUDA device's) runs after the warm-up and after each round, outside the timing."""
    sync = sync or torch.cuda.synchronize
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
        sync()
    return best * 1e6


def _device_time(fn, n: int):
    """Microseconds per replay of a CUDA graph of one call of `fn` (None, with the reason printed, where the
    call cannot be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t) / n * 1e6, 2)
    except Exception as e:  # noqa: BLE001 - reported, the host numbers stand without it
        print(f"device time not measured: {type(e).__name__}: {e}")
        return None


def measure(n: int = 2000) -> list[dict]:
    import symphony_kernels as sk
    from symphony_kernels import _launch

    sk.set_compile_mode("blocking")
    dev, dt = "cuda", torch.bfloat16
    d, f, E, k = 256, 128, 64, 8
    gate_up = torch.randn(E, 2 * f, d, device=dev, dtype=dt) / 16
    down = torch.randn(E, d, f, device=dev, dtype=dt) / 16
    cases = []
    for T in (1, 8, 256):
        x = torch.randn(T, d, device=dev, dtype=dt)
        logits = torch.randn(T, E, device=dev)
        plan = sk.route(logits, k)
        cases.append((f"moe_experts T={T}", lambda x=x, p=plan: sk.moe_experts(x, gate_up, down, p.topk_weights,
                                                                               p.topk_ids)))
        if T != 8:
            cases.append((f"route T={T}", lambda lg=logits: sk.route(lg, k)))
    rows = []
    real = _launch._no_launch_hook
    with torch.no_grad():
        for name, fn in cases:
            short = _time(fn, n)
            _launch._no_launch_hook = lambda: False
            try:
                triton_launch = _time(fn, n)
            finally:
                _launch._no_launch_hook = real
            rows.append({"call": name, "host_us": round(short, 2), "host_us_triton_launch": round(triton_launch, 2),
                         "device_us": _device_time(fn, n)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for host.json")
    parser.add_argument("--n", type=int, default=2000, help="calls per timing")
    args = parser.parse_args(argv)
    rows = measure(args.n)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    meta["triton"] = triton.__version__
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"{'call':<22} {'host us':>9} {'with Triton launch':>19} {'device us (graph)':>18}")
    for r in rows:
        device = "-" if r["device_us"] is None else f"{r['device_us']:.1f}"
        print(f"{r['call']:<22} {r['host_us']:>9.1f} {r['host_us_triton_launch']:>19.1f} {device:>18}")


if __name__ == "__main__":
    main()
