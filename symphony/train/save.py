"""Stage 2's output: the trained model, written atomically (checkpoints: symphony.train.checkpoint)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from symphony.data import load_tokenizer, quiet_zero_size_init
from symphony.outputs import atomic_output, publish

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def write_model(model_dir: Path, out_dir: Path, trained: dict[str, torch.Tensor] | None, mode: str = "full"):
    """Write model_dir's checkpoint with the `trained` parameters replaced (in the checkpoint's own dtype), its
    tokenizer and its other files (alignment report, build config...) to out_dir, atomically.

    Router mode copies the checkpoint tensor by tensor with the routers replaced (symphony.build.writer.replace_tensors:
    one tensor in memory at a time, the layout kept as it was); full mode loads the model and saves it with
    transformers."""
    from transformers import AutoModelForCausalLM

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir, force=True) as tmp:  # lock, cleanup on any exit or signal, a full disk in one line
        if trained is None:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        elif mode == "router" and any(model_dir.glob("*.safetensors")):
            from symphony.build.writer import replace_tensors

            for p in model_dir.iterdir():
                if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES):
                    shutil.copy2(p, tmp / p.name)
            replace_tensors(model_dir, tmp, trained)
        else:
            with quiet_zero_size_init():
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
            with torch.no_grad():
                for name, value in trained.items():
                    model.get_parameter(name).copy_(value)
            shards = list(model_dir.glob("*.safetensors"))
            kwargs = {"max_shard_size": max(p.stat().st_size for p in shards)} if len(shards) > 1 else {}
            model.save_pretrained(tmp, **kwargs)
            load_tokenizer(model_dir).save_pretrained(tmp)
            for p in model_dir.iterdir():
                if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and not (tmp / p.name).exists():
                    shutil.copy2(p, tmp / p.name)
        publish(tmp, out_dir)
