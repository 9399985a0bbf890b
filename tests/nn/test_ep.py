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
        each = [(a - b).abs().max().item() if a.numel() else 0.0 for a, b in pairs]
        errors[name] = {"each": each, "max_error": max(each),
                        "expert_grad_abs": (ep.gate_up_proj.grad.abs().sum() + ep.down_proj.grad.abs().sum()).item(),
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


def _hf_ep_worker(rank, world, path):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import symphony  # noqa: F401 - registers experts_implementation="symphony"

    one = AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm").eval()
    plan = DistributedConfig(enable_expert_parallel=True, tp_plan="auto")
    ep = AutoModelForCausalLM.from_pretrained(path, experts_implementation="symphony", distributed_config=plan).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))  # the same tokens on every rank
    with torch.no_grad():
        return {"local_experts": ep.model.layers[0].mlp.experts.num_experts,
                "max_error": (one(input_ids=ids).logits - ep(input_ids=ids).logits).abs().max().item()}


def test_transformers_expert_parallel_plan_runs_on_the_kernels(gloo, tmp_path):
    """transformers' own EP plan (replicated tokens, sentinel ids for other ranks' experts, all-reduced outputs)
    with the "symphony" experts implementation as the local compute. transformers needs accelerate to load a
    model with a tp_plan; without it this test is skipped."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    for result in gloo(_hf_ep_worker, 2, tmp_path / "moe"):
        assert result["local_experts"] == 2 and result["max_error"] < 1e-4
