"""`symphony eval`: perplexity of a causal LM on text files (symphony.evaluate.perplexity)."""
from __future__ import annotations

import argparse
import math

from symphony.data import (check_model_dir, check_seq_len, checkpoint_files, load_config, load_model, load_tokenizer,
                           read_texts, resolve_device, resolve_dtype, write_json)
from symphony.errors import SymphonyError
from symphony.evaluate import perplexity
from symphony.outputs import check_output_file

HELP = "perplexity of a model on text files"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="model folder (a transformers causal LM with its tokenizer)")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files, one result each")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                                        "bfloat16, float16")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")


def run(args) -> int:
    if args.seq_len < 2 or args.batch_size < 1:
        raise SymphonyError("--seq-len must be at least 2 and --batch-size at least 1")
    check_model_dir(args.model)
    resolve_dtype(args.dtype, resolve_device(args.device))
    if args.json is not None:
        check_output_file(args.json, checkpoint_files(args.model) + [("text file", t) for t in args.text])
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
