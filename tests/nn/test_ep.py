"""ExpertParallelMoE (symphony.nn.ep): experts split over 2 gloo processes equal the one-process SymphonyMoE,
forward and backward, with uneven loads, a rank whose experts receive no pair and a rank without tokens."""
import pytest
import torch

from symphony import SymphonyMoE

CASES = {  # name: (tokens per rank, shared expert size, experts 2-3 (rank 1's) starved)
    "uneven": ((7, 3), 0, False),
    "shared expert": ((5, 4), 6, False),
    "rank 1 receives nothing": ((6, 5), 0, True),
    "rank 1 has no token": ((9, 0), 0, False),
}


def _layer(shared, starved):
    torch.manual_seed(0)
    moe = SymphonyMoE(16, 8, 4, 2, shared_expert_size=shared, init_std=0.3)
    if starved:
        with torch.no_grad():
            moe.router.weight[2:, 0] = -50.0  # inputs get x[:, 0] > 0: experts 2 and 3 never win
    return moe


def _inputs(counts, starved):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 16, generator=g)
    if starved:
        x[:, 0] = x[:, 0].abs() + 0.5
    return x, torch.randn(sum(counts), 16, generator=g)


def _worker(rank, world):
    import torch.distributed as dist

    from symphony.nn.ep import ExpertParallelMoE

    errors = {}
    for name, (counts, shared, starved) in CASES.items():
        moe = _layer(shared, starved)
        x, g = _inputs(counts, starved)
        xs = x.clone().requires_grad_(True)
        ref_out = moe(xs)
        (ref_out * g).sum().backward()

        ep = ExpertParallelMoE(_layer(shared, starved))
        lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
        xl = x[lo:hi].clone().requires_grad_(True)
        out, logits = ep(xl.view(1, -1, 16), return_router_logits=True)
        (out.view(-1, 16) * g[lo:hi]).sum().backward()
        router_grad = ep.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        local = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
        pairs = [(out.view(-1, 16), ref_out[lo:hi]), (xl.grad, xs.grad[lo:hi]), (router_grad, moe.router.weight.grad),
                 (ep.gate_up_proj.grad, moe.gate_up_proj.grad[local]), (ep.down_proj.grad, moe.down_proj.grad[local])]
        errors[name] = {"each": [(a - b).abs().max().item() if a.numel() else 0.0 for a, b in pairs], "max_error": max((a - b).abs().max().item() if a.numel() else 0.0 for a, b in pairs),
                        "expert_grad_abs": ep.gate_up_proj.grad.abs().sum().item() + ep.down_proj.grad.abs().sum().item(),
                        "logits_shape": tuple(logits.shape)}
    return errors


def test_expert_parallel_equals_one_process(gloo):
    results = gloo(_worker, 2)
    for rank, errors in enumerate(results):
        for name, (counts, _, starved) in CASES.items():
            e = errors[name]
            assert e["max_error"] < 1e-5, (rank, name, e)
            assert e["logits_shape"] == (counts[rank], 4)
            if starved and rank == 1:
                assert e["expert_grad_abs"] == 0.0  # no pair reached rank 1's experts: exact zeros
            else:
                assert e["expert_grad_abs"] > 0


def test_expert_parallel_needs_a_process_group():
    from symphony.nn.ep import ExpertParallelMoE

    with pytest.raises(RuntimeError, match="process group"):
        ExpertParallelMoE(SymphonyMoE(16, 8, 4, 2))
    with pytest.raises(TypeError, match="SymphonyMoE"):
        ExpertParallelMoE(torch.nn.Linear(2, 2))
