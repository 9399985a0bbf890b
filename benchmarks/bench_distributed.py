"""Stage 2 and the MoE layer on 1 and several GPUs: tokens/s and peak memory per GPU.

    python benchmarks/bench_distributed.py --out DIR [--quick] [--gpus 1 2] [--parts train ep]
                                           [--micro-batch B] [--seq-len L] [--steps N] [--tokens T ...]
                                           [--device cuda|cpu] [--tiny]

Two measurements, each on every process count N of --gpus (N = 1 runs in this process; N > 1 under
`python -m torch.distributed.run --standalone --nproc-per-node N` started from here, one process per GPU,
NCCL; gloo with --device cpu):

- train: full post-training of the Symphony MoE of 4 Qwen2.5-1.5B-shaped sources (bench_train.moe_config,
  random weights, float32 masters, AdamW, bf16 autocast, the load-balancing loss), each step
  symphony.train.loop._train_step. N = 1 is `symphony train`'s one-process path (no FSDP); N > 1 is its
  FSDP2 path (symphony.train.distributed.shard: every decoder layer and the root fully_shard-ed, bf16
  gathers, float32 gradient reduction, global load-balancing statistics). Weak scaling: each GPU trains its
  own micro-batch of B x L tokens per step. tokens/s = N * B * L * steps / seconds of the slowest rank;
  peak memory per GPU = the largest torch.cuda.max_memory_allocated of the ranks. The target of issue 12 is
  >= 1.8x the tokens/s on 2 GPUs.
- ep: one MoE layer at the Qwen3-30B-A3B shape (d 2048, f 768, E 128, k 8; bf16), forward + backward on T
  tokens per GPU: N = 1 the plain `SymphonyMoE`, N > 1 `symphony.nn.ep.ExpertParallelMoE` (E / N experts
  per GPU, all_to_all dispatch). Mean milliseconds per step of the slowest rank, tokens/s over all GPUs,
  TFLOP/s per GPU (3 * 6 * T * k * d * f per GPU and step), peak memory per GPU.

Then benchmarks/scaling.py turns the train measurement on the most GPUs into the 4 x 7B paper-scale estimate
(memory per GPU, H200s, days for 5B tokens) and its README paragraph. Writes DIR/bench_distributed.json and
DIR/bench_distributed.md. --quick: 2 warmup + 5 timed train steps, 5 + 20 EP steps, T = 4096 and 16384.
--tiny: tiny shapes for a CPU smoke run (tests/benchmarks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import (build_model, finish, free, gib, moe_config, optimizer_for,  # noqa: E402
                                    param_counts, random_batches, time_steps, training_step)
from benchmarks.run_info import blocking_compiles, header, log, sync, write_json  # noqa: E402

EP_SHAPE = (2048, 768, 128, 8)  # Qwen3-30B-A3B: d, f (per expert), E, k
TINY_EP_SHAPE = (32, 16, 8, 2)


def _world():
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(value):
    """The list of every rank's `value` (one process: [value])."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def train_part(args, device) -> dict:
    """Timed full post-training steps on this rank (see the module docstring)."""
    import torch.distributed as dist

    from symphony.train.distributed import shard

    rank, world = _world()
    config = moe_config("tiny" if args.tiny else args.size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(config, device)  # the same weights on every rank (same seed), then sharded
    counts = param_counts(model)
    if world > 1:
        shard(model, dtype)
    free(device)
    import symphony  # noqa: F401 - registers experts_implementation="symphony"

    model.set_experts_implementation("symphony")
    optimizer = optimizer_for(model)
    step = training_step(model, optimizer, device, dtype, group=dist.group.WORLD if world > 1 else None)
    batches = random_batches(args.warmup + args.steps, args.micro_batch, args.seq_len, config.vocab_size, device,
                             seed=1 + rank)
    timed = time_steps(step, batches, args.warmup, device)
    ranks = _gather({"seconds": timed["seconds"], "peak_bytes": timed["peak_bytes"]})
    seconds = max(r["seconds"] for r in ranks)
    tokens = world * args.micro_batch * args.seq_len * args.steps
    del model, optimizer, step
    return {"nproc": world, "size": "tiny" if args.tiny else args.size, **counts, "micro_batch": args.micro_batch,
            "seq_len": args.seq_len, "steps": args.steps, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_gpu": tokens / seconds / world, "losses": timed["losses"],
            "peak_bytes_per_gpu": max(r["peak_bytes"] or 0 for r in ranks) or None,
            "peak_bytes_by_rank": [r["peak_bytes"] for r in ranks]}


def ep_part(args, device) -> list[dict]:
    """Forward + backward of one MoE layer, plain (one process) or expert parallel, per token count."""
    from symphony import SymphonyMoE
    from symphony.nn.ep import ExpertParallelMoE

    rank, world = _world()
    d, f, E, k = TINY_EP_SHAPE if args.tiny else EP_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = SymphonyMoE(d, f, E, k, dtype=dtype, device=device)
    if world > 1:
        layer = ExpertParallelMoE(layer)
    free(device)
    rows = []
    for T in args.tokens:
        g = torch.Generator(device=device).manual_seed(100 + rank)
        x = torch.randn(T, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
        grad = torch.randn(T, d, device=device, dtype=dtype, generator=g)

        def step():
            for p in (x, *layer.parameters()):
                p.grad = None
            layer(x).backward(grad)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.ep_warmup):
            step()
        sync(device.type)
        t0 = time.perf_counter()
        for _ in range(args.ep_steps):
            step()
        sync(device.type)
        ms = (time.perf_counter() - t0) / args.ep_steps * 1e3
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ranks = _gather({"ms": ms, "peak_bytes": peak})
        ms = max(r["ms"] for r in ranks)
        rows.append({"nproc": world, "dfEk": [d, f, E, k], "T_per_gpu": T, "ms": ms,
                     "tokens_per_s": world * T / (ms * 1e-3), "tflops_per_gpu": 18 * T * k * d * f / (ms * 1e-3) / 1e12,
                     "peak_bytes_per_gpu": max(r["peak_bytes"] or 0 for r in ranks) or None})
        del x, grad
    return rows


@blocking_compiles()
def run_parts(args, device) -> dict:
    out = {}
    if "train" in args.parts:
        out["train"] = train_part(args, device)
        free(device)
    if "ep" in args.parts:
        out["ep"] = ep_part(args, device)
    return out


def worker(args):
    """One process of a torchrun launch: initialise the group, run the parts, rank 0 writes args.result."""
    import torch.distributed as dist

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        result = run_parts(args, device)
        if dist.get_rank() == 0:
            args.result.write_text(json.dumps(result))
        dist.barrier()  # the ranks leave together (see symphony.train.distributed.train_fsdp)
    finally:
        dist.destroy_process_group()


def launch(n: int, argv: list[str], out: Path) -> dict:
    result = out / f"raw-{n}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(Path(__file__).resolve()), *argv, "--worker", "--result", str(result)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    code = subprocess.run(cmd, env=env).returncode
    if code != 0 or not result.is_file():
        return {"error": f"torchrun with {n} processes exited with status {code}"}
    return json.loads(result.read_text())


def scaling(train_rows: list[dict], tiny: bool) -> dict | None:
    """The paper-scale estimate (benchmarks/scaling.py) from the train run on the most GPUs."""
    from benchmarks.scaling import paper_paragraph, paper_scale

    ok = [r for r in train_rows if "tokens_per_s_per_gpu" in r and r.get("peak_bytes_per_gpu")]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["nproc"])
    est = paper_scale(best["tokens_per_s_per_gpu"], best["peak_bytes_per_gpu"], best["nproc"], best["seq_len"],
                      best["micro_batch"], small="tiny" if tiny else best["size"])
    est["paragraph"] = paper_paragraph(est)
    return est


