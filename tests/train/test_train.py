"""Stage 2 (symphony.train): router-only and full training of tiny MoE checkpoints on CPU."""
import pytest
import torch
from safetensors.torch import load_file

from symphony.errors import SymphonyError
from symphony.evaluate import perplexity
from symphony.train import RouterTrainingConfig, load_balancing_loss, router_parameters, train_router

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=1,
            tie_word_embeddings=False)
CONFIGS = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, head_dim=8, mlp_only_layers=[0])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
}


def tiny_moe(path, tokenizer, arch="qwen2_moe", seed=0):
    """A tiny MoE checkpoint whose routers matter: brief full training, then experts 2 and 3 of every layer
    turned into loud noise and random routers that send tokens to them."""
    import transformers
    from transformers import AutoModelForCausalLM

    from symphony.testing import domain_text, train_steps

    cls, extra = CONFIGS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(vocab_size=len(tokenizer), **TINY, **extra))
    train_steps(model, tokenizer, domain_text("prose", 300), steps=40, seed=seed, seq_len=32)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.down_proj[2:] *= 30
                layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text():
    from symphony.testing import domain_text

    return "\n".join(domain_text("prose", 300))


@pytest.fixture(scope="module")
def tokenizer(text):
    from symphony.testing import make_tokenizer

    return make_tokenizer([text], vocab_size=300)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer):
    return tiny_moe(tmp_path_factory.mktemp("moe") / "qwen2moe", tokenizer)


def cfg(**kw):
    return RouterTrainingConfig(**{**dict(steps=30, lr=3e-2, batch_size=4, seq_len=32, log_every=10), **kw})


def weights(path):
    return load_file(path / "model.safetensors")


def test_router_training_changes_only_routers_and_lowers_the_loss(moe_dir, tmp_path, text, tokenizer):
    from symphony.data import load_model

    summary = train_router(moe_dir, [text], cfg(), tmp_path / "out")
    before, after = weights(moe_dir), weights(tmp_path / "out")
    assert before.keys() == after.keys()
    routers = {k for k in before if k.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))}
    assert len(routers) == 4
    for k in before:
        assert torch.equal(before[k], after[k]) == (k not in routers), k
    assert summary["last_loss"] < summary["first_loss"] - 0.3
    assert summary["tokens"] == 30 * 4 * 32 and summary["trainable_params"] == 2 * (4 * 32 + 32)
    load = torch.tensor(summary["expert_load"])
    assert load.shape == (2, 4) and torch.allclose(load.sum(1), torch.ones(2))
    assert load[:, 2:].sum() < 0.5  # the routers learnt to avoid the noisy experts
    ppl = [perplexity(load_model(d), tokenizer, [text], seq_len=32, progress=False)["ppl"]
           for d in (moe_dir, tmp_path / "out")]
    assert ppl[1] < 0.8 * ppl[0]
    assert not (tmp_path / "out.checkpoints").exists()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_full_training_changes_everything(moe_dir, tmp_path, text):
    summary = train_router(moe_dir, [text], cfg(steps=4, train="full", lr=1e-3), tmp_path / "out")
    before, after = weights(moe_dir), weights(tmp_path / "out")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert summary["trainable_params"] == sum(v.numel() for v in before.values())


def test_aux_loss_coefficient_pulls_towards_balance(moe_dir, tmp_path, text):
    def imbalance(coef):
        load = torch.tensor(train_router(moe_dir, [text], cfg(aux_loss_coef=coef), tmp_path / str(coef))["expert_load"])
        return (load - 0.25).abs().max().item()

    assert imbalance(2.0) < imbalance(0.0) - 0.1


def test_load_balancing_loss_is_the_switch_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    # one layer: transformers' loss equals ours times top_k
    assert torch.allclose(load_balancing_loss([logits], 2) * 2, load_balancing_loss_func((logits,), 6, 2))
    # by hand: E * sum_i f_i P_i, f from top-2 assignments
    probs = logits.softmax(-1)
    f = torch.zeros(6).index_add_(0, probs.topk(2).indices.flatten(), torch.ones(100)) / 100
    assert torch.allclose(load_balancing_loss([logits], 2), 6 * (f * probs.mean(0)).sum())
    # a uniform router gives 1; layers are averaged
    assert load_balancing_loss([torch.zeros(8, 4)], 2).item() == pytest.approx(1.0)
    assert torch.allclose(load_balancing_loss([logits, -logits], 2),
                          (load_balancing_loss([logits], 2) + load_balancing_loss([-logits], 2)) / 2)


