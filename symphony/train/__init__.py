"""Stage 2 of a Symphony-MoE build: training the routers (or every parameter) of an assembled MoE, in one process
(`loop.train_router`) or many (`distributed.train_fsdp`: FSDP2 data parallel under torchrun; `launch`: starts
torchrun for `symphony train --nproc N` / `symphony build --nproc N`); checkpoints in `checkpoint`."""
from symphony.train.config import RouterTrainingConfig
from symphony.train.loop import batch_indices, load_balancing_loss, router_parameters, train_router

__all__ = ["RouterTrainingConfig", "batch_indices", "load_balancing_loss", "router_parameters", "train_router"]
