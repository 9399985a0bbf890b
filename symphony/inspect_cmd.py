"""`symphony inspect`: what a built model is, how it routes a text, and how its experts were aligned.

Expert load is the fraction of routed (token, expert) assignments that go to each expert of each MoE layer:
every token picks its top-k experts by router logit, as the model does, and each row sums to 1 (a uniform
router gives 1/num_experts everywhere). When the build recorded which source each expert came from
(`expert_sources`, a list with one source name per expert, in `alignment_report.json`), the load is also
summed per source.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from symphony.data import (batches, check_model_dir, check_output_file, load_config, load_model, load_tokenizer,
                           quiet_zero_size_init, read_texts, resolve_device, resolve_dtype, token_stream, write_json)
from symphony.errors import SymphonyError

HELP = "summarise a built model: config, expert load, alignment report"
REPORT = "alignment_report.json"


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
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SymphonyError(f"cannot read {path}: {e}") from e


def source_load(load: torch.Tensor, sources: list[str]) -> dict[str, list[float]]:
    """Per source name, its experts' summed load in every layer."""
    if len(sources) != load.shape[1]:
        raise SymphonyError(f"{REPORT} names {len(sources)} expert sources for {load.shape[1]} experts")
    return {s: load[:, [i for i, t in enumerate(sources) if t == s]].sum(1).tolist() for s in dict.fromkeys(sources)}


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def _print_report(obj, indent: str = ""):
    """Print JSON in a readable form: scalars as `key: value`, lists of flat records as tables."""
    for key, value in obj.items():
        records = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        if records and all(not isinstance(x, (dict, list)) for v in value for x in v.values()):
            header = list(dict.fromkeys(k for v in value for k in v))
            print(f"{indent}{key}:")
            print("\n".join(indent + "  " + line for line in
                            _table(header, [[v.get(k, "") for k in header] for v in value]).splitlines()))
        elif isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_report(value, indent + "  ")
        else:
            print(f"{indent}{key}: {_scalar(value)}")


def _scalar(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(_scalar, value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="model folder (a transformers checkpoint, e.g. the output of `symphony build`)")
    parser.add_argument("--text", nargs="+", metavar="FILE", help="measure the expert load on these text files")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                                        "bfloat16, float16")
    parser.add_argument("--json", metavar="OUT", help="also write everything shown as JSON to OUT")


def run(args) -> int:
    if args.seq_len < 2 or args.batch_size < 1:
        raise SymphonyError("--seq-len must be at least 2 and --batch-size at least 1")
    model_dir = check_model_dir(args.model)
    resolve_dtype(args.dtype, resolve_device(args.device))
    if args.json:
        check_output_file(args.json)
    summary = config_summary(model_dir)
    report = read_report(model_dir)
    texts = read_texts(args.text) if args.text else None
    if texts:
        moe_shape(load_config(model_dir))
    result = {"model": str(model_dir), "config": summary}

    print(f"{model_dir}")
    _print_report(summary, "  ")
    if texts:
        model = load_model(model_dir, device=args.device, dtype=args.dtype)
        load = expert_load(model, load_tokenizer(model_dir), texts, seq_len=args.seq_len, batch_size=args.batch_size)
        result["expert_load"] = load.tolist()
        print(f"\nexpert load on {', '.join(args.text)} (% of routed assignments; uniform = "
              f"{100 / load.shape[1]:.1f}%)")
        print(_table(["layer"] + [f"e{i}" for i in range(load.shape[1])],
                     [[i] + [f"{100 * v:.1f}" for v in row] for i, row in enumerate(load.tolist())]))
        if report and report.get("expert_sources"):
            per_source = source_load(load, report["expert_sources"])
            result["source_load"] = per_source
            print("\nload per source (%)")
            print(_table(["layer"] + list(per_source),
                         [[i] + [f"{100 * v[i]:.1f}" for v in per_source.values()] for i in range(load.shape[0])]
                         + [["mean"] + [f"{100 * sum(v) / len(v):.1f}" for v in per_source.values()]]))
    if report is not None:
        result["alignment_report"] = report
        print(f"\n{REPORT}")
        _print_report(report, "  ")
    if args.json:
        write_json(args.json, result)
    return 0