def table(results: dict) -> str:
    lines = [f"device: {results['device']}; {results['command']}", ""]
    train = [r for r in results["train"] if "tokens_per_s" in r]
    if train:
        base = next((r["tokens_per_s"] for r in train if r["nproc"] == 1), None)
        lines += ["| train 4 x " + train[0]["size"] + " (full) | GPUs | tokens/s | per GPU | vs 1 GPU | peak memory "
                  "per GPU |", "|---|---|---|---|---|---|"]
        for r in train:
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "–"
            lines.append(f"| {r['params'] / 1e9:.2f}B params, {r['micro_batch']} x {r['seq_len']} per GPU | "
                         f"{r['nproc']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | {ratio} | "
                         f"{gib(r['peak_bytes_per_gpu'])} |")
    if results["ep"]:
        lines += ["", "| MoE layer fwd+bwd (d,f,E,k) | GPUs | T per GPU | ms | tokens/s (all GPUs) | TFLOP/s per GPU | "
                  "peak memory per GPU |", "|---|---|---|---|---|---|---|"]
        for r in results["ep"]:
            lines.append(f"| {tuple(r['dfEk'])} | {r['nproc']} | {r['T_per_gpu']} | {r['ms']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['tflops_per_gpu']:.1f} | {gib(r['peak_bytes_per_gpu'])} |")
    for e in results["errors"]:
        lines.append(f"\nnot measured: {e}")
    if results.get("scaling"):
        lines += ["", results["scaling"]["paragraph"]]
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="process counts to measure")
    ap.add_argument("--parts", nargs="+", default=["train", "ep"], choices=["train", "ep"])
    ap.add_argument("--size", default="1.5b", choices=["0.5b", "1.5b", "7b"], help="source shape of the train part")
    ap.add_argument("--micro-batch", type=int, default=4, help="windows per GPU and step")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--tokens", nargs="+", type=int, help="EP tokens per GPU (default 4096 16384 32768)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.ep_warmup, args.ep_steps = (1, 2) if args.tiny else (5, 20) if args.quick else (10, 50)
    args.tokens = args.tokens or ([4096, 16384] if args.quick else [4096, 16384, 32768])
    if not args.worker and args.out is None:
        ap.error("--out is required")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_distributed.py needs CUDA devices (or --device cpu --tiny)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {**header(device.type, argv), "train": [], "ep": [], "errors": []}
    available = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    for n in args.gpus:
        if n > available and device.type == "cuda":
            results["errors"].append(f"{n} GPUs: this machine has {available}")
            continue
        log(f"== {n} process{'es' if n > 1 else ''}")
        part = run_parts(args, device) if n == 1 else launch(n, argv, args.out)
        if "error" in part:
            results["errors"].append(part["error"])
            continue
        if "train" in part:
            results["train"].append(part["train"])
            log(f"  train: {part['train']['tokens_per_s']:.0f} tokens/s, peak {gib(part['train']['peak_bytes_per_gpu'])}"
                " per GPU")
        for r in part.get("ep", []):
            results["ep"].append(r)
            log(f"  ep T={r['T_per_gpu']}: {r['ms']:.3f} ms, {r['tokens_per_s']:.0f} tokens/s")
        free(device)
        write_json(args.out / "bench_distributed.json", results)
    results["scaling"] = scaling(results["train"], args.tiny)
    return finish(args.out, "bench_distributed", results, t0, table)


if __name__ == "__main__":
    main()
