"""The options that `symphony eval` and `symphony inspect` share (a model folder, windows, device, dtype, JSON),
and their checks before any heavy work."""
from __future__ import annotations

import argparse
from pathlib import Path

from symphony.data import check_model_dir, checkpoint_files, resolve_device, resolve_dtype
from symphony.errors import SymphonyError
from symphony.outputs import check_output_file


def add_model_options(parser: argparse.ArgumentParser, *, json_help: str):
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                                        "bfloat16, float16")
    parser.add_argument("--json", metavar="OUT", help=json_help)


def check_model_options(args) -> Path:
    """The model folder, once the numbers, the device, the dtype and the JSON output (which must not replace
    the model's files or a text input) are known to be usable."""
    if args.seq_len < 2 or args.batch_size < 1:
        raise SymphonyError("--seq-len must be at least 2 and --batch-size at least 1")
    model_dir = check_model_dir(args.model)
    resolve_dtype(args.dtype, resolve_device(args.device))
    if args.json is not None:
        check_output_file(args.json, checkpoint_files(model_dir) + [("text file", t) for t in args.text or []])
    return model_dir
