"""Measurements of a causal LM that the commands share: perplexity, expert load (routing), and a checkpoint's
config summary and build report.

Perplexity: the text is cut into non-overlapping windows of `seq_len` tokens (symphony.data); inside each
window every token after the first is predicted from the ones before it, so the NLL is the token-weighted mean
over all predicted tokens and the perplexity is exp(NLL). Window starts get no context from the previous
window: a shorter `seq_len` gives a higher perplexity.

Expert load is the fraction of routed (token, expert) assignments that go to each expert of each MoE layer:
every token picks its top-k experts by router logit, as the model does, and each row sums to 1 (a uniform
router gives 1/num_experts everywhere). When the build recorded which source each expert came from
(`expert_sources`, a list with one source name per expert, in `alignment_report.json`), the load is also
summed per source.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from symphony.data import batches, load_config, quiet_zero_size_init, token_stream
from symphony.errors import SymphonyError

REPORT = "alignment_report.json"


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32) of windows `ids` [b, s] under `logits` [b, s, V]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


@torch.no_grad()
def perplexity(model, tokenizer, texts, *, seq_len: int = 512, batch_size: int = 8, progress: bool = True) -> dict:
    """{"nll": mean NLL per predicted token, "ppl": exp(nll), "tokens": predicted tokens} of `model` on `texts`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(batches(token_stream(tokenizer, texts), seq_len, batch_size), desc="eval", unit="batch",
                        disable=not progress, leave=False):
            if ids.shape[1] < 2:
                continue
            ids = ids.to(device)
            total += nll_sum(model(input_ids=ids, use_cache=False).logits, ids).item()
            count += ids.numel() - ids.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise SymphonyError("the text is a single token: nothing to predict")
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count}


def route_counts(router_logits, top_k: int, num_experts: int) -> torch.Tensor:
    """[layers, experts] counts of top-k assignments, from a model's per-layer router logits [tokens, experts]."""
    return torch.stack([torch.bincount(logits.detach().topk(top_k, dim=-1).indices.flatten().cpu(),
                                       minlength=num_experts) for logits in router_logits])


def moe_shape(config) -> tuple[int, int]:
    """(num_experts, top_k) of an MoE config; a SymphonyError for a dense model."""
    num_experts, top_k = getattr(config, "num_experts", None), getattr(config, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise SymphonyError(f"{type(config).__name__} is not a mixture-of-experts model: it has no experts to route")
    return num_experts, top_k


@torch.no_grad()
def expert_load(model, tokenizer, texts, *, seq_len: int = 512, batch_size: int = 8,
                progress: bool = True) -> torch.Tensor:
    """[MoE layers, experts] fraction of routed assignments per expert of `model` on `texts` (rows sum to 1)."""
    num_experts, top_k = moe_shape(model.config)
    device = next(model.parameters()).device
    counts = 0
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(batches(token_stream(tokenizer, texts), seq_len, batch_size), desc="routing", unit="batch",
                        disable=not progress, leave=False):
            out = model(input_ids=ids.to(device), output_router_logits=True, use_cache=False)
            counts = counts + route_counts(out.router_logits, top_k, num_experts)
    finally:
        model.train(was_training)
    return counts.double().div(counts.sum(dim=1, keepdim=True)).float()


def config_summary(model_dir) -> dict:
    """Architecture, sizes, experts and parameter counts (total; active per token) of the checkpoint's config."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir)
    with torch.device("meta"), quiet_zero_size_init():
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    summary = {"architecture": (config.architectures or [type(model).__name__])[0],
               "model_type": config.model_type, "dtype": str(config.dtype).removeprefix("torch."),
               "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
               "vocab_size": config.vocab_size, "params": total, "active_params": total}
    blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    if blocks:
        num_experts, top_k = moe_shape(config)
        expert_params = sum(p.numel() for b in blocks for p in b.experts.parameters())
        summary.update(moe_layers=len(blocks), experts=num_experts, top_k=top_k,
                       expert_intermediate_size=getattr(config, "moe_intermediate_size", None)
                       or config.intermediate_size,
                       active_params=total - expert_params * (num_experts - top_k) // num_experts)
        if getattr(config, "shared_expert_intermediate_size", 0):
            summary["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    return summary


def read_report(model_dir) -> dict | None:
    path = Path(model_dir) / REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SymphonyError(f"cannot read {path}: {e}") from e
    if not isinstance(report, dict):
        raise SymphonyError(f"{path} is not a build report (a JSON object), but a {type(report).__name__}")
    sources = report.get("expert_sources")
    if sources is not None and not (isinstance(sources, list) and all(isinstance(s, str) for s in sources)):
        raise SymphonyError(f"{path}: expert_sources must be a list of source names, not {sources!r}")
    return report


def source_load(load: torch.Tensor, sources: list[str]) -> dict[str, list[float]]:
    """Per source name, its experts' summed load in every layer."""
    if len(sources) != load.shape[1]:
        raise SymphonyError(f"{REPORT} names {len(sources)} expert sources for {load.shape[1]} experts")
    return {s: load[:, [i for i, t in enumerate(sources) if t == s]].sum(1).tolist() for s in dict.fromkeys(sources)}
