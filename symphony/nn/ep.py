"""Expert parallelism: a `SymphonyMoE` whose experts are split over the ranks of a torch.distributed group.

`ExpertParallelMoE(moe, group)`: of the group's W ranks, rank r keeps experts [r*E/W, (r+1)*E/W) (E must be a
multiple of W); the router and the shared expert are replicated. Each rank passes its own tokens x [..., d]:

1. routing on the rank's tokens (`symphony_kernels.route`: top-k ids and float32 weights);
2. the (token, slot) pairs, sorted by the rank that owns their expert (`symphony_kernels.dispatch` over W
   "experts", stable, so each rank's pairs stay in (token, slot) order), are sent there with
   `all_to_all_single`: first the counts, then the pairs' hidden states and local expert ids;
3. the received pairs run on the local experts through `symphony_kernels.moe_experts`, one pair per row with
   weight 1;
4. the results come back by the reverse `all_to_all_single`, are put back in (token, slot) order and combined
   on the token's rank: out[t] = sum_j w[t, j] * y[t, j] in float32, slots in order, plus the shared expert.

The routing weights never leave their rank, so the gradient of the router is local. Forward and backward:
the hidden states travel through `torch.distributed.all_to_all_single` inside an autograd Function whose
backward is the reverse exchange (torch.distributed.nn.functional's differentiable one is deprecated in torch
2.13), so the gradient of every pair's result flows back to the rank and token it came from. Equal to the
one-process `SymphonyMoE` (float32 within 1e-5, tests/nn/test_ep.py), with uneven loads and ranks that
receive no pair (their experts' gradients are exact zeros).

Gradients: rank r's expert weights get the gradient of the *sum* of every rank's loss (each rank's backward
sends its pairs' gradients back to the expert's owner); the replicated router and shared expert get the
gradient of the rank's own loss. With data-parallel training that averages replicated gradients over the W
ranks (DDP, FSDP), divide the expert gradients by W as well (or scale the loss) to train the mean loss.

transformers' expert-parallel hooks (transformers 5: `DistributedConfig(enable_expert_parallel=True)` with the
model's `base_model_ep_plan`: `ep_router`, `grouped_gemm`, `moe_tp_experts` in
transformers.distributed.tensor_parallel) do not fit this layer: they assume every rank of the group holds the
*same* tokens (the router runs replicated, `EpRouterParallel` masks the non-local experts' slots to a sentinel
id, each rank runs its local experts over the whole batch and the partial outputs are summed with an
all-reduce of [T, d]). That is tensor parallelism over experts: no token moves, and it cannot be combined with
data parallelism where each rank has its own batch, which is what an all_to_all dispatch is for. The
transformers integration does fit as the local compute of that plan: the "symphony" experts implementation
(symphony.nn.hf) treats the sentinel ids (outside [0, E_local)) as dropped pairs, as transformers' grouped_mm
does: `from_pretrained(path, experts_implementation="symphony", distributed_config=DistributedConfig(
enable_expert_parallel=True, tp_plan="auto"))` under torchrun gives the one-process logits (tests/nn/test_ep.py;
transformers needs the accelerate package to load with a tp_plan, and the test is skipped without it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import symphony_kernels as sk
from symphony.nn.moe import SymphonyMoE


def _all_to_all(rows: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send), ...] out, split by `send` over the ranks; rows [sum(recv), ...] in. The backward is the
    reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, rows, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(rows, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class ExpertParallelMoE(nn.Module):
    """`moe`'s layer with its experts split over `group` (default: the world); see the module docstring.

    The router, shared expert and settings are `moe`'s own modules (shared, not copied); this rank's experts
    are copies of its slice of `moe.gate_up_proj` / `moe.down_proj` (`moe` may then be dropped). `moe` must be
    the same on every rank. `forward(x, return_router_logits=False)` and `load_balancing_loss` behave as
    SymphonyMoE's, on this rank's tokens."""

    def __init__(self, moe: SymphonyMoE, group=None):
        super().__init__()
        if not isinstance(moe, SymphonyMoE):
            raise TypeError(f"moe must be a SymphonyMoE, not {type(moe).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group")
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if moe.num_experts % self.world:
            raise ValueError(f"num_experts={moe.num_experts} is not a multiple of the group's {self.world} ranks")
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "scoring", "renormalize",
                     "activation", "shared_expert_size", "router_jitter_noise"):
            setattr(self, name, getattr(moe, name))
        self.num_local_experts = moe.num_experts // self.world
        self.first_expert = self.rank * self.num_local_experts
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        self.router = moe.router
        self.gate_up_proj = nn.Parameter(moe.gate_up_proj.detach()[local].clone(),
                                         requires_grad=moe.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(moe.down_proj.detach()[local].clone(), requires_grad=moe.down_proj.requires_grad)
        self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
        self.train(moe.training)

    def extra_repr(self) -> str:
        last = self.first_expert + self.num_local_experts
        return (f"num_experts={self.num_experts}, local experts [{self.first_expert}, {last}) on rank {self.rank} "
                f"of {self.world}, top_k={self.top_k}")

    load_balancing_loss = SymphonyMoE.load_balancing_loss
    _prepare, _finish = SymphonyMoE._prepare, SymphonyMoE._finish

    def _exchange(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        return _AllToAll.apply(rows, send, recv, self.group)

    def forward(self, hidden_states: torch.Tensor, return_router_logits: bool = False):
        # 1. checks, jitter, compute dtype and routing as SymphonyMoE's
        shape, x, xc, (gate_up, down), router_logits = self._prepare(hidden_states)
        plan = sk.route(router_logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize)
        k = self.top_k

        # 2. pairs to their expert's rank, in (destination, token, slot) order
        owner = torch.div(plan.topk_ids, self.num_local_experts, rounding_mode="floor").to(torch.int32)
        counts, _, order = sk.dispatch(owner, self.world)
        order = order.long()
        send_counts = counts.to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        local_ids = (plan.topk_ids.reshape(-1)[order] % self.num_local_experts).to(torch.int32)
        rows = self._exchange(xc.index_select(0, torch.div(order, k, rounding_mode="floor")), send, recv)
        ids = self._exchange(local_ids, send, recv)

        # 3. the local experts, one pair per row
        ones = torch.ones(ids.shape[0], 1, dtype=torch.float32, device=x.device)
        y = sk.moe_experts(rows, gate_up, down, ones, ids[:, None], activation=self.activation)

        # 4. back to the pairs' ranks, in (token, slot) order, combined in float32
        back = self._exchange(y, recv, send)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        pairs = back.index_select(0, inverse)
        out = (plan.topk_weights.float()[..., None] * pairs.view(-1, k, self.hidden_size).float()).sum(1)
        return self._finish(out.to(x.dtype), x, shape, router_logits, return_router_logits)
