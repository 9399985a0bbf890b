"""symphony.SymphonyMoE: forward/backward against a float64 reference, the load-balancing loss, bad input,
SymphonyMoE.from_hf on transformers' Qwen2-MoE, Qwen3-MoE and Mixtral blocks, torch.compile."""
import pytest
import torch
import transformers

from symphony import SymphonyMoE
import symphony_kernels
from symphony_kernels.reference import ACTIVATIONS, moe_experts_reference, route_reference, scores_reference

D, F, E = 32, 64, 4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference_forward(moe: SymphonyMoE, x: torch.Tensor, ids=None):
    """(output, x leaf, {name: parameter leaf}) of `moe`'s semantics in float64, on copies of its parameters.
    With `ids`, the reference uses these expert choices (its weights are still its own scores at those ids)."""
    params = {n: p.detach().double().requires_grad_() for n, p in moe.named_parameters()}
    xs = x.detach().double().requires_grad_()
    flat = xs.reshape(-1, moe.hidden_size)
    logits = flat @ params["router.weight"].t()
    weights, own_ids = route_reference(logits, moe.top_k, moe.scoring, moe.renormalize)
    if ids is not None:
        weights = scores_reference(logits, moe.scoring).gather(1, ids.long())
        if moe.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        ids = own_ids
    out = moe_experts_reference(flat, params["gate_up_proj"], params["down_proj"], weights, ids, moe.activation)
    if moe.shared_expert is not None:
        act = ACTIVATIONS[moe.activation]
        w = {n: params[f"shared_expert.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
        s = act(flat @ w["gate_proj"].t()) * (flat @ w["up_proj"].t())
        gate = torch.sigmoid(flat @ params["shared_expert_gate.weight"].t())
        out = out + gate * (s @ w["down_proj"].t())
    out = out.reshape(x.shape)
    return out, xs, params


def check_against_reference(moe, x, tol=1e-5, same_ids=False):
    """Output and every gradient of `moe` against the float64 reference. `same_ids`: the reference takes the
    experts `moe` chose (for half precision, where rounded logits may flip near-ties)."""
    x = x.clone().requires_grad_()
    out, logits = moe(x, return_router_logits=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ids = symphony_kernels.route(logits.detach(), moe.top_k, scoring=moe.scoring).topk_ids if same_ids else None
    ref, xs, params = reference_forward(moe, x, ids)
    (ref * g.double()).sum().backward()
    assert rel(out, ref) < tol
    assert rel(x.grad, xs.grad) < tol
    for name, p in moe.named_parameters():
        assert rel(p.grad, params[name].grad) < tol, name


@pytest.mark.parametrize("kw", [
    dict(top_k=2),
    dict(top_k=1, scoring="sigmoid", renormalize=False),
    dict(top_k=E, activation="gelu"),
    dict(top_k=2, renormalize=False, shared_expert_size=48),
], ids=["softmax-k2", "sigmoid-k1", "gelu-kE", "shared"])
def test_forward_backward_matches_float64_reference(kw):
    torch.manual_seed(0)
    top_k = kw.pop("top_k")
    moe = SymphonyMoE(D, F, E, top_k, init_std=0.2, **kw)
    # 39 tokens: with k = 2, 78 (token, slot) pairs, past the kernels' decode path (<= 64 pairs).
    check_against_reference(moe, torch.randn(3, 13 if top_k == 2 else 5, D))


def test_non_contiguous_input_and_zero_tokens():
    torch.manual_seed(1)
    moe = SymphonyMoE(D, F, E, 2, init_std=0.2)
    check_against_reference(moe, torch.randn(D, 9).t())
    empty = moe(torch.zeros(2, 0, D))
    assert empty.shape == (2, 0, D)


def test_router_logits_and_load_balancing_loss():
    from symphony.train import load_balancing_loss

    torch.manual_seed(2)
    moe = SymphonyMoE(D, F, E, 2, init_std=0.2)
    x = torch.randn(4, 5, D)
    out, logits = moe(x, return_router_logits=True)
    assert torch.equal(out, moe(x))
    assert logits.shape == (20, E)
    torch.testing.assert_close(logits, x.reshape(-1, D) @ moe.router.weight.t())
    loss = moe.load_balancing_loss(logits)
    torch.testing.assert_close(loss, load_balancing_loss([logits], 2))
    loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    # Uniform routing is perfectly balanced: loss 1; everything on one expert: loss E.
    torch.testing.assert_close(moe.load_balancing_loss(torch.zeros(8, E)), torch.tensor(1.0))
    skewed = torch.tensor([[30.0, 20.0, 0.0, 0.0]]).repeat(8, 1)
    assert moe.load_balancing_loss(skewed).item() == pytest.approx(E / 2, rel=1e-4)
    assert moe.load_balancing_loss(torch.zeros(0, E)).item() == 0.0
    sig = SymphonyMoE(D, F, E, 2, scoring="sigmoid")
    torch.testing.assert_close(sig.load_balancing_loss(torch.zeros(8, E)), torch.tensor(1.0))


def test_init_repr_and_bad_arguments():
    torch.manual_seed(3)
    moe = SymphonyMoE(256, 128, 8, 2, shared_expert_size=64, dtype=torch.float16)
    assert moe.gate_up_proj.shape == (8, 256, 256) and moe.down_proj.shape == (8, 256, 128)
    assert moe.router.weight.shape == (8, 256) and moe.router.bias is None
    assert all(p.dtype == torch.float16 for p in moe.parameters())
    assert moe.gate_up_proj.float().std().item() == pytest.approx(0.02, rel=0.05)
    assert "num_experts=8, top_k=2" in repr(moe) and "shared_expert_size=64" in repr(moe)
    for args, kw in [((D, F, E, E + 1), {}), ((D, F, E, 0), {}), ((D, 0, E, 1), {}),
                     ((D, F, E, 2), {"scoring": "relu"}), ((D, F, E, 2), {"activation": "tanh"}),
                     ((D, F, E, 2), {"router_jitter_noise": 1.5}), ((D, F, E, 2), {"shared_expert_size": -1}),
                     ((D, F, E, 2.0), {})]:
        with pytest.raises(ValueError):
            SymphonyMoE(*args, **kw)
    with pytest.raises(TypeError):
        SymphonyMoE(D, F, E, 2, dtype=torch.int32)
    moe = SymphonyMoE(D, F, E, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        moe(torch.randn(3, D + 1))
    with pytest.raises(TypeError, match="autocast"):
        moe(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(TypeError):
        moe(torch.arange(D))
    with pytest.raises(ValueError):
        moe.load_balancing_loss(torch.zeros(3, E + 1))


def test_autocast_runs_experts_in_autocast_dtype():
    torch.manual_seed(4)
    moe = SymphonyMoE(D, F, E, 2, init_std=0.2)
    x = torch.randn(6, D)
    with torch.autocast("cpu", dtype=torch.float16):
        out = moe(x)
    assert out.dtype == torch.float32
    assert rel(out, moe(x)) < 1e-2
    out.sum().backward()
    assert moe.gate_up_proj.grad is not None and moe.gate_up_proj.grad.dtype == torch.float32


# ---- from_hf -------------------------------------------------------------------------------------------------

def hf_block(arch: str, seed: int = 0, **overrides):
    """A tiny transformers MoE block (d 32, f 64, E 4, top-2) with weights large enough to route decisively."""
    common = dict(hidden_size=D, num_experts_per_tok=2, hidden_act="silu")
    if arch == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        cfg = transformers.Qwen2MoeConfig(num_experts=E, moe_intermediate_size=F, shared_expert_intermediate_size=48,
                                          **common)
    elif arch == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = transformers.Qwen3MoeConfig(num_experts=E, moe_intermediate_size=F, norm_topk_prob=True, **common)
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = transformers.MixtralConfig(num_local_experts=E, intermediate_size=F, **common)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_from_hf_shares_weights_and_reproduces_the_block(arch):
    block = hf_block(arch)
    moe = SymphonyMoE.from_hf(block)
    assert moe.gate_up_proj is block.experts.gate_up_proj and moe.down_proj is block.experts.down_proj
    assert moe.router.weight is block.gate.weight
    assert moe.renormalize == (arch != "qwen2_moe")  # Qwen2-MoE's norm_topk_prob defaults to False
    assert (moe.shared_expert is not None) == (arch == "qwen2_moe")
    x = torch.randn(2, 5, D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = moe(xa), block(xb)
    assert rel(ours, theirs) < 1e-5
    g = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * g).sum(), [xa] + list(block.parameters()))
    theirs_grads = torch.autograd.grad((theirs * g).sum(), [xb] + list(block.parameters()))
    for a, b in zip(ours_grads, theirs_grads):
        assert rel(a, b) < 1e-5
    # Shared weights: a change to the block is a change to the module.
    with torch.no_grad():
        block.experts.down_proj.mul_(2)
        block.gate.weight.neg_()
    assert rel(moe(x), block(x)) < 1e-5


def test_from_hf_mixtral_jitter_and_gelu():
    block = hf_block("mixtral", router_jitter_noise=0.1, hidden_act="gelu")
    moe = SymphonyMoE.from_hf(block.eval())
    assert moe.router_jitter_noise == pytest.approx(0.1) and moe.activation == "gelu" and not moe.training
    x = torch.randn(6, 1, D)
    assert rel(moe(x), block(x)) < 1e-5
    moe.train()
    torch.manual_seed(0)
    a = moe(x)
    assert not torch.allclose(a, moe(x))  # jitter is on in training


def test_from_hf_refuses_what_it_cannot_represent():
    with pytest.raises(TypeError, match="Qwen2MoeSparseMoeBlock"):
        SymphonyMoE.from_hf(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="activation"):
        SymphonyMoE.from_hf(hf_block("qwen3_moe", hidden_act="gelu_pytorch_tanh"))
    block = hf_block("qwen3_moe")
    block.experts.has_bias = True
    with pytest.raises(ValueError, match="bias"):
        SymphonyMoE.from_hf(block)


def test_torch_compile_traces_through_the_custom_ops():
    torch.manual_seed(5)
    moe = SymphonyMoE(D, F, E, 2, init_std=0.2)
    x = torch.randn(8, D, requires_grad=True)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, moe(x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and moe.gate_up_proj.grad is not None


# ---- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shared", [0, 96])
def test_gpu_bf16_against_float64_reference(shared):
    torch.manual_seed(6)
    moe = SymphonyMoE(256, 384, 8, 2, shared_expert_size=shared, init_std=0.05, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 100, 256, device="cuda", dtype=torch.bfloat16)
    check_against_reference(moe, x, tol=1e-2, same_ids=True)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_gpu_from_hf_bf16(arch):
    block = hf_block(arch).to("cuda", torch.bfloat16)
    moe = SymphonyMoE.from_hf(block)
    x = torch.randn(3, 40, D, device="cuda", dtype=torch.bfloat16)
    assert rel(moe(x), block(x)) < 2e-2


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_bf16():
    torch.manual_seed(7)
    moe = SymphonyMoE(256, 384, 8, 2, init_std=0.05, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(moe, fullgraph=True)(x)
    assert rel(out, moe(x)) < 1e-2
    out.float().square().sum().backward()
    assert torch.isfinite(moe.down_proj.grad).all()


def test_beyond_the_kernels_limits_runs_plain_pytorch_with_a_warning():
    from symphony_kernels.reference import moe_experts_reference, route_reference

    with pytest.warns(UserWarning, match="beyond the kernels' limits"):
        moe = SymphonyMoE(8, 4, 1025, 2)
    assert not moe.on_kernels
    x = torch.randn(5, 8)
    w, ids = route_reference(moe.router(x), 2)
    expected = moe_experts_reference(x, moe.gate_up_proj, moe.down_proj, w, ids)
    assert torch.allclose(moe(x), expected, atol=1e-6)
