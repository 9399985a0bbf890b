"""A real stage-2 step: full post-training of a Symphony-built MoE, in tokens/s and peak memory, with its experts
on Symphony's kernels against transformers' grouped_mm and batched_mm, in one run.

    python benchmarks/bench_train.py --out DIR [--quick] [--sizes 0.5b 1.5b] [--impls symphony grouped_mm ...]
                                     [--batch-size B] [--seq-len L] [--steps N] [--device cuda|cpu] [--tiny]

The models are what `symphony build` makes of 4 Qwen2.5 sources of one size (symphony.build.targets.target_config:
a Qwen2-MoE with 4 experts of the source FFN size, top-2, no shared expert, the source's attention, vocabulary
and tied embeddings), built directly on the device from that config with random weights (no checkpoint files).
Each step is symphony.train's own (`loop._train_step`: every parameter trained, float32 master weights,
AdamW, bf16 autocast, the load-balancing loss with aux_loss_coef 0.01, gradient clipping at 1.0) on random
token windows. Per experts implementation (switched on the same model with `set_experts_implementation`):
`warmup` steps, then `steps` timed steps between device synchronisations: tokens/s = steps * B * L / seconds,
peak memory = torch.cuda.max_memory_allocated over the warmup and timed steps (weights, gradients and AdamW
state included). batched_mm gathers a weight copy per (token, slot) pair; where that copy would exceed
8 GiB it is skipped and the JSON says why. Writes DIR/bench_train.json and DIR/bench_train.md.

--quick (2 warmup + 5 timed steps per implementation): about 4 minutes on one H200 for both sizes. --tiny: a
32-wide 2-layer model of the same layout, for a CPU smoke run (tests/benchmarks).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_info import blocking_compiles, header, log, sync, write_json  # noqa: E402

# Qwen2.5 source shapes (their config.json): hidden, FFN, layers, heads, KV heads, vocabulary, tied embeddings
SOURCES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
IMPLS = ("symphony", "grouped_mm", "batched_mm")
BATCHED_MM_MAX_BYTES = 8 << 30


def gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "–"


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finish(out: Path, name: str, results: dict, started: float, text_of) -> dict:
    """Write OUT/NAME.json and OUT/NAME.md (the table `text_of(results)`) and print the table."""
    results["seconds"] = time.time() - started
    write_json(out / f"{name}.json", results)
    text = text_of(results)
    (out / f"{name}.md").write_text(text + "\n")
    log("")
    log(text)
    return results


def moe_config(size: str, num_sources: int = 4, top_k: int = 2):
    """The config `symphony build` gives `num_sources` Qwen2.5 sources of `size` (bf16 checkpoints)."""
    from transformers import Qwen2Config

    from symphony.build.targets import target_config

    src = SOURCES[size]
    eos = 151643 if src["vocab_size"] > 151643 else 0  # Qwen2.5's <|endoftext|>
    anchor = Qwen2Config(**src, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                         bos_token_id=eos, eos_token_id=eos)
    return target_config(anchor, num_experts=num_sources, top_k=top_k, expert_size=src["intermediate_size"],
                         shared_expert_size=0, vocab_size=src["vocab_size"], dtype=torch.bfloat16,
                         max_position_embeddings=32768)


def build_model(config, device, seed: int = 0):
    """The MoE of `config` with random weights, float32 (the master weights of full post-training), on `device`."""
    from transformers import AutoModelForCausalLM

    from symphony.data import quiet_zero_size_init

    torch.manual_seed(seed)
    with torch.device(device), quiet_zero_size_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    return {"params": total, "expert_params": experts, "active_params": total - experts * (E - k) // E}


def training_step(model, optimizer, device, dtype, *, group=None):
    """step(batch, step_index) -> (loss, lm, aux, counts): symphony.train.loop's step with benchmark settings."""
    from symphony.train import RouterTrainingConfig
    from symphony.train.loop import _train_step

    cfg = RouterTrainingConfig(steps=10**6, lr=1e-5, train="full", warmup=0.0, aux_loss_coef=0.01, grad_clip=1.0)
    params = [p for p in model.parameters() if p.requires_grad and p.numel()]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    top_k = model.config.num_experts_per_tok
    return lambda batch, step: _train_step(model, batch, optimizer, params, cfg, step, autocast, top_k, group)


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.numel()], lr=1e-5)


