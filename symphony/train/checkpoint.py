"""Stage 2's resumable checkpoints, through torch.distributed.checkpoint (DCP), for one process or many.

A checkpoint is a folder `step-000000040/` in the checkpoint folder: DCP's files with the trainable parameters
(by name) and AdamW's state (by parameter name: `get_optimizer_state_dict`), and `meta.pt` (the step, the
settings, the losses so far, the trainable names, the RNG state). Parameters sharded by FSDP2 are saved as
the shards each rank holds; DCP records their global shapes, so a checkpoint loads into any number of
processes, one included (plain tensors), whatever number wrote it.

Written atomically: every rank writes into `.step-000000040.tmp/`, then rank 0 adds `meta.pt` and renames the
folder; a folder without `meta.pt` is never read. Older checkpoints are removed once the new one is in place.
The checkpoint folder must be on a file system that every rank sees (one machine, or a shared one).
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

META = "meta.pt"


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("step-*") if (p / META).is_file()) if folder.is_dir() else []


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier():
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet():
    """DCP warns that a run without a process group saves / loads "in a single process": that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(model, optimizer, names) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    params = get_model_state_dict(model)
    with warnings.catch_warnings():  # DCP's state-dict helpers warn about FSDP1-era options that are not used here
        warnings.simplefilter("ignore", FutureWarning)
        optim = get_optimizer_state_dict(model, optimizer)
    return {"model": {n: params[n] for n in names}, "optim": optim}


def save(folder: Path, model, optimizer, names: list[str], meta: dict):
    """Save the trainable parameters `names` of `model`, `optimizer`'s state and `meta` (with its "step") as
    folder/step-N (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    final = folder / f"step-{meta['step']:09d}"
    tmp = folder / f".{final.name}.tmp"
    if rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with _quiet():
        dcp.save(_state(model, optimizer, names), checkpoint_id=tmp, no_dist=not _distributed())
    _barrier()
    if rank() == 0:
        old = checkpoints(folder)
        torch.save({**meta, "names": list(names)}, tmp / META)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for p in old:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()


def read_meta(path: Path) -> dict:
    return torch.load(Path(path) / META, map_location="cpu", weights_only=True)


def load(path: Path, model, optimizer, names: list[str]):
    """Load checkpoint `path` into `model`'s parameters `names` and `optimizer` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer, names)
    with _quiet():
        dcp.load(state, checkpoint_id=Path(path), no_dist=not _distributed())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def remove_all(folder: Path):
    """Delete every checkpoint in `folder` (rank 0), and the folder once it is empty."""
    folder = Path(folder)
    if rank() != 0 or not folder.is_dir():
        return
    for p in list(folder.glob("step-*")) + list(folder.glob(".step-*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
    if not any(folder.iterdir()):
        folder.rmdir()
