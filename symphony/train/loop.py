"""Stage 2 of a Symphony-MoE build: train the routers (or everything) of an assembled MoE checkpoint, in one
process (`train_router`; many processes: symphony.train.distributed, which shares this module's pieces).

Loss = next-token cross-entropy + aux_loss_coef * load-balancing loss. The load-balancing loss is computed
here from the router logits (not taken from the model's own `aux_loss`): for every MoE layer, the Switch
Transformer loss E * sum_i f_i * P_i, where f_i is the fraction of the layer's top-k assignments that go to
expert i and P_i the mean router probability of expert i; then the mean over layers. It is 1 for a perfectly
balanced router. Transformers' `load_balancing_loss_func` instead pools the counts and probabilities of all
layers before taking the product (expert i of one layer and expert i of another are unrelated experts, so
that penalises the wrong thing) and scales by top_k; for a single MoE layer the two agree up to that factor.
Training windows are packed text with no padding, so no attention mask is needed.

Trainable parameters ("router" mode): every MoE block's `gate` (the router) and Qwen2-MoE's
`shared_expert_gate`; "full" mode trains every parameter (zero-size weights, such as a disabled shared
expert's, have nothing to train and are left out). Trainable parameters are kept in float32 (AdamW master
weights); the frozen ones stay in `dtype`, and the forward runs under autocast when `dtype` is not float32. On
CUDA the experts run on Symphony's kernels when they are registered (symphony.data).

Checkpoints (every `checkpoint_every` steps: symphony.train.checkpoint) go to `checkpoint_dir` (default: a
folder next to `out_dir`); `resume=True` continues from the latest one, written by any number of processes,
and ends with the same result as a run that was never interrupted: the batch of step s and the learning rate
of step s are functions of (seed, s) alone. Checkpoints are deleted once the final model is saved.
"""
from __future__ import annotations

import sys
import zlib
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from symphony.data import (check_model_dir, load_config, load_model, load_tokenizer, resolve_device, resolve_dtype,
                           token_stream, windows)
from symphony.errors import SymphonyError
from symphony.evaluate import moe_shape, nll_sum, route_counts
from symphony.train import checkpoint
from symphony.train.config import RESUME_FIELDS, RouterTrainingConfig
from symphony.train.save import write_model


def router_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every MoE block's router (`gate`) and shared-expert gate parameters, by name."""
    params = {}
    for name, module in model.named_modules():
        if hasattr(module, "gate") and hasattr(module, "experts"):
            for child in ("gate", "shared_expert_gate"):
                if isinstance(getattr(module, child, None), torch.nn.Module):
                    for n, p in getattr(module, child).named_parameters():
                        params[f"{name}.{child}.{n}"] = p
    return params


def trainable_parameters(model, mode: str) -> dict[str, torch.nn.Parameter]:
    """The parameters stage 2 trains in `mode` ("router" or "full"), by name, without zero-size ones."""
    params = dict(model.named_parameters()) if mode == "full" else router_parameters(model)
    return {n: p for n, p in params.items() if p.numel()}


