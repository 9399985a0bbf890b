"""Post-training of models that `symphony.train.train_router` does not take (dense checkpoints, the BAM model),
with exactly its recipe, so that every contender of the paper study gets the same post-training.

    train_model(model, windows, cfg)        # cfg: symphony.train.RouterTrainingConfig (train: full)

What is the same as train_router (tested against it on an MoE: tests/benchmarks/test_quality_paper.py): the
windows (non-overlapping windows of the text, symphony.data.windows), the batch of step s
(symphony.train.batch_indices(s, batch, n, seed)), torch.manual_seed(seed) first, AdamW(lr, weight_decay) over
every parameter held in float32, the learning rate of step s (cfg.lr_at), the loss (mean next-token NLL +
aux_loss_coef x symphony.train.load_balancing_loss of the router logits, for a model that returns them),
gradient clipping, autocast in cfg's dtype. What is not: no checkpoints, no resume, and the model stays in memory.
"""
from __future__ import annotations

import time

import torch

from symphony.data import resolve_device, resolve_dtype
from symphony.evaluate import nll_sum
from symphony.train import RouterTrainingConfig, batch_indices, load_balancing_loss


def train_model(model, data: torch.Tensor, cfg: RouterTrainingConfig, *, top_k: int | None = None,
                progress: bool = False) -> dict:
    """Train every parameter of `model` (on cfg's device, parameters in float32) on `data` ([n, seq_len] windows)
    for cfg.steps; `top_k`: the model is an MoE whose forward takes output_router_logits and returns
    router_logits (the load-balancing loss is added). Returns {"steps", "first_loss", "last_loss", "losses",
    "tokens", "trainable_params", "seconds"}; the model is left in eval mode, in float32."""
    if cfg.train != "full":
        raise ValueError("train_model trains every parameter: cfg.train must be 'full'")
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"data must be [n >= 1, seq_len] windows, not {tuple(data.shape)}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model.to(device=device, dtype=torch.float32)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(cfg.seed)
    extra = {"output_router_logits": True} if top_k else {}
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        batch = data[batch_indices(step, cfg.batch_size, len(data), cfg.seed)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        with autocast:
            out = model(input_ids=batch, use_cache=False, **extra)
            loss = nll_sum(out.logits, batch) / (batch.numel() - batch.shape[0])
            if top_k:
                loss = loss + cfg.aux_loss_coef * load_balancing_loss(out.router_logits, top_k)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            print(f"  step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} lr {cfg.lr_at(step):.2e}", flush=True)
    model.eval()
    model.requires_grad_(False)
    return {"steps": cfg.steps, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "losses": losses, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
            "trainable_params": sum(p.numel() for p in params), "seconds": time.perf_counter() - start}
