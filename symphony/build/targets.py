"""The output architectures of a build, one small class each: the MoE config made from the sources' config, and
the saved name of every MoE tensor of a layer.

qwen2 sources -> Qwen2MoeForCausalLM, qwen3 -> Qwen3MoeForCausalLM, llama / mistral -> MixtralForCausalLM.
Every layer is an MoE layer; the top-k routing weights are renormalised to sum to 1 (`norm_topk_prob`;
Mixtral always does), so an MoE made of N identical sources computes the dense model's function whatever its
routers say. Qwen2-MoE's shared expert is disabled by giving it 0 neurons (zero-size tensors: it loads, adds 0
and costs nothing) unless `shared_expert: mean` asks for the mean of the aligned FFNs (its gate
`shared_expert_gate` then starts at 0, i.e. a factor sigmoid(0) = 0.5).

Checkpoint layout: "per_expert" (default) writes what transformers' own `save_pretrained` writes and what the
hub's MoE checkpoints hold (`mlp.experts.{e}.gate_proj.weight`..., Mixtral `block_sparse_moe.experts.{e}.w1`
...); transformers fuses them into `gate_up_proj` [E, 2f, d] / `down_proj` [E, d, f] on load. "fused" writes
transformers' in-memory layout directly (`mlp.experts.gate_up_proj` = cat(gate, up) per expert).
"""
from __future__ import annotations

import torch

from symphony.errors import SymphonyError

TARGETS = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "llama": "MixtralForCausalLM",
           "mistral": "MixtralForCausalLM"}


def unsupported(config) -> str | None:
    """Why a source config cannot become its family's MoE target, or None when it can."""
    family = config.model_type
    if family == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return "Llama sources with attention_bias or mlp_bias cannot become Mixtral (it has no biases)"
    if getattr(config, "mlp_bias", False):
        return f"{family} sources with FFN biases are not supported"
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types)
    if family == "qwen3" and sliding:
        return "Qwen3 sources with sliding-window layers are not supported (Qwen3-MoE has no per-layer types)"
    return None


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


class _Target:
    """One output architecture: `config_class` (a transformers config class name), `architecture_kwargs` (the
    config fields of this architecture) and `mlp_names` (the saved MoE tensors of one layer)."""

    architecture = ""
    config_class = ""
    expert_files = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    block = "mlp."        # where the router and the per-expert tensors of a layer are saved
    shared_expert = False

    def architecture_kwargs(self, c, *, num_experts: int, expert_size: int, shared_expert_size: int) -> dict:
        raise NotImplementedError

    def mlp_names(self, layer: int, num_experts: int, layout: str) -> list[tuple[str, str, int | None, str]]:
        """(saved name, kind, expert, part) of every MoE tensor of one layer. kind: router, expert, fused,
        shared, shared_gate."""
        p = f"model.layers.{layer}."
        if layout == "fused":
            out = [(p + "mlp.gate.weight", "router", None, ""),
                   (p + "mlp.experts.gate_up_proj", "fused", None, "gate_up"),
                   (p + "mlp.experts.down_proj", "fused", None, "down")]
        else:
            block = p + self.block
            out = [(block + "gate.weight", "router", None, "")]
            for e in range(num_experts):
                out += [(f"{block}experts.{e}.{self.expert_files[part]}.weight", "expert", e, part)
                        for part in ("gate", "up", "down")]
        if self.shared_expert:
            out += [(f"{p}mlp.shared_expert.{part}_proj.weight", "shared", None, part) for part in ("gate", "up", "down")]
            out.append((p + "mlp.shared_expert_gate.weight", "shared_gate", None, ""))
        return out


class _QwenMoe(_Target):
    def architecture_kwargs(self, c, *, num_experts, expert_size, shared_expert_size):
        return dict(num_experts=num_experts, moe_intermediate_size=expert_size, intermediate_size=c.intermediate_size,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                    use_sliding_window=bool(getattr(c, "use_sliding_window", False)),
                    sliding_window=getattr(c, "sliding_window", None))


class Qwen2Moe(_QwenMoe):
    architecture, config_class, shared_expert = "Qwen2MoeForCausalLM", "Qwen2MoeConfig", True

    def architecture_kwargs(self, c, *, num_experts, expert_size, shared_expert_size):
        return super().architecture_kwargs(c, num_experts=num_experts, expert_size=expert_size,
                                           shared_expert_size=shared_expert_size) | dict(
            shared_expert_intermediate_size=shared_expert_size, qkv_bias=True,
            max_window_layers=getattr(c, "max_window_layers", c.num_hidden_layers),
            layer_types=getattr(c, "layer_types", None))


class Qwen3Moe(_QwenMoe):
    architecture, config_class = "Qwen3MoeForCausalLM", "Qwen3MoeConfig"

    def architecture_kwargs(self, c, *, num_experts, expert_size, shared_expert_size):
        return super().architecture_kwargs(c, num_experts=num_experts, expert_size=expert_size,
                                           shared_expert_size=shared_expert_size) | dict(
            head_dim=_head_dim(c), attention_bias=bool(getattr(c, "attention_bias", False)))


class Mixtral(_Target):
    architecture, config_class = "MixtralForCausalLM", "MixtralConfig"
    expert_files = {"gate": "w1", "up": "w3", "down": "w2"}
    block = "block_sparse_moe."

    def architecture_kwargs(self, c, *, num_experts, expert_size, shared_expert_size):
        return dict(num_local_experts=num_experts, intermediate_size=expert_size, router_jitter_noise=0.0,
                    head_dim=_head_dim(c),
                    sliding_window=getattr(c, "sliding_window", None) if c.model_type == "mistral" else None)


ARCHITECTURES = {t.architecture: t for t in (Qwen2Moe(), Qwen3Moe(), Mixtral())}


def target_of(config) -> _Target:
    """The output architecture of a target config (by its model_type)."""
    return {"qwen2_moe": ARCHITECTURES["Qwen2MoeForCausalLM"], "qwen3_moe": ARCHITECTURES["Qwen3MoeForCausalLM"],
            "mixtral": ARCHITECTURES["MixtralForCausalLM"]}[config.model_type]


def target_config(anchor_config, *, num_experts: int, top_k: int, expert_size: int, shared_expert_size: int,
                  vocab_size: int, dtype: torch.dtype, max_position_embeddings: int):
    """The MoE config for sources like `anchor_config` (all layers sparse, top-k weights renormalised)."""
    import transformers

    c = anchor_config
    why = unsupported(c)
    if why:
        raise SymphonyError(why)
    target = ARCHITECTURES[TARGETS[c.model_type]]
    kw = dict(vocab_size=vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
              num_attention_heads=c.num_attention_heads,
              num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
              hidden_act=c.hidden_act, max_position_embeddings=max_position_embeddings,
              initializer_range=getattr(c, "initializer_range", 0.02), rms_norm_eps=c.rms_norm_eps,
              tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
              rope_parameters=getattr(c, "rope_parameters", None),
              attention_dropout=getattr(c, "attention_dropout", 0.0), bos_token_id=c.bos_token_id,
              eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
              num_experts_per_tok=top_k, output_router_logits=False)
    kw.update(target.architecture_kwargs(c, num_experts=num_experts, expert_size=expert_size,
                                         shared_expert_size=shared_expert_size))
    config = getattr(transformers, target.config_class)(**kw)
    config.architectures = [target.architecture]
    config.dtype = dtype
    return config