def test_resume_matches_an_uninterrupted_run(moe_dir, tmp_path, text, monkeypatch):
    import symphony.train.loop as train

    straight = train_router(moe_dir, [text], cfg(steps=8, checkpoint_every=4), tmp_path / "a")

    real_step = train._train_step

    def crash_at_step_6(model, batch, optimizer, params, config, step, *args):
        if step == 6:
            raise KeyboardInterrupt
        return real_step(model, batch, optimizer, params, config, step, *args)

    monkeypatch.setattr(train, "_train_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_router(moe_dir, [text], cfg(steps=8, checkpoint_every=4), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "b.checkpoints").iterdir()] == ["step-000000004"]
    monkeypatch.setattr(train, "_train_step", real_step)

    with pytest.raises(SymphonyError, match="lr="):
        train_router(moe_dir, [text], cfg(steps=8, checkpoint_every=4, lr=1e-2), tmp_path / "b", resume=True)
    resumed = train_router(moe_dir, [text], cfg(steps=8, checkpoint_every=4), tmp_path / "b", resume=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    assert not (tmp_path / "b.checkpoints").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_other_architectures(arch, tmp_path, text, tokenizer):
    src = tiny_moe(tmp_path / arch, tokenizer, arch)
    from transformers import AutoModelForCausalLM

    names = set(router_parameters(AutoModelForCausalLM.from_pretrained(src)))
    layers = [1] if arch == "qwen3_moe" else [0, 1]
    assert names == {f"model.layers.{i}.mlp.gate.weight" for i in layers}
    summary = train_router(src, [text], cfg(steps=3), tmp_path / "out")
    assert len(summary["expert_load"]) == len(layers)
    before, after = weights(src), weights(tmp_path / "out")
    changed = {k for k in before if not torch.equal(before[k], after[k])}  # Mixtral's files say block_sparse_moe
    assert {k.replace("block_sparse_moe", "mlp") for k in changed} == names


def test_steps_zero_copies_the_model_and_out_dir_may_be_the_input(moe_dir, tmp_path, text):
    import shutil

    (moe_dir / "alignment_report.json").write_text("{}")
    try:
        assert train_router(moe_dir, [text], cfg(steps=0), tmp_path / "copy")["steps"] == 0
        assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in moe_dir.iterdir())
        shutil.copytree(moe_dir, tmp_path / "inplace")
        train_router(tmp_path / "inplace", [text], cfg(steps=2), tmp_path / "inplace")
        assert (tmp_path / "inplace" / "alignment_report.json").is_file()  # the build's other files are kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "inplace"]  # no temporary folder left
    finally:
        (moe_dir / "alignment_report.json").unlink()


@pytest.mark.parametrize("kw, match", [
    (dict(steps=-1), "steps must be >= 0"), (dict(steps=2.5), "steps must be an integer"),
    (dict(lr=0), "lr must be > 0"), (dict(lr="fast"), "lr must be a number"), (dict(train="all"), "train must be"),
    (dict(warmup=1.0), "warmup must be >= 0 and < 1"), (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(seq_len=1), "seq_len must be >= 2"), (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(dtype="fp8"), "dtype must be"), (dict(grad_clip=float("nan")), "grad_clip must be a number"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RouterTrainingConfig(**kw)


def test_config_reads_yaml_numbers():
    assert RouterTrainingConfig(lr="1e-3").lr == 1e-3  # PyYAML reads 1e-3 as a string


def test_bad_input(moe_dir, tmp_path, text):
    with pytest.raises(SymphonyError, match="model folder not found"):
        train_router(tmp_path / "missing", [text], cfg(), tmp_path / "out")
    with pytest.raises(SymphonyError, match="every text given is empty"):
        train_router(moe_dir, ["", "  \n"], cfg(), tmp_path / "out")
    with pytest.raises(SymphonyError, match="fewer than seq_len=32"):
        train_router(moe_dir, ["one two"], cfg(), tmp_path / "out")
    with pytest.raises(TypeError, match="RouterTrainingConfig"):
        train_router(moe_dir, [text], {"steps": 3}, tmp_path / "out")
    if not torch.cuda.is_available():
        with pytest.raises(SymphonyError, match="no usable CUDA device"):
            train_router(moe_dir, [text], cfg(device="cuda"), tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_bfloat16_trains_float32_routers_and_keeps_the_rest_exact(moe_dir, tmp_path, text):
    """The mixed-precision path used on GPUs (frozen weights in bf16, fp32 router masters, autocast), on the CPU."""
    summary = train_router(moe_dir, [text], cfg(steps=10, dtype="bfloat16"), tmp_path / "out")
    before, after = weights(moe_dir), weights(tmp_path / "out")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("gate.weight") for k in changed)
    assert all(v.dtype == torch.float32 for v in after.values())  # saved in the checkpoint's own dtype
    assert summary["last_loss"] < summary["first_loss"]


@pytest.mark.gpu
def test_router_training_on_gpu(moe_dir, tmp_path, text):
    summary = train_router(moe_dir, [text], cfg(device="cuda"), tmp_path / "out")
    before, after = weights(moe_dir), weights(tmp_path / "out")
    assert {k for k in before if not torch.equal(before[k], after[k])} == {
        k for k in before if k.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))}
    assert summary["last_loss"] < summary["first_loss"] - 0.3
