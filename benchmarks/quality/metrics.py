"""What the study measures on every contender: held-out loss per domain, exact match on held-out arithmetic
problems, and (for MoE models) which experts each domain's tokens are routed to.

- Loss: the mean next-token NLL per predicted token of a domain's test documents, cut into windows exactly as
  `symphony eval` does (symphony.data: documents joined by the end-of-text token, non-overlapping windows of
  `seq_len`, the rest as a last short window); perplexity = exp(loss).
- Exact match: for each held-out problem ("Problem: ...\\nAnswer: N"), greedy decoding after "Answer:" must
  produce exactly the answer's tokens and then the end-of-text token. This is checked in one forward pass over
  prompt + answer + end-of-text (argmax at every answer position equals the next gold token): greedy decoding
  reproduces the gold continuation if and only if every one of those argmaxes is right. Numbers have one
  tokenization with the family's tokenizer (digits are single tokens), so this is greedy decoding's exact match.
- Routing: the fraction of top-k assignments that go to each expert, per MoE layer, on each domain's test
  text (in the same forward pass as the loss), its mean over layers, and, when the build recorded which source
  each expert came from, the share per source.
"""
from __future__ import annotations

import math

import torch

from benchmarks.quality import mathgen


def _moe(model) -> tuple[int, int] | None:
    num_experts = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    return (num_experts, top_k) if num_experts and top_k else None


@torch.no_grad()
def domain_loss(model, tokenizer, docs: list[str], *, seq_len: int, batch_size: int) -> dict:
    """{"nll", "ppl", "tokens", and for an MoE "load": [layers][experts] routed fractions} on `docs`."""
    from symphony.data import batches, token_stream
    from symphony.evaluate import nll_sum
    from symphony.evaluate import route_counts

    device = next(model.parameters()).device
    moe = _moe(model)
    total, count, routed = 0.0, 0, None
    model.eval()
    for ids in batches(token_stream(tokenizer, docs), seq_len, batch_size):
        if ids.shape[1] < 2:
            continue
        ids = ids.to(device)
        out = model(input_ids=ids, use_cache=False, **({"output_router_logits": True} if moe else {}))
        total += nll_sum(out.logits, ids).item()
        count += ids.numel() - ids.shape[0]
        if moe:
            c = route_counts(out.router_logits, moe[1], moe[0])
            routed = c if routed is None else routed + c
    if count == 0:
        raise ValueError("no tokens to predict in the documents")
    result = {"nll": total / count, "ppl": math.exp(total / count), "tokens": count}
    if routed is not None:
        result["load"] = (routed.double() / routed.sum(1, keepdim=True)).tolist()
    return result


@torch.no_grad()
def exact_match(model, tokenizer, problem_docs: list[str], *, batch_size: int = 64) -> dict:
    """{"correct", "total", "em"}: greedy exact match on problem documents (see the module docstring)."""
    if not problem_docs:
        raise ValueError("no problems to score")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token")
    device = next(model.parameters()).device
    items = []
    for doc in problem_docs:
        prompt, answer = mathgen.split_problem(doc)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
        if full[:len(p_ids)] != p_ids:  # the prompt's last token merged with the answer: score the split form
            full = p_ids + tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        items.append((full + [eos], len(p_ids)))
    correct = 0
    model.eval()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        # right padding: a causal model's predictions at real positions never see the padding after them
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, (seq, _) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
        pred = model(input_ids=ids.to(device), use_cache=False).logits.argmax(-1).cpu()
        for row, (seq, n_prompt) in enumerate(chunk):
            # positions n_prompt-1 .. len-2 predict the answer tokens and the final end-of-text
            target = torch.tensor(seq[n_prompt:])
            correct += bool((pred[row, n_prompt - 1:len(seq) - 1] == target).all())
    return {"correct": correct, "total": len(items), "em": correct / len(items)}


def routing_summary(load: list[list[float]], expert_sources: list[str] | None) -> dict:
    """Mean load per expert over layers, and per source when `expert_sources` names each expert's source."""
    t = torch.tensor(load, dtype=torch.float64)
    out = {"mean_load": t.mean(0).tolist(), "max_load": t.max().item(), "min_load": t.min().item()}
    if expert_sources:
        if len(expert_sources) != t.shape[1]:
            raise ValueError(f"{len(expert_sources)} expert sources for {t.shape[1]} experts")
        out["source_share"] = {s: t[:, [i for i, x in enumerate(expert_sources) if x == s]].sum(1).mean().item()
                               for s in dict.fromkeys(expert_sources)}
    return out


def evaluate(model, tokenizer, test_docs: dict[str, list[str]], *, seq_len: int, batch_size: int,
             problems: list[str] | None = None, expert_sources: list[str] | None = None) -> dict:
    """Everything above for one model: {"loss": {domain: nll}, "tokens": {...}, "math_em": {...} | None,
    "routing": {domain: summary} | None}."""
    result = {"loss": {}, "tokens": {}, "math_em": None, "routing": None}
    for domain, docs in test_docs.items():
        r = domain_loss(model, tokenizer, docs, seq_len=seq_len, batch_size=batch_size)
        result["loss"][domain] = r["nll"]
        result["tokens"][domain] = r["tokens"]
        if "load" in r:
            result["routing"] = result["routing"] or {}
            result["routing"][domain] = routing_summary(r["load"], expert_sources) | {"load": r["load"]}
    if problems:
        result["math_em"] = exact_match(model, tokenizer, problems, batch_size=batch_size)
    return result
