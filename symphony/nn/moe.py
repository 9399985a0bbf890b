"""`SymphonyMoE`: a Mixture-of-Experts layer (router + SwiGLU experts) on the Symphony kernels, as an nn.Module.

Semantics, for input x of shape [..., d] flattened to [N, d]:
- router_logits = x @ router.weight.T (no bias), [N, E];
- `symphony_kernels.route`: scores = softmax (or sigmoid) of the logits in float32, the top-k experts (ties to
  the lower id), their scores renormalised to sum 1 when `renormalize`;
- out[t] = sum_j w[t, j] * down_proj[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t, j], through
  `symphony_kernels.moe_experts` (gate_up_proj [E, 2f, d] holds the gate rows then the up rows, down_proj
  [E, d, f]: the layout of transformers' Qwen2MoeExperts, Qwen3MoeExperts and MixtralExperts);
- with a shared expert (`shared_expert_size` > 0, as in Qwen2-MoE): out += sigmoid(x @ shared_expert_gate.T)
  * down_s @ (act(gate_s @ x) * (up_s @ x)).
The output has x's shape and dtype. Under torch.autocast, the experts run in the autocast dtype (the
parameters are cast, gradients flow back to them); otherwise x must have the parameters' dtype.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from symphony_kernels._runtime import MAX_EXPERTS, MAX_TOP_K
from symphony.nn.cast import compute_dtype_cast
from symphony_kernels.reference import (ACTIVATIONS, SCORINGS, moe_experts_reference, route_reference,
                                        scores_reference)


def _positive_int(name: str, value, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} integer, not {value!r}")
    return value


class SharedExpert(nn.Module):
    """A dense gated MLP, down(act(gate(x)) * up(x)), named like transformers' Qwen2MoeMLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class SymphonyMoE(nn.Module):
    """A routed MoE layer: `router` (nn.Linear d -> E, no bias), experts `gate_up_proj` [E, 2f, d] and
    `down_proj` [E, d, f], optionally a gated shared expert (`shared_expert`, `shared_expert_gate`).

    Args:
        hidden_size, intermediate_size, num_experts, top_k: d, f (per expert), E and k (1 <= k <= E).
        scoring: "softmax" or "sigmoid" routing scores; renormalize: divide the top-k scores by their sum.
        activation: "silu" (SwiGLU) or "gelu" (exact GELU) on the gate half.
        shared_expert_size: intermediate size of a Qwen2-MoE-style shared expert, whose output is scaled by
            sigmoid(shared_expert_gate(x)) and added to every token's output; 0 for none.
        router_jitter_noise: in training mode, multiply the input by uniform noise in [1 - j, 1 + j] before
            routing and experts (Mixtral's router jitter); 0 for none.
        init_std: the standard deviation of the normal initialisation of every weight (transformers'
            initializer_range default).

    `forward(x, return_router_logits=False)` maps [..., d] to [..., d]; with `return_router_logits=True` it
    returns (output, router_logits [N, E]), to feed `load_balancing_loss`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", renormalize: bool = True, activation: str = "silu",
                 shared_expert_size: int = 0, router_jitter_noise: float = 0.0, init_std: float = 0.02,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.intermediate_size = _positive_int("intermediate_size", intermediate_size)
        self.num_experts = _positive_int("num_experts", num_experts)
        self.top_k = _positive_int("top_k", top_k)
        self.shared_expert_size = _positive_int("shared_expert_size", shared_expert_size, zero_ok=True)
        if top_k > num_experts:
            raise ValueError(f"top_k must be at most num_experts={num_experts}, not {top_k}")
        self.on_kernels = num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K
        if not self.on_kernels:
            warnings.warn(f"SymphonyMoE: {num_experts} experts, top-{top_k} is beyond the kernels' limits "
                          f"({MAX_EXPERTS} experts, top-{MAX_TOP_K}); this layer runs plain PyTorch (correct, slow)",
                          stacklevel=2)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
        if not isinstance(renormalize, bool):
            raise TypeError(f"renormalize must be a bool, not {renormalize!r}")
        if not (isinstance(router_jitter_noise, (int, float)) and 0.0 <= router_jitter_noise < 1.0):
            raise ValueError(f"router_jitter_noise must be in [0, 1), not {router_jitter_noise!r}")
        if not (isinstance(init_std, (int, float)) and init_std >= 0 and math.isfinite(init_std)):
            raise ValueError(f"init_std must be a finite non-negative number, not {init_std!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")
        self.scoring, self.renormalize, self.activation = scoring, renormalize, activation
        self.router_jitter_noise = float(router_jitter_noise)
        self.init_std = float(init_std)

        d, f, E = hidden_size, intermediate_size, num_experts
        kw = dict(dtype=dtype, device=device)
        self.router = nn.Linear(d, E, bias=False, **kw)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, d, **kw))
        self.down_proj = nn.Parameter(torch.empty(E, d, f, **kw))
        if shared_expert_size:
            self.shared_expert = SharedExpert(d, shared_expert_size, activation, **kw)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False, **kw)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Every weight ~ N(0, init_std^2), as transformers initialises its MoE models."""
        for p in self.parameters():
            p.normal_(0.0, self.init_std)

    def extra_repr(self) -> str:
        s = (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
             f"num_experts={self.num_experts}, top_k={self.top_k}, scoring={self.scoring}, "
             f"renormalize={self.renormalize}, activation={self.activation}")
        if self.shared_expert_size:
            s += f", shared_expert_size={self.shared_expert_size}"
        if self.router_jitter_noise:
            s += f", router_jitter_noise={self.router_jitter_noise}"
        return s

    def forward(self, hidden_states: torch.Tensor, return_router_logits: bool = False):
        import symphony_kernels as sk

        shape, x, xc, (gate_up, down), router_logits = self._prepare(hidden_states)
        if not self.on_kernels:
            weights, ids = route_reference(router_logits, self.top_k, self.scoring, self.renormalize)
            out = moe_experts_reference(xc, gate_up.to(xc.dtype), down.to(xc.dtype), weights, ids, self.activation)
        else:
            plan = sk.route(router_logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize)
            out = sk.moe_experts(xc, gate_up, down, plan.topk_weights, plan.topk_ids, activation=self.activation,
                                 plan=plan)
        return self._finish(out.to(x.dtype), x, shape, router_logits, return_router_logits)

    def _prepare(self, hidden_states: torch.Tensor):
        """Checks, router jitter, the compute-dtype cast and the router logits of a forward (shared with
        symphony.nn.ep): (shape, x [N, d], x in the compute dtype, (gate_up, down), router_logits)."""
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            raise TypeError("hidden_states must be a floating-point tensor")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [..., {self.hidden_size}], "
                             f"not {tuple(hidden_states.shape)}")
        if hidden_states.device != self.gate_up_proj.device:
            raise ValueError(f"hidden_states are on {hidden_states.device} but the layer is on "
                             f"{self.gate_up_proj.device}")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if self.training and self.router_jitter_noise > 0:
            j = self.router_jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - j, 1.0 + j)
        xc, weights = compute_dtype_cast(x, self.gate_up_proj, self.down_proj)
        return shape, x, xc, weights, self.router(x)

    def _finish(self, out, x, shape, router_logits, return_router_logits: bool):
        """The routed experts' output `out` [N, d] plus the shared expert, in the input's shape."""
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        out = out.reshape(shape)
        return (out, router_logits) if return_router_logits else out

    def load_balancing_loss(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The Switch-Transformer auxiliary loss E * sum_i f_i * P_i of this layer (1 when perfectly balanced):
        f_i = fraction of the N*k routed (token, slot) pairs that go to expert i, P_i = mean over tokens of
        expert i's routing probability (the softmax; for sigmoid scoring the scores normalised to sum 1).
        Differentiable through P; a float32 scalar, 0 for N = 0. For softmax scoring it equals
        `symphony.train.load_balancing_loss([router_logits], top_k)`."""
        if router_logits.shape[-1] != self.num_experts:
            raise ValueError(f"router_logits must have shape [..., {self.num_experts}], "
                             f"not {tuple(router_logits.shape)}")
        logits = router_logits.reshape(-1, self.num_experts)
        if logits.shape[0] == 0:
            return logits.float().sum()
        probs = scores_reference(logits, self.scoring).float()
        if self.scoring == "sigmoid":
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        chosen = probs.detach().topk(self.top_k, dim=-1).indices
        fraction = F.one_hot(chosen, self.num_experts).sum((0, 1)).float() / chosen.numel()
        return self.num_experts * (fraction * probs.mean(0)).sum()

    @classmethod
    def from_hf(cls, block: nn.Module) -> "SymphonyMoE":
        """A SymphonyMoE that shares (does not copy) the weights of a transformers MoE block and reproduces its
        output: Qwen2MoeSparseMoeBlock (with its shared expert and shared_expert_gate), Qwen3MoeSparseMoeBlock,
        MixtralSparseMoeBlock. Routing settings are read from the block (Qwen's norm_topk_prob; Mixtral always
        renormalises, and its router jitter is kept). Training the SymphonyMoE trains the block's parameters.

        transformers' Qwen routers round the top-k weights to the logits' dtype before the experts; here they
        stay float32, so in half precision the outputs agree up to that rounding. Any other block, or a block
        whose experts use biases, no gate, another layout or an activation other than SiLU/GELU, raises a
        TypeError/ValueError saying why.
        """
        from symphony.nn.hf import experts_activation, experts_problem, hf_moe_block_kind

        kind = hf_moe_block_kind(block)
        experts, gate = block.experts, block.gate
        problem = experts_problem(experts)
        if problem is not None:
            raise ValueError(f"SymphonyMoE.from_hf cannot represent {type(block).__name__}: {problem}")
        E, two_f, d = experts.gate_up_proj.shape
        top_k = int(gate.top_k)
        if gate.weight.shape != (E, d):
            raise ValueError(f"{type(block).__name__}.gate.weight has shape {tuple(gate.weight.shape)}, "
                             f"expected {(E, d)}")
        renormalize = True if kind == "mixtral" else bool(gate.norm_topk_prob)
        jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0) if kind == "mixtral" else 0.0
        activation = experts_activation(experts)
        shared_size = 0
        if kind == "qwen2_moe":
            shared = block.shared_expert
            for name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(shared, name).bias is not None:
                    raise ValueError(f"SymphonyMoE.from_hf: the shared expert's {name} has a bias")
            if block.shared_expert_gate.bias is not None:
                raise ValueError("SymphonyMoE.from_hf: the shared_expert_gate has a bias")
            if experts_activation(shared) != activation:
                raise ValueError("SymphonyMoE.from_hf: the shared expert's activation differs from the experts'")
            shared_size = shared.gate_proj.out_features

        moe = cls(d, two_f // 2, E, top_k, renormalize=renormalize, activation=activation,
                  shared_expert_size=shared_size, router_jitter_noise=jitter, device="meta")
        moe.router.weight = gate.weight
        moe.gate_up_proj = experts.gate_up_proj
        moe.down_proj = experts.down_proj
        if shared_size:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_expert, name).weight = getattr(block.shared_expert, name).weight
            moe.shared_expert_gate.weight = block.shared_expert_gate.weight
        return moe.train(block.training)
