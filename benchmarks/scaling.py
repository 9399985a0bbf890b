"""From a measured FSDP2 stage-2 run to the paper's scale: memory per GPU, H200s and days for full
post-training of a 4 x Qwen2.5-7B Symphony-MoE (`paper_scale`, `paper_paragraph`; bench_distributed.py calls
them with its measurement).

The derivation, for a measured run of a small MoE (4 x 1.5B) on n GPUs with FSDP2 (tokens/s per GPU `r`,
peak memory per GPU `m`, micro-batch of `t` tokens of length `S` per GPU):

- parameters P, active parameters A, and the largest FSDP unit (a decoder layer; the root: embeddings, final
  norm, head) of both MoEs are counted from their configs (bench_train.moe_config) on the meta device;
- training FLOPs per token: F = 6 * (matmul parameters a token uses: A, less the input embedding when it is not
  tied to the head) + 6 * L * d * S (causal attention scores and values, forward and backward);
- tokens/s per GPU of the big MoE = r * F_small / F_big: the same fraction of the GPU's peak (model FLOP
  utilisation) as measured, and the same per-GPU rate on N GPUs as on the n measured (data parallel with
  FSDP: each GPU computes its own micro-batch; the all-gathers and reduce-scatters grow with the model, not
  with N). Across machines (InfiniBand rather than NVLink) this is optimistic;
- memory per GPU on N GPUs = 16 bytes * P / N (float32 master weights, gradients, AdamW's two moments, all
  sharded) + 2 bytes * (root + 2 decoder layers) (the bf16 units gathered at once: the one computing and the
  one prefetched) + activations. Activations of the small run = m - 16 * P_small / n - its gathered units;
  for the big MoE they scale with L * d (the same micro-batch of tokens);
- GPUs needed: the smallest N whose memory per GPU fits `usable` bytes (default 90 % of an H200's 141 GB);
- days = tokens / (N * tokens/s per GPU) / 86400.
"""
from __future__ import annotations

import torch

H200_BYTES = 141e9
STATE_BYTES_PER_PARAM = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq


def model_facts(size: str, seq_len: int) -> dict:
    """Parameters, FLOPs per token and FSDP units of the 4-source MoE of `size` (bench_train.SOURCES)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_train import moe_config, param_counts
    from symphony.data import quiet_zero_size_init

    config = moe_config(size)
    with torch.device("meta"), quiet_zero_size_init():
        model = AutoModelForCausalLM.from_config(config)
    counts = param_counts(model)
    layer = max(sum(p.numel() for p in block.parameters()) for block in model.model.layers)
    root = counts["params"] - sum(sum(p.numel() for p in block.parameters()) for block in model.model.layers)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    L, d = config.num_hidden_layers, config.hidden_size
    flops = 6 * (counts["active_params"] - embedding) + 6 * L * d * seq_len
    return {**counts, "layer_params": layer, "root_params": root, "flops_per_token": flops, "layers": L,
            "hidden_size": d}


def memory_per_gpu(facts: dict, n: int, activation_bytes: float) -> float:
    gathered = 2 * (facts["root_params"] + 2 * facts["layer_params"])
    return STATE_BYTES_PER_PARAM * facts["params"] / n + gathered + activation_bytes


def paper_scale(tokens_per_s_per_gpu: float, peak_bytes_per_gpu: float, nproc: int, seq_len: int,
                micro_batch: int, *,
                small: str = "1.5b", big: str = "7b", tokens: float = 5e9, usable_bytes: float = 0.9 * H200_BYTES,
                gpu_counts=(8, 16, 24, 32)) -> dict:
    """The derivation of the module docstring, from a measured run of the `small` MoE on `nproc` GPUs."""
    s, b = model_facts(small, seq_len), model_facts(big, seq_len)
    activations_small = max(0.0, peak_bytes_per_gpu - memory_per_gpu(s, nproc, 0.0))
    activations = activations_small * (b["layers"] * b["hidden_size"]) / (s["layers"] * s["hidden_size"])
    rate = tokens_per_s_per_gpu * s["flops_per_token"] / b["flops_per_token"]
    needed = next(n for n in range(1, 100_000) if memory_per_gpu(b, n, activations) <= usable_bytes)
    counts = sorted({needed, *(n for n in gpu_counts if n >= needed)})
    plans = [{"gpus": n, "memory_per_gpu_bytes": memory_per_gpu(b, n, activations),
              "days": tokens / (n * rate) / 86400} for n in counts]
    return {"measured": {"size": small, "nproc": nproc, "tokens_per_s_per_gpu": tokens_per_s_per_gpu,
                         "peak_bytes_per_gpu": peak_bytes_per_gpu, "seq_len": seq_len, "micro_batch": micro_batch,
                         "activation_bytes": activations_small},
            "small": s, "big": b, "tokens": tokens, "usable_bytes": usable_bytes,
            "tokens_per_s_per_gpu": rate, "activation_bytes": activations, "gpus_needed": needed, "plans": plans}


def paper_paragraph(r: dict) -> str:
    """A README paragraph with the numbers of `paper_scale`."""
    b, m = r["big"], r["measured"]
    need = r["plans"][0]
    rows = "; ".join(f"{p['gpus']} GPUs: {p['memory_per_gpu_bytes'] / 1e9:.0f} GB each, {p['days']:.1f} days"
                     for p in r["plans"])
    return (f"A 4 x 7B Symphony-MoE (Qwen2.5-7B sources) has {b['params'] / 1e9:.1f}B parameters "
            f"({b['active_params'] / 1e9:.1f}B active per token). Full post-training keeps 16 bytes per parameter "
            f"(float32 weights, gradients and AdamW's two moments): {16 * b['params'] / 1e9:.0f} GB, sharded by "
            f"FSDP2 over the GPUs, plus the bf16 layers gathered at once and the activations of a micro-batch "
            f"(scaled from the measured run; a smaller micro-batch or activation checkpointing needs less). "
            f"It needs at least {r['gpus_needed']} H200s "
            f"({need['memory_per_gpu_bytes'] / 1e9:.0f} GB per GPU of {r['usable_bytes'] / 1e9:.0f} GB usable). "
            f"Measured: {m['tokens_per_s_per_gpu']:.0f} tokens/s per GPU for 4 x {m['size'].upper()} sources on "
            + (f"{m['nproc']} H200s (FSDP2, " if m["nproc"] > 1 else "one H200 (one process, no sharding, ")
            + f"bf16, micro-batch {m['micro_batch']} x {m['seq_len']} tokens per GPU); "
            f"at the same model FLOP utilisation "
            f"the 4 x 7B MoE runs at {r['tokens_per_s_per_gpu']:.0f} tokens/s per GPU "
            f"({b['flops_per_token'] / 1e9:.1f} GFLOP per token), so {r['tokens'] / 1e9:g}B tokens take: {rows}. "
            f"The paper's 6 epochs take 6 times as long. Multi-node runs use torchrun's rendezvous arguments "
            f"unchanged (untested here), and the per-GPU rate across machines is an upper bound.")
