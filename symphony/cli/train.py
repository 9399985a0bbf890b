"""`symphony train`: stage 2 on a built MoE, on one process or many (symphony.train).

One process runs symphony.train.train_router (what `symphony build` runs as its stage 2). Under torchrun
(`torchrun --nproc-per-node N -m symphony train ...`) every process runs symphony.train.distributed.train_fsdp;
`--nproc N` starts torchrun itself (symphony.train.launch). Settings come from the flags, over `--config FILE`
(a YAML mapping of stage-2 settings: the fields of build.yaml's `router_training` section), over the defaults.
The output is a transformers checkpoint written atomically, like build's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import yaml

from symphony.data import check_model_dir, checkpoint_files, read_texts, write_json
from symphony.errors import SymphonyError
from symphony.outputs import check_output_dir, check_output_file, output_path
from symphony.train.config import MODES, RouterTrainingConfig
from symphony.train.launch import check_nproc, launch, world_size

HELP = "stage 2 on a built MoE: train its routers or every parameter, on one or several processes"
# flag -> RouterTrainingConfig field
_FLAGS = {"train": "train", "steps": "steps", "lr": "lr", "batch_size": "batch_size", "seq_len": "seq_len",
          "seed": "seed", "checkpoint_every": "checkpoint_every", "device": "device", "dtype": "dtype"}


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", metavar="MOE_DIR", help="the MoE checkpoint to train (e.g. the output of build)")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE", help="training text files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, unless --force)")
    parser.add_argument("--train", choices=MODES, help="router: the routers only (default); full: every parameter")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; warmup, cosine to lr/10)")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="windows per step, over all processes together (default 8)")
    parser.add_argument("--seq-len", type=int, metavar="L", help="tokens per window (default 256)")
    parser.add_argument("--seed", type=int, help="data order seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="run on N processes of this machine (one per GPU; FSDP2 data parallel)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="steps between checkpoints (default 100 here; 0 = none)")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint folder (default OUT.checkpoints)")
    parser.add_argument("--config", metavar="FILE", help="YAML mapping of stage-2 settings (router_training's fields)")
    parser.add_argument("--device", help="auto (CUDA if available), cpu, cuda (cuda:N with one process)")
    parser.add_argument("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")


def training_config(args) -> RouterTrainingConfig:
    """The stage-2 settings: defaults, then --config FILE, then the flags."""
    values = {"checkpoint_every": 100}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SymphonyError(f"cannot read --config {args.config}: {e}") from e
        if not isinstance(loaded, dict):
            raise SymphonyError(f"--config {args.config} must hold a mapping of stage-2 settings")
        fields = {f.name for f in dataclasses.fields(RouterTrainingConfig)}
        unknown = sorted(set(loaded) - fields)
        if unknown:
            raise SymphonyError(f"--config {args.config}: unknown setting {unknown[0]!r} (known: {', '.join(fields)})")
        values.update(loaded)
    values.update({field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag) is not None})
    try:
        return RouterTrainingConfig(**values)
    except ValueError as e:
        raise SymphonyError(str(e).replace("router_training.", "")) from e


def format_summary(s: dict, out) -> str:
    if not s.get("steps"):
        return f"wrote {out} (0 steps: the model unchanged)"
    load = s["expert_load"]
    spread = ", ".join(f"{min(row) * len(row):.2f}-{max(row) * len(row):.2f}x" for row in load)
    return (f"wrote {out}: {s['steps']} steps, {s['tokens']} tokens, loss {s['first_loss']:.4f} -> "
            f"{s['last_loss']:.4f}, {s['trainable_params']} parameters trained\n"
            f"  expert load per MoE layer (min-max of uniform): {spread}")


def run(args) -> int:
    cfg = training_config(args)
    check_nproc(args.nproc, cfg)
    check_model_dir(args.model)
    read_texts(args.text)
    out = output_path(args.out)
    texts = [("text file", Path(t)) for t in args.text]
    check_output_dir(out, args.force, texts)  # the model folder itself may be the output (training in place)
    if args.json:
        check_output_file(args.json, texts + checkpoint_files(args.model))
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    kw = dict(resume=args.resume, checkpoint_dir=args.checkpoint_dir, progress=not args.quiet)
    if args.nproc > 1:
        if world_size() > 1:
            raise SymphonyError("--nproc starts its own processes: do not combine it with torchrun")
        summary = launch(args.model, args.text, cfg, out, nproc=args.nproc, force=args.force, **kw)
    elif world_size() > 1:
        from symphony.train.distributed import train_fsdp

        summary = train_fsdp(args.model, read_texts(args.text), cfg, out, **kw)
    else:
        from symphony.train import train_router

        summary = train_router(args.model, read_texts(args.text), cfg, out, **kw)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            write_json(args.json, summary)
        if args.nproc == 1:
            print(format_summary(summary, out))
    return 0
