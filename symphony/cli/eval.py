"""`symphony eval`: perplexity of a causal LM on text files (symphony.evaluate.perplexity)."""
from __future__ import annotations

import argparse
import math

from symphony.cli.model_options import add_model_options, check_model_options
from symphony.data import check_seq_len, load_config, load_model, load_tokenizer, read_texts, write_json
from symphony.evaluate import perplexity

HELP = "perplexity of a model on text files"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="model folder (a transformers causal LM with its tokenizer)")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files, one result each")
    add_model_options(parser, json_help="also write the results as JSON to OUT")


def run(args) -> int:
    check_model_options(args)
    texts = read_texts(args.text)
    check_seq_len(load_config(args.model), args.seq_len)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    results = {path: perplexity(model, tokenizer, [text], seq_len=args.seq_len, batch_size=args.batch_size)
               for path, text in zip(args.text, texts)}
    tokens = sum(r["tokens"] for r in results.values())
    nll = sum(r["nll"] * r["tokens"] for r in results.values()) / tokens
    overall = {"nll": nll, "ppl": math.exp(nll), "tokens": tokens}

    width = max(len("all files"), *map(len, results))
    print(f"{'file':<{width}}  {'tokens':>9}  {'NLL':>7}  {'PPL':>9}")
    for name, r in [*results.items(), *([("all files", overall)] if len(results) > 1 else [])]:
        print(f"{name:<{width}}  {r['tokens']:>9}  {r['nll']:>7.4f}  {r['ppl']:>9.3f}")
    if args.json is not None:
        write_json(args.json, {"model": str(args.model), "seq_len": args.seq_len, "batch_size": args.batch_size,
                               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                               "files": results, "all": overall})
    return 0
