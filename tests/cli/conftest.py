"""Fixtures of the command tests: a small Qwen2-MoE checkpoint with its tokenizer, and text files."""
import pytest
import torch


@pytest.fixture(scope="session")
def texts():
    from symphony.testing import domain_text

    return {d: "\n".join(domain_text(d, 40)) for d in ("prose", "code")}


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, texts):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from symphony.testing import make_tokenizer

    tokenizer = make_tokenizer(list(texts.values()), vocab_size=300)
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, bos_token_id=0,
                            eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)  # routers that prefer some experts
    path = tmp_path_factory.mktemp("moe") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def files(tmp_path, texts):
    paths = []
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        paths.append(tmp_path / f"{name}.txt")
    return paths