def time_steps(step, batches, warmup: int, device) -> dict:
    """Run `warmup` then the remaining batches through `step`: seconds of the timed ones, peak memory, losses."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for i, batch in enumerate(batches[:warmup]):
        losses.append(step(batch, i)[0])
    sync(device.type)
    t0 = time.perf_counter()
    for i, batch in enumerate(batches[warmup:], start=warmup):
        losses.append(step(batch, i)[0])
    sync(device.type)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": seconds, "peak_bytes": peak, "losses": losses}


def random_batches(n: int, batch_size: int, seq_len: int, vocab: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device) for _ in range(n)]


def batched_mm_bytes(config, tokens: int) -> int:
    d, f = config.hidden_size, config.moe_intermediate_size
    return tokens * config.num_experts_per_tok * 3 * d * f * 2  # bf16 gate_up + down copies per pair


def bench_size(size, args, device, results):
    import symphony  # noqa: F401 - registers experts_implementation="symphony"

    config = moe_config(size) if size != "tiny" else moe_config("tiny")
    model = build_model(config, device)
    counts = param_counts(model)
    optimizer = optimizer_for(model)
    step = training_step(model, optimizer, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = args.batch_size * args.seq_len
    log(f"{size}: {counts['params'] / 1e9:.2f}B parameters ({counts['active_params'] / 1e9:.2f}B active), "
        f"{args.batch_size} x {args.seq_len} tokens per step")
    for impl in args.impls:
        row = {"size": size, "impl": impl, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "steps": args.steps, "warmup": args.warmup, **counts}
        need = batched_mm_bytes(config, tokens)
        if impl == "batched_mm" and need > BATCHED_MM_MAX_BYTES:
            row["skipped"] = f"its per-pair weight copies would take {need / 2**30:.0f} GiB per MoE layer"
        else:
            try:
                model.set_experts_implementation(impl)
                batches = random_batches(args.warmup + args.steps, args.batch_size, args.seq_len,
                                         config.vocab_size, device)
                timed = time_steps(step, batches, args.warmup, device)
                row.update(timed, tokens_per_s=args.steps * tokens / timed["seconds"])
            except Exception as e:  # noqa: BLE001 - out of memory and the like: recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                optimizer.zero_grad(set_to_none=True)
        results.append(row)
        log(f"  {impl}: " + (f"{row['tokens_per_s']:.0f} tokens/s, peak {gib(row['peak_bytes'])}"
                             if "tokens_per_s" in row else row.get("skipped") or row.get("error")))
        free(device)
    del model, optimizer, step
    free(device)


def table(results: dict) -> str:
    lines = [f"device: {results['device']}; {results['command']}", "",
             "| size (4 sources) | params (active) | impl | tokens/s | peak memory | vs grouped_mm |",
             "|---|---|---|---|---|---|"]
    by = {(r["size"], r["impl"]): r for r in results["rows"]}
    for r in results["rows"]:
        base = by.get((r["size"], "grouped_mm"), {}).get("tokens_per_s")
        if "tokens_per_s" in r:
            speed = f"{r['tokens_per_s']:.0f}"
            peak = gib(r["peak_bytes"])
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "–"
        else:
            speed, peak, ratio = r.get("skipped") or r.get("error"), "–", "–"
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f}B ({r['active_params'] / 1e9:.2f}B) | {r['impl']} | "
                     f"{speed} | {peak} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="2 warmup + 5 timed steps per implementation")
    ap.add_argument("--sizes", nargs="+", default=["0.5b", "1.5b"], choices=[s for s in SOURCES if s != "tiny"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, help="timed steps per implementation (default 20; 5 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3; 2 with --quick)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of --sizes (CPU smoke test)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA device (or --device cpu --tiny)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {**header(device.type, sys.argv[1:] if argv is None else argv), "rows": []}
    for size in (["tiny"] if args.tiny else args.sizes):
        with blocking_compiles():  # every call runs the kernels (training compiles in the caller anyway)
            bench_size(size, args, device, results["rows"])
        write_json(args.out / "bench_train.json", results)
    return finish(args.out, "bench_train", results, t0, table)


if __name__ == "__main__":
    main()
