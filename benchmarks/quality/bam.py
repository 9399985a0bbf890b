"""BAM (Branch-Attend-Mix; Zhang et al. 2024, arXiv 2408.08274) built from the family's sources, as the Symphony
paper reproduces it: FFN experts plus attention experts for the Q and O projections, every other weight averaged.

No transformers class has attention experts, so this is a model of its own (a plain nn.Module; the sources must
be Qwen2 checkpoints, which is what the study's families are):
- embeddings, lm_head, every RMSNorm, the K and V projections (weights and biases): the mean of the sources;
- attention: one expert per source with that source's Q projection (weight and bias) and O projection, and K/V
  shared (BAM's KV-sharing variant); a random router (normal, std = initializer_range) weighs the experts' outputs
  by its softmax over all experts (BAM's soft routing of attention experts);
- FFN: one expert per source (its gate/up/down), a random router, top-k of the softmax renormalised to sum 1
  (as the pipeline's MoE outputs).
BAM's parallel attention/FFN block is not used: the sources are sequential (pre-norm) transformers, and so is
this model. forward(input_ids, output_router_logits=False, use_cache=None) returns an object with `logits` and
`router_logits` (the FFN routers' [tokens, experts] logits per layer), which is what metrics.py and
posttrain.py read; `config` carries num_experts and num_experts_per_tok for them.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import (Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb,
                                                      repeat_kv)


class ExpertAttention(nn.Module):
    """Soft mixture of attention experts with their own Q and O projections and a shared K/V."""

    def __init__(self, c, num_experts: int):
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        d, q = c.hidden_size, self.heads * self.head_dim
        self.router = nn.Linear(d, num_experts, bias=False)
        self.q_weight = nn.Parameter(torch.empty(num_experts, q, d))
        self.q_bias = nn.Parameter(torch.zeros(num_experts, q))
        self.o_weight = nn.Parameter(torch.empty(num_experts, d, q))
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        weights = self.router(x).float().softmax(-1).to(x.dtype)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = repeat_kv(self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2),
                      self.heads // self.kv_heads)
        out, k_rot = 0, None
        for e in range(self.q_weight.shape[0]):
            q = F.linear(x, self.q_weight[e], self.q_bias[e]).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            q, k_e = apply_rotary_pos_emb(q, k, cos, sin)
            if k_rot is None:
                k_rot = repeat_kv(k_e, self.heads // self.kv_heads)
            a = F.scaled_dot_product_attention(q, k_rot, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
            out = out + weights[..., e:e + 1] * F.linear(a, self.o_weight[e])
        return out


class ExpertFFN(nn.Module):
    """Top-k routed SwiGLU experts (one per source)."""

    def __init__(self, c, num_experts: int, top_k: int):
        super().__init__()
        d, f = c.hidden_size, c.intermediate_size
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, f, d))
        self.up_proj = nn.Parameter(torch.empty(num_experts, f, d))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d, f))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = logits.float().softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        top = (top / top.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.gate_proj.shape[0]):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            h = x[rows]
            h = F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
            out.index_add_(0, rows, h * top[rows, slot, None])
        return out.view(shape), logits


class BamModel(nn.Module):
    """The BAM mixture (module docstring); `from_sources` fills it from dense Qwen2 state dicts."""

    def __init__(self, c, num_experts: int, top_k: int):
        super().__init__()
        self.config = SimpleNamespace(num_experts=num_experts, num_experts_per_tok=top_k, source=c)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList()
        for _ in range(c.num_hidden_layers):
            layer = nn.Module()
            layer.input_layernorm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
            layer.self_attn = ExpertAttention(c, num_experts)
            layer.post_attention_layernorm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
            layer.mlp = ExpertFFN(c, num_experts, top_k)
            self.layers.append(layer)
        self.norm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, output_router_logits: bool = False, use_cache=None, **_):
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        cos, sin = self.rotary_emb(x, positions)
        router_logits = []
        for layer in self.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
            h, logits = layer.mlp(layer.post_attention_layernorm(x))
            x = x + h
            router_logits.append(logits)
        logits = self.lm_head(self.norm(x))
        return SimpleNamespace(logits=logits, router_logits=tuple(router_logits) if output_router_logits else None)

    def active_saving(self) -> int:
        """Parameters a token does not use: the FFN experts beyond top-k (attention experts are all used)."""
        mlp = self.layers[0].mlp
        per_expert = mlp.gate_proj[0].numel() + mlp.up_proj[0].numel() + mlp.down_proj[0].numel()
        return len(self.layers) * (mlp.gate_proj.shape[0] - mlp.top_k) * per_expert

    @classmethod
    def from_sources(cls, config, states: list[dict], *, top_k: int = 2, seed: int = 0) -> "BamModel":
        """BAM from the sources' state dicts (one expert per source, in order); routers random from `seed`."""
        n = len(states)
        model = cls(config, n, top_k)
        mean = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
        gen = torch.Generator().manual_seed(seed)
        std = getattr(config, "initializer_range", 0.02)
        with torch.no_grad():
            model.embed_tokens.weight.copy_(mean["model.embed_tokens.weight"])
            model.norm.weight.copy_(mean["model.norm.weight"])
            model.lm_head.weight.copy_(mean["lm_head.weight"] if "lm_head.weight" in mean
                                       else mean["model.embed_tokens.weight"])
            for i, layer in enumerate(model.layers):
                p = f"model.layers.{i}."
                layer.input_layernorm.weight.copy_(mean[p + "input_layernorm.weight"])
                layer.post_attention_layernorm.weight.copy_(mean[p + "post_attention_layernorm.weight"])
                att = layer.self_attn
                for name in ("k_proj", "v_proj"):
                    getattr(att, name).weight.copy_(mean[p + f"self_attn.{name}.weight"])
                    getattr(att, name).bias.copy_(mean[p + f"self_attn.{name}.bias"])
                att.q_weight.copy_(torch.stack([s[p + "self_attn.q_proj.weight"].float() for s in states]))
                att.q_bias.copy_(torch.stack([s[p + "self_attn.q_proj.bias"].float() for s in states]))
                att.o_weight.copy_(torch.stack([s[p + "self_attn.o_proj.weight"].float() for s in states]))
                att.router.weight.copy_(torch.randn(att.router.weight.shape, generator=gen) * std)
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(layer.mlp, name).copy_(torch.stack([s[p + f"mlp.{name}.weight"].float() for s in states]))
                layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=gen) * std)
        return model.eval()
