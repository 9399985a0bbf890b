"""`symphony train --nproc N` and `symphony build --nproc N`: run stage 2 on N processes of this machine.

`launch` writes the stage-2 settings to a temporary YAML file and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m symphony train MOE_DIR --text ... \\
        --out OUT --config SETTINGS --json SUMMARY

as a child process (torchrun picks a free port; each process runs symphony.train.distributed.train_fsdp), waits
for it and returns rank 0's summary. The children import the same `symphony` package as this process
(PYTHONPATH), get OMP_NUM_THREADS = cores / N unless it is set, and print their own progress and errors.
For several machines, run torchrun yourself with its rendezvous arguments (symphony.train.distributed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from symphony.errors import SymphonyError
from symphony.train.config import RouterTrainingConfig


def world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_nproc(nproc, cfg: RouterTrainingConfig):
    """A one-line error when stage 2 (`cfg`) cannot run on `nproc` processes here: not a positive integer,
    more processes than GPUs, a batch that does not split evenly over them."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise SymphonyError(f"--nproc must be a positive integer, not {nproc!r}")
    if nproc == 1 or cfg.steps == 0:
        return
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise SymphonyError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPUs (one process each); "
                            "use --device cpu for CPU processes")
    check_batch_split(cfg.batch_size, nproc)


def check_batch_split(batch_size: int, nproc: int):
    if batch_size % nproc:
        raise SymphonyError(f"batch_size={batch_size} is not a multiple of the {nproc} processes: each takes an "
                            "equal slice of every batch")


def command(model_dir, text_files, out_dir, nproc: int, settings: Path, summary: Path, *, resume=False,
            checkpoint_dir=None, force=False, progress=True) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "symphony", "train", str(model_dir), "--text", *map(str, text_files), "--out", str(out_dir),
           "--config", str(settings), "--json", str(summary)]
    if checkpoint_dir is not None:
        cmd += ["--checkpoint-dir", str(checkpoint_dir)]
    return cmd + ["--resume"] * resume + ["--force"] * force + ["--quiet"] * (not progress)


def launch(model_dir, text_files, cfg: RouterTrainingConfig, out_dir, *, nproc: int, resume: bool = False,
           checkpoint_dir=None, force: bool = False, progress: bool = True) -> dict:
    """Stage 2 (`cfg`) of the MoE in `model_dir` on the texts in `text_files`, on `nproc` processes, written
    to `out_dir`; returns the summary of symphony.train.train_router. SymphonyError when the run fails."""
    check_nproc(nproc, cfg)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="symphony-train-") as tmp:
        settings, summary = Path(tmp) / "settings.yaml", Path(tmp) / "summary.json"
        settings.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        cmd = command(model_dir, text_files, out_dir, nproc, settings, summary, resume=resume,
                      checkpoint_dir=checkpoint_dir, force=force, progress=progress)
        code = subprocess.run(cmd, env=env).returncode
        if code != 0 or not summary.is_file():
            raise SymphonyError(f"stage 2 on {nproc} processes failed (torchrun exit status {code}); "
                                "the messages above say why")
        return json.loads(summary.read_text())
