"""Stage 2 on several processes: data parallel with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Started by `torchrun --nproc-per-node N -m symphony train ...` (or `symphony train --nproc N`, which runs
torchrun itself: symphony.train.launch); `train_fsdp` is what every process runs. One process per GPU (NCCL,
device cuda:LOCAL_RANK) or per CPU worker (gloo). Multi-node runs take torchrun's rendezvous arguments
(--nnodes, --rdzv-endpoint...) unchanged and need the checkpoint and output folders on a shared file system
(untested here).

- Model: built on the meta device from the checkpoint's config, then every decoder layer and the root are
  `fully_shard`ed (parameters, gradients and AdamW state sharded over the processes), materialised on the
  device and loaded from the checkpoint, which rank 0 alone reads (`set_model_state_dict(...,
  broadcast_from_rank0=True)`; buffers such as the rotary frequencies are broadcast too). Master weights are
  float32; with a half-precision `dtype` (bfloat16 on CUDA by default) FSDP gathers them in that dtype for
  compute and reduces gradients in float32 (`MixedPrecisionPolicy`), and the forward runs under autocast as in
  one process. Zero-size weights (a disabled shared expert) are left out of the sharding (`ignored_params`:
  FSDP cannot reduce-scatter an empty gradient) and out of training.
- Data: the global batch of a step is what one process would train on (`batch_indices(step, batch_size, ...)`);
  rank r takes its contiguous slice of batch_size / N windows, so the data order and the global batch do not
  depend on N. Gradients are averaged over the ranks; the load-balancing loss counts the assignments of all
  ranks (symphony.train.loop.load_balancing_loss with a group), so a run on N processes follows the run on
  one up to floating-point summation order (float32 on the CPU: loss curves within 1e-4, tests/train).
- Checkpoints: torch.distributed.checkpoint (symphony.train.checkpoint), resumable on any number of
  processes. The final model: every trainable parameter gathered whole on rank 0 (`full_tensor`, one at a
  time, kept in the checkpoint's dtype), which writes it like the one-process run (symphony.train.save,
  atomically).

With one process (WORLD_SIZE 1) nothing here runs: `symphony train` calls symphony.train.loop.train_router,
unwrapped.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from symphony.data import experts_implementation, load_config, load_model, quiet_zero_size_init, resolve_device
from symphony.errors import SymphonyError
from symphony.train import checkpoint
from symphony.train.config import RouterTrainingConfig
from symphony.train.launch import check_batch_split
from symphony.train.loop import (_train_step, batch_indices, final_load, prepare, run_steps, saver, start_training,
                                 summary, untrained)
from symphony.train.save import write_model


def process_device(device: str) -> torch.device:
    """This process's device: cuda:LOCAL_RANK for "auto" (with CUDA) or "cuda", else the CPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise SymphonyError(f"with several processes the device is auto, cuda or cpu (each process takes "
                            f"cuda:LOCAL_RANK), not {device!r}")
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise SymphonyError(f"process {local} of this machine has no GPU ({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SymphonyError(f"{type(model).__name__} has no model.layers to shard")
    return list(layers)


def shard(model, dtype: torch.dtype):
    """fully_shard every decoder layer, then the root (embeddings, final norm, head), with bf16/fp16 compute
    and float32 gradient reduction when `dtype` is a half type. Returns the zero-size parameters (unsharded)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    empty = {p for p in model.parameters() if p.numel() == 0}
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, ignored_params=empty & set(layer.parameters()))
    fully_shard(model, mp_policy=mp, ignored_params=empty)
    return empty


def load_sharded(model_dir, device: torch.device, dtype: torch.dtype):
    """The MoE in `model_dir`, sharded over the processes in float32 master weights (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir)
    with torch.device("meta"), quiet_zero_size_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 experts_implementation=experts_implementation(device))
    shard(model, dtype)
    model.to_empty(device=device)
    source = None
    if dist.get_rank() == 0:
        source = load_model(model_dir, device="cpu", dtype=stored_dtype(config) or "float32")
    set_model_state_dict(model, source.state_dict() if source is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buf in model.named_buffers():  # non-persistent buffers are not in the state dict
        value = buffers[name].to(device, buf.dtype) if source is not None else torch.empty_like(buf)
        dist.broadcast(value, src=0)
        with torch.no_grad():
            buf.copy_(value)
    del source, buffers
    return model


def stored_dtype(config) -> torch.dtype | None:
    """The floating dtype a checkpoint's config says its weights are stored in, or None."""
    stored = getattr(config, "dtype", None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else None


def gather(params: dict, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every parameter whole, on rank 0's CPU in `dtype` (None: as they are), one at a time; {} elsewhere."""
    out = {}
    for name, p in params.items():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if dist.get_rank() == 0:
            out[name] = full.detach().to("cpu", dtype or full.dtype, copy=True)
        del full
    return out


def train_fsdp(model_dir, texts: list[str], cfg: RouterTrainingConfig, out_dir, *, resume: bool = False,
               checkpoint_dir=None, progress: bool = True) -> dict:
    """`symphony.train.train_router` on every process torchrun started (the same arguments and summary; the
    model is written by rank 0). Initialises the default process group when it is not yet, and destroys it
    at the end if it did."""
    own_group = not dist.is_initialized()
    device = process_device(cfg.device)
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    try:
        result = _train(model_dir, texts, cfg, out_dir, device, resume, checkpoint_dir, progress)
        # Every rank returns once rank 0 has written the model, and the ranks leave together: a gloo process
        # that exits while another still works can abort in its shutdown ("terminate called...").
        dist.barrier()
        return result
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(model_dir, texts, cfg, out_dir, device, resume, checkpoint_dir, progress) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    if not isinstance(cfg, RouterTrainingConfig):
        raise TypeError(f"cfg must be a RouterTrainingConfig, not {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg, device=str(device))
    model_dir, out_dir, folder, device, dtype, data, settings = prepare(model_dir, texts, cfg, out_dir,
                                                                        checkpoint_dir)
    if cfg.steps == 0:
        return untrained(model_dir, out_dir) if rank == 0 else {}
    check_batch_split(cfg.batch_size, world)
    model = load_sharded(model_dir, device, dtype)
    run = start_training(model, model_dir, cfg, folder, resume, settings, device, dtype)
    share = cfg.batch_size // world

    def step_fn(step):
        batch = batch_indices(step, cfg.batch_size, len(data), cfg.seed)[rank * share:(rank + 1) * share]
        return _train_step(model, data[batch].to(device), run.optimizer, run.params, cfg, step, run.autocast,
                           run.top_k, dist.group.WORLD)

    run_steps(step_fn, cfg, run.start, run.losses, run.num_experts, progress=progress and rank == 0,
              save=saver(folder, model, run, settings, device))
    load = final_load(model, data, cfg.batch_size, run.top_k, run.num_experts, device, run.autocast)
    trained = gather(run.trainable, stored_dtype(load_config(model_dir)))
    total, losses = sum(p.numel() for p in run.params), run.losses
    del model, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if rank == 0:
        write_model(model_dir, out_dir, trained, cfg.train)
        checkpoint.remove_all(folder)
    return summary(cfg, losses, load, total)