def load_balancing_loss(router_logits, top_k: int, group=None) -> torch.Tensor:
    """Mean over MoE layers of the Switch loss E * sum_i f_i * P_i (1 when balanced; see the module docstring).

    With a process `group`, f_i counts the assignments of every rank's tokens (an all-reduce) and P_i is this
    rank's mean: the mean over the ranks of this loss, and of its gradient, is then the loss of their
    tokens together (for equal numbers of tokens per rank)."""
    probs = [logits.float().softmax(dim=-1) for logits in router_logits]
    num_experts = probs[0].shape[-1]
    chosen = torch.stack([F.one_hot(p.topk(top_k, dim=-1).indices, num_experts).sum((0, 1)) for p in probs]).float()
    assignments = probs[0].shape[0] * top_k
    if group is not None:
        dist.all_reduce(chosen, group=group)
        assignments *= dist.get_world_size(group)
    losses = [num_experts * (c / assignments * p.mean(0)).sum() for c, p in zip(chosen, probs)]
    return torch.stack(losses).mean()


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Window indices of a step's batch: a fresh seeded shuffle of all n windows per epoch, read in order."""
    return [_epoch_order(n, seed, j // n)[j % n] for j in range(step * batch_size, (step + 1) * batch_size)]


def _train_step(model, batch, optimizer, params, cfg: RouterTrainingConfig, step: int, autocast, top_k: int,
                group=None):
    """One AdamW step; returns (loss, lm loss, aux loss, route counts [layers, experts]). With a process
    `group` (data parallel), the losses and counts are those of every rank's batch together."""
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr_at(step)
    with autocast:
        out = model(input_ids=batch, output_router_logits=True, use_cache=False)
        lm = nll_sum(out.logits, batch) / (batch.numel() - batch.shape[0])
        aux = load_balancing_loss(out.router_logits, top_k, group)
        loss = lm + cfg.aux_loss_coef * aux
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = torch.stack([loss.detach(), lm.detach(), aux.detach()]).float()
    counts = route_counts(out.router_logits, top_k, out.router_logits[0].shape[-1])
    if group is not None:
        counts = counts.to(values.device)
        dist.all_reduce(values, group=group)
        dist.all_reduce(counts, group=group)
        values, counts = values / dist.get_world_size(group), counts.cpu()
    loss, lm, aux = values.tolist()
    return loss, lm, aux, counts


def prepare(model_dir, texts, cfg: RouterTrainingConfig, out_dir, checkpoint_dir):
    """Checks and data shared by every stage-2 run: (model_dir, out_dir, checkpoint folder, device, dtype,
    token windows [n, seq_len], settings a resumed run must share)."""
    if not isinstance(cfg, RouterTrainingConfig):
        raise TypeError(f"cfg must be a RouterTrainingConfig, not {type(cfg).__name__}")
    model_dir, out_dir = check_model_dir(model_dir), Path(out_dir)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.with_name(f"{out_dir.name}.checkpoints")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.steps == 0:
        return model_dir, out_dir, folder, device, dtype, None, None
    moe_shape(load_config(model_dir))
    stream = token_stream(load_tokenizer(model_dir), texts)
    data, _ = windows(stream, cfg.seq_len)
    if len(data) == 0:
        raise SymphonyError(f"the training text has {stream.numel()} tokens, fewer than seq_len={cfg.seq_len}: "
                            "give more text or a smaller seq_len")
    settings = {k: getattr(cfg, k) for k in RESUME_FIELDS} | {"dtype": str(dtype),
                                                            "data": zlib.crc32(data.numpy().tobytes())}
    return model_dir, out_dir, folder, device, dtype, data, settings


def untrained(model_dir: Path, out_dir: Path) -> dict:
    """steps=0: the model is written out unchanged."""
    if out_dir.resolve() != model_dir.resolve():
        write_model(model_dir, out_dir, None)
    return {"steps": 0, "first_loss": None, "last_loss": None, "losses": [], "expert_load": None, "tokens": 0,
            "trainable_params": 0}


def resume_from(folder: Path, resume: bool, names, settings: dict, model, optimizer, device) -> tuple[int, list]:
    """Load the latest checkpoint in `folder` when resuming: (first step, losses so far)."""
    latest = checkpoint.checkpoints(folder)[-1:] if resume else []
    if resume and not latest and checkpoint.rank() == 0:
        print(f"no checkpoint in {folder}: starting from step 0", file=sys.stderr)
    if not latest:
        return 0, []
    meta = checkpoint.read_meta(latest[0])
    if meta["names"] != list(names):
        raise SymphonyError(f"checkpoint {latest[0]} was made for another model: delete {folder} to start over")
    for key, value in settings.items():
        if meta["settings"].get(key) != value:
            raise SymphonyError(f"checkpoint {latest[0]} was made with {key}={meta['settings'].get(key)!r}, "
                                f"not {value!r}: resume with the same settings and text, or delete {folder}")
    checkpoint.load(latest[0], model, optimizer, names)
    torch.set_rng_state(meta["rng"])
    if device.type == "cuda" and "cuda_rng" in meta:
        torch.cuda.set_rng_state(meta["cuda_rng"], device)
    return meta["step"], list(meta["losses"])


def start_training(model, model_dir, cfg: RouterTrainingConfig, folder: Path, resume: bool, settings: dict,
                   device, dtype) -> SimpleNamespace:
    """The trainable parameters (as float32 master weights), AdamW, the seed, the resumed step and losses and
    the autocast context of a stage-2 run of `model`; the rest of the model frozen, in training mode."""
    num_experts, top_k = moe_shape(model.config)
    trainable = trainable_parameters(model, cfg.train)
    if not trainable:
        raise SymphonyError(f"no router found in {model_dir} ({type(model).__name__})")
    model.requires_grad_(False)
    for p in trainable.values():
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed)
    start, losses = resume_from(folder, resume, list(trainable), settings, model, optimizer, device)
    model.train()
    return SimpleNamespace(num_experts=num_experts, top_k=top_k, trainable=trainable, params=params,
                           optimizer=optimizer, start=start, losses=losses,
                           autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))


