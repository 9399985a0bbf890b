"""`symphony build`: build a Symphony-MoE checkpoint from dense sources (symphony.build.pipeline)."""
from __future__ import annotations

import argparse
from pathlib import Path

from symphony.build.config import load_config
from symphony.build.pipeline import build
from symphony.build.report import format_summary

HELP = "build a Symphony-MoE checkpoint from dense sources (YAML config)"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("config", help="build config (YAML; see examples/build.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder (a model folder "
                        "or an empty one), and remove what killed builds of it left behind")
    parser.add_argument("--device", help="override the config's device: auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="run stage 2 on N processes of this machine (one per GPU; FSDP2 data parallel)")


def run(args) -> int:
    cfg = load_config(args.config)
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    if args.device:
        cfg.device = args.device
        cfg.router_training.device = args.device
    summary = build(cfg, args.out, force=args.force, progress=not args.quiet, inputs={"the config": Path(args.config)},
                    nproc=args.nproc)
    print(format_summary(summary))
    return 0
