"""The models and the timed calls of bench_generate.py: random-init transformers MoE models built directly on the
device from a config (no checkpoint), seeded so that every process builds the same weights, and generate() /
forward calls timed with the device synchronised.

"qwen3-next" is a Qwen3-MoE model with Qwen3-Next's expert numbers (512 experts x 512, top-10, d 2048, 16 query /
2 kv heads of 256): the real Qwen3NextForCausalLM runs 3 of 4 layers as gated-delta-net linear attention, which
without the `fla` and `causal-conv1d` packages (not installed) runs a slow pure-PyTorch path that would dominate
its time, and its hybrid cache is not the static cache measured here.
"""
from __future__ import annotations

import torch

from benchmarks.run_info import wall

# name -> class, layers, d, experts E, expert width f, top-k, attention heads, kv heads, head_dim
MODELS = {
    "qwen3-moe": dict(cls="qwen3_moe", layers=8, d=2048, E=128, f=768, k=8, heads=32, kv=4, head_dim=128),
    "mixtral": dict(cls="mixtral", layers=4, d=4096, E=8, f=14336, k=2, heads=32, kv=8, head_dim=128),
    "qwen3-next": dict(cls="qwen3_moe", layers=8, d=2048, E=512, f=512, k=10, heads=16, kv=2, head_dim=256),
}
VOCAB = 32000
# CPU test sizes of the same three kinds (the CPU path checks the logic, not the speed).
TINY = {
    "qwen3-moe": dict(cls="qwen3_moe", layers=1, d=32, E=8, f=16, k=2, heads=2, kv=1, head_dim=16),
    "mixtral": dict(cls="mixtral", layers=1, d=32, E=4, f=48, k=2, heads=2, kv=1, head_dim=16),
    "qwen3-next": dict(cls="qwen3_moe", layers=1, d=32, E=16, f=8, k=4, heads=2, kv=1, head_dim=16),
}
TINY_VOCAB = 64
IMPLS = ("symphony", "grouped_mm", "batched_mm", "eager")
BASELINE = "grouped_mm"


def spec_of(name: str, tiny: bool) -> dict:
    table = TINY if tiny else MODELS
    if name not in table:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(table)}")
    return dict(table[name], vocab=TINY_VOCAB if tiny else VOCAB)


def config_of(spec: dict, max_positions: int):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=spec["vocab"], hidden_size=spec["d"], num_hidden_layers=spec["layers"],
                  num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"], head_dim=spec["head_dim"],
                  num_experts_per_tok=spec["k"], max_position_embeddings=max_positions, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if spec["cls"] == "mixtral":
        return MixtralConfig(intermediate_size=spec["f"], num_local_experts=spec["E"], **common)
    return Qwen3MoeConfig(moe_intermediate_size=spec["f"], intermediate_size=spec["f"], num_experts=spec["E"],
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **common)


def build_model(spec: dict, impl: str, device: str, dtype, seed: int, max_positions: int):
    """A random-init causal LM on `device` with experts implementation `impl`; the same weights for the same
    seed, spec and device."""
    import symphony  # noqa: F401 - registers experts_implementation="symphony" with transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_of(spec, max_positions), dtype=dtype,
                                                 experts_implementation=impl)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id, gc.do_sample = 0, 1, None, False
    return model


def expert_pair_bytes(spec: dict) -> int:
    """Bytes of one expert's weights in bf16: what batched_mm copies per (token, expert) pair."""
    return 3 * spec["d"] * spec["f"] * 2


def prompt_ids(vocab: int, batch: int, length: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g).to(device)


def compile_config(device: str, fullgraph: bool):
    """What generate() compiles the decode forward with under a static cache: transformers' default
    (inductor, mode "reduce-overhead" = CUDA graphs) on CUDA, fullgraph when asked; on CPU dynamo with the
    "eager" backend (tracing checked, no C++ build), forced on since generate compiles on accelerators only."""
    from transformers.generation.configuration_utils import CompileConfig

    if device == "cuda":
        return CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
    cc = CompileConfig(fullgraph=fullgraph, backend="eager", mode=None)
    cc._compile_all_devices = True
    return cc


def generate_s(model, ids: torch.Tensor, new_tokens: int, device: str, cc=None) -> float:
    """Seconds of one greedy generate() of exactly `new_tokens` tokens per row (static cache and compiled
    decode when cc, a CompileConfig, is given)."""
    kw = dict(cache_implementation="static", compile_config=cc) if cc is not None else {}
    with torch.no_grad():
        seconds, out = wall(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw),
                            device)
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                           f"{(ids.shape[0], ids.shape[1] + new_tokens)}")
    return seconds


def forward_s(model, ids: torch.Tensor, device: str) -> float:
    """Seconds of one forward over ids without a cache, last position's logits only (a prefill)."""
    with torch.no_grad():
        return wall(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device)[0]


def first_experts_output(model, ids: torch.Tensor) -> torch.Tensor:
    """Output of the first experts module in a forward over ids (its input is the same for every experts
    implementation, so this compares the implementations directly; the logits of a random-init model hardly
    depend on the experts)."""
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    seen = []
    handle = experts.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().float()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[0]
