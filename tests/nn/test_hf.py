"""transformers integration: experts_implementation="symphony" and symphony.patch on tiny Qwen2-MoE, Qwen3-MoE and
Mixtral checkpoints give eager's logits, generations and gradients, with the experts on symphony's kernels."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import symphony
import symphony_kernels

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=0,
            eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
ARCHS = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=64, head_dim=8, mlp_only_layers=[0],
                                         norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, intermediate_size=64)),
}


def save_tiny(path, arch, seed=0, **overrides):
    cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**TINY, **extra, **overrides})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_moe")
    return {arch: save_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of symphony_kernels.moe_experts (the experts implementation calls it by attribute)."""
    calls = []
    real = symphony_kernels.moe_experts

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(symphony_kernels, "moe_experts", spy)
    return calls


def ids(batch=2, length=9, seed=0):
    return torch.randint(2, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def load(path, impl, **kw):
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl, **kw)


def assert_grads_equal(a, b, rtol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        err = ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_symphony_matches_eager(tiny, arch, device, kernel_calls):
    """float32: the same logits, greedy generations and gradients as transformers' eager experts."""
    eager, ours = load(tiny[arch], "eager").to(device), load(tiny[arch], "symphony").to(device)
    assert ours.config._experts_implementation == "symphony"
    x = ids(2, 20).to(device)  # 80 (token, slot) pairs: the kernels' prefill path; generate() takes the decode path
    with torch.no_grad():
        expected, got = eager(x).logits, ours(x).logits
    moe_layers = 1 if arch == "qwen3_moe" else 2
    assert len(kernel_calls) == moe_layers
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5

    prompt = ids(1, 4, seed=1).to(device)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert torch.equal(ours.generate(prompt, **gen), eager.generate(prompt, **gen))

    x = ids(1, 10, seed=2).to(device)  # Triton's CPU interpreter is slow: a short sequence for training
    for model in (eager, ours):
        model.train()
        out = model(x, labels=x, output_router_logits=True)
        (out.loss + 0.01 * out.aux_loss).backward()
    assert_grads_equal(ours, eager)
    assert ours.model.layers[-1].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_import_symphony_is_enough(tiny):
    """`import symphony` imports neither torch nor transformers, yet from_pretrained(experts_implementation=
    "symphony") works after it."""
    code = (
        "import sys, symphony\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import symphony is not lazy'\n"
        "assert 'symphony_kernels.experts' not in sys.modules\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny['qwen3_moe'])!r}, experts_implementation='symphony')\n"
        "assert m.config._experts_implementation == 'symphony'\n"
        "assert 'symphony_kernels.experts' not in sys.modules\n"
        "m(torch.tensor([[2, 3, 4]]))\n"
        "assert 'symphony_kernels.experts' in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_patch_and_unpatch(tiny, kernel_calls):
    model = load(tiny["mixtral"], "eager")
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    assert symphony.patch(model) is model
    assert model.config._experts_implementation == "symphony"
    with torch.no_grad():
        got = model(x).logits
    assert len(kernel_calls) == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert symphony.unpatch(model) is model
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        model(x)
    assert len(kernel_calls) == 2


def test_patch_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        symphony.patch(torch.nn.Linear(2, 2))
    dense = AutoModelForCausalLM.from_config(transformers.Qwen2Config(**{**TINY, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="no experts modules"):
        symphony.patch(dense)
    path = save_tiny(tmp_path / "tanh", "qwen3_moe", hidden_act="gelu_pytorch_tanh")
    with pytest.raises(ValueError, match="GELUTanh|activation"):
        symphony.patch(load(path, "eager"))


def test_experts_problem_names_what_the_kernels_cannot_run(tiny):
    from symphony.nn.hf import experts_problem

    experts = load(tiny["qwen3_moe"], "eager").model.layers[1].mlp.experts
    assert experts_problem(experts) is None
    for attr, value, words in [("has_bias", True, "biases"), ("has_gate", False, "no gate"),
                               ("is_transposed", True, "transposed"), ("is_concatenated", False, "interleaved")]:
        setattr(experts, attr, value)
        assert words in experts_problem(experts)
        setattr(experts, attr, not value)  # back to the default
    experts.__class__ = type("CustomGate", (type(experts),), {"_apply_gate": lambda self, gate_up: gate_up})
    assert "gating function" in experts_problem(experts)


def test_kernel_limits_and_function_activations(tmp_path):
    """More than 1024 experts or top-32 is named as the limit (and patch refuses); an act_fn stored as the
    function F.silu / F.gelu (Lfm2-MoE) is recognised."""
    import torch.nn.functional as F

    from symphony.nn.hf import experts_activation, experts_problem

    model = load(save_tiny(tmp_path / "wide", "qwen3_moe", num_experts=1025, hidden_size=8, head_dim=4,
                           moe_intermediate_size=4), "eager")
    experts = model.model.layers[1].mlp.experts
    assert "1025 experts, more than the kernels' limit of 1024" in experts_problem(experts)
    with pytest.raises(ValueError, match="kernels' limit"):
        symphony.patch(model)
    experts = load(save_tiny(tmp_path / "deep", "qwen3_moe", num_experts=40, num_experts_per_tok=33), "eager") \
        .model.layers[1].mlp.experts
    assert "top-32" in experts_problem(experts)
    del experts.act_fn  # a submodule here; Lfm2-MoE keeps a plain function
    for fn, name in ((F.silu, "silu"), (F.gelu, "gelu")):
        experts.act_fn = fn
        assert experts_activation(experts) == name
    experts.act_fn = torch.tanh
    assert "tanh is not SiLU" in experts_problem(experts)


def test_unsupported_experts_fall_back_to_eager_with_a_warning(tmp_path, kernel_calls, monkeypatch):
    import symphony.nn.hf

    monkeypatch.setattr(symphony.nn.hf, "_warned", set())  # warned once per class and process
    path = save_tiny(tmp_path / "tanh", "qwen3_moe", hidden_act="gelu_pytorch_tanh")
    eager, ours = load(path, "eager"), load(path, "symphony")
    x = ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = ours(x).logits
    assert not kernel_calls
    assert any("runs transformers' eager experts" in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.equal(got, eager(x).logits)


def test_torch_compile_fullgraph_through_the_experts_implementation(tiny, kernel_calls):
    model = load(tiny["qwen3_moe"], "symphony").eval()
    block = model.model.layers[1].mlp
    h = torch.randn(1, 6, TINY["hidden_size"])
    with torch.no_grad():
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(h)
        assert ((compiled - block(h)).norm() / block(h).norm()).item() < 1e-6
    assert kernel_calls


# ---- GPU ---------------------------------------------------------------------------------------------------------

def logits_and_grads(model, x):
    """The logits (float32) and the parameter gradients of one training step's LM loss."""
    model.train()
    model.zero_grad()
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def relative_errors(model, reference, x):
    """{"logits" or parameter name: relative error} of `model`'s training step against `reference`'s."""
    (logits, grads), (ref_logits, ref_grads) = logits_and_grads(model, x), logits_and_grads(reference, x)
    errors = {"logits": ((logits - ref_logits).norm() / ref_logits.norm()).item()}
    for name, g in ref_grads.items():
        errors[name] = ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("arch", list(ARCHS))
def test_gpu_bf16_symphony_as_accurate_as_eager(tiny, arch, kernel_calls):
    """In bf16, symphony's logits and gradients are as close to a float32 eager run as bf16 eager's are
    (expert choices may flip on near-ties in either, so both are measured against float32)."""
    reference = load(tiny[arch], "eager", dtype=torch.float32).cuda()
    eager = load(tiny[arch], "eager", dtype=torch.bfloat16).cuda()
    ours = load(tiny[arch], "symphony", dtype=torch.bfloat16).cuda()
    x = ids(4, 64).cuda()
    theirs, mine = relative_errors(eager, reference, x), relative_errors(ours, reference, x)
    assert kernel_calls
    for name, err in mine.items():
        assert err <= 2 * theirs[name] + 1e-2, f"{name}: symphony {err:.2e}, eager {theirs[name]:.2e}"
    out = ours.eval().generate(x[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 16)


@pytest.mark.gpu
def test_gpu_inductor_compiled_model_bf16(tiny):
    model = load(tiny["mixtral"], "symphony", dtype=torch.bfloat16).cuda().eval()
    x = ids(2, 32).cuda()
    with torch.no_grad():
        expected = model(x).logits.float()
        got = torch.compile(model)(x).logits.float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_moe_block_captures_in_a_cuda_graph(tiny, tokens):
    """The experts forward has no host syncs: a Qwen3-MoE block captures in a CUDA graph, at a decode step
    (1 token) and past the kernels' decode path (64 tokens, 128 pairs: with the dispatch sort)."""
    model = load(tiny["qwen3_moe"], "symphony", dtype=torch.bfloat16).cuda().eval()
    block = model.model.layers[-1].mlp
    x = torch.randn(1, tokens, TINY["hidden_size"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = block(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            block(x)  # warm-up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, block(x))
    assert not torch.equal(out, expected)
