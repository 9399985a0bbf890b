"""pytest-benchmark suite of the MoE kernels (GPU only; no timing assertions).

    python -m pytest benchmarks/test_bench_moe.py --benchmark-only [--benchmark-json out.json]

Each benchmark synchronises the device inside the timed call, so the numbers include launch overhead; the
comparison table against transformers and the roofline floor is benchmarks/bench_moe.py.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = {"qwen2-0.5b-x4": (896, 4864, 4, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}


def _problem(shape, T, grad=False):
    d, f, E, k = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
    gu = (torch.randn(E, 2 * f, d, device="cuda", dtype=torch.bfloat16, generator=g) / d ** 0.5).requires_grad_(grad)
    dn = (torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16, generator=g) / f ** 0.5).requires_grad_(grad)
    logits = torch.randn(T, E, device="cuda", generator=g)
    return x, gu, dn, logits


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("T", [1, 4096])
def test_experts_forward(benchmark, name, T):
    import symphony_kernels as sk

    x, gu, dn, logits = _problem(SHAPES[name], T)
    plan = sk.route(logits, SHAPES[name][3])
    with torch.no_grad():
        out = benchmark(_synced(lambda: sk.moe_experts(x, gu, dn, plan.topk_weights, plan.topk_ids, plan=plan)))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SHAPES))
def test_experts_forward_backward(benchmark, name):
    import symphony_kernels as sk

    x, gu, dn, logits = _problem(SHAPES[name], 2048, grad=True)
    logits.requires_grad_()

    def step():
        plan = sk.route(logits, SHAPES[name][3])
        out = sk.moe_experts(x, gu, dn, plan.topk_weights, plan.topk_ids, plan=plan)
        out.float().square().mean().backward()
        return out

    benchmark(_synced(step))
    assert torch.isfinite(logits.grad).all() and torch.isfinite(gu.grad).all()


@pytest.mark.parametrize("E,k", [(8, 2), (128, 8)])
@pytest.mark.parametrize("T", [4096, 65536])
def test_route(benchmark, E, k, T):
    import symphony_kernels as sk

    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    plan = benchmark(_synced(lambda: sk.route(logits, k)))
    assert int(plan.expert_counts.sum()) == T * k