def run_steps(step_fn, cfg: RouterTrainingConfig, start: int, losses: list, num_experts: int, *, progress: bool,
              save=None):
    """Steps start..cfg.steps-1 of `step_fn(step) -> (loss, lm, aux, counts)` with a progress bar and a log
    line every cfg.log_every steps; `save(step, losses)` every cfg.checkpoint_every steps. Appends to `losses`."""
    counts = torch.zeros(())
    bar = tqdm(total=cfg.steps, initial=start, desc=f"stage 2 ({cfg.train})", unit="step", dynamic_ncols=True,
               disable=not progress)
    try:
        for step in range(start, cfg.steps):
            loss, lm, aux, step_counts = step_fn(step)
            losses.append(loss)
            counts = counts + step_counts
            load = counts.double() / counts.sum(1, keepdim=True) * num_experts
            text = f"loss {loss:.4f} (lm {lm:.4f} aux {aux:.3f}) load {load.min():.2f}-{load.max():.2f}x"
            bar.set_postfix_str(text, refresh=False)
            bar.update()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                if progress:
                    bar.write(f"step {step + 1}/{cfg.steps}  {text}  lr {cfg.lr_at(step):.2e}")
                counts = torch.zeros(())
            if save is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                    and step + 1 < cfg.steps:
                save(step + 1, losses)
    finally:
        bar.close()


def saver(folder: Path, model, run: SimpleNamespace, settings: dict, device):
    """save(step, losses) for run_steps: a checkpoint of `run`'s trainable parameters and optimizer."""
    def save(step, losses):
        meta = {"step": step, "settings": settings, "losses": list(losses), "rng": torch.get_rng_state()}
        if device.type == "cuda":
            meta["cuda_rng"] = torch.cuda.get_rng_state(device)
        checkpoint.save(folder, model, run.optimizer, list(run.trainable), meta)
    return save


@torch.no_grad()
def final_load(model, data: torch.Tensor, batch_size: int, top_k: int, num_experts: int, device, autocast):
    """[MoE layers][experts] fractions of the routed assignments on up to 32 training windows."""
    model.eval()
    with autocast:
        routed = sum(route_counts(model(input_ids=b.to(device), output_router_logits=True, use_cache=False)
                                  .router_logits, top_k, num_experts) for b in data[:32].split(batch_size))
    return (routed.double() / routed.sum(1, keepdim=True)).float().tolist()


def summary(cfg: RouterTrainingConfig, losses: list, load, trainable_params: int) -> dict:
    return {"steps": cfg.steps, "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "expert_load": load, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
            "trainable_params": trainable_params}


def train_router(model_dir, texts: list[str], cfg: RouterTrainingConfig, out_dir, *, resume: bool = False,
                 checkpoint_dir=None, progress: bool = True) -> dict:
    """Train the MoE checkpoint in `model_dir` on `texts` as `cfg` says and save it, with its tokenizer, to
    `out_dir` (atomically; `out_dir` may be `model_dir`).

    Returns {"steps", "first_loss", "last_loss", "losses", "expert_load" ([MoE layers][experts] fractions of
    the trained model's routed assignments on up to 32 training windows), "tokens" (seen in training),
    "trainable_params"}.
    """
    model_dir, out_dir, folder, device, dtype, data, settings = prepare(model_dir, texts, cfg, out_dir,
                                                                        checkpoint_dir)
    if cfg.steps == 0:
        return untrained(model_dir, out_dir)
    model = load_model(model_dir, device=device, dtype=dtype)
    run = start_training(model, model_dir, cfg, folder, resume, settings, device, dtype)

    def step_fn(step):
        batch = data[batch_indices(step, cfg.batch_size, len(data), cfg.seed)].to(device)
        return _train_step(model, batch, run.optimizer, run.params, cfg, step, run.autocast, run.top_k)

    run_steps(step_fn, cfg, run.start, run.losses, run.num_experts, progress=progress,
              save=saver(folder, model, run, settings, device))
    load = final_load(model, data, cfg.batch_size, run.top_k, run.num_experts, device, run.autocast)
    trained = {n: p.detach().to("cpu", copy=True) for n, p in run.trainable.items()}  # not views of the mmapped file
    losses = run.losses
    del model, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    write_model(model_dir, out_dir, trained, cfg.train)
    checkpoint.remove_all(folder)
    return summary(cfg, losses, load, sum(t.numel() for t in trained.values()))
