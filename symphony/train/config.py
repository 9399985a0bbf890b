"""Stage 2 settings (`RouterTrainingConfig`): the YAML's `router_training` section and `symphony train`'s options."""
from __future__ import annotations

import math
from dataclasses import dataclass

from symphony.data import DTYPES

MODES = ("router", "full")
SCHEDULES = ("cosine", "constant")
# Fields that a resumed run must share with the checkpoint it resumes (the others do not change the result).
RESUME_FIELDS = ("steps", "lr", "batch_size", "seq_len", "aux_loss_coef", "train", "weight_decay", "warmup",
                  "seed", "grad_clip", "schedule")


@dataclass
class RouterTrainingConfig:
    """Stage 2 settings. steps=0 skips stage 2 (the model is written out unchanged)."""

    steps: int = 200
    lr: float = 1e-3             # peak learning rate: linear warmup, then `schedule`
    schedule: str = "cosine"     # after the warmup: "cosine" decay to lr/10, or "constant" lr
    batch_size: int = 8          # windows per step
    seq_len: int = 256           # tokens per window
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    train: str = "router"        # "router": routers only; "full": every parameter
    weight_decay: float = 0.0
    warmup: float = 0.1          # fraction of the steps
    seed: int = 0
    checkpoint_every: int = 0    # steps between checkpoints; 0 = none
    device: str = "auto"         # auto (CUDA if available), cpu, cuda, cuda:N
    dtype: str = "auto"          # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    grad_clip: float = 1.0       # max gradient norm; 0 = no clipping
    log_every: int = 10          # steps between log lines

    def __post_init__(self):
        def number(name, low, *, integer=False, above=False, below=None):
            value = getattr(self, name)
            if isinstance(value, str) and not integer:  # YAML reads `1e-3` as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                raise ValueError(f"router_training.{name} must be {'an integer' if integer else 'a number'}, "
                                 f"not {value!r}")
            if value < low or (above and value == low) or (below is not None and value >= below):
                bound = f"{'>' if above else '>='} {low}" + (f" and < {below}" if below is not None else "")
                raise ValueError(f"router_training.{name} must be {bound}, not {value!r}")
            setattr(self, name, value if integer else float(value))

        for name in ("steps", "seed", "checkpoint_every"):
            number(name, 0, integer=True)
        for name in ("batch_size", "log_every"):
            number(name, 1, integer=True)
        number("seq_len", 2, integer=True)
        number("lr", 0, above=True)
        number("warmup", 0, below=1)
        for name in ("aux_loss_coef", "weight_decay", "grad_clip"):
            number(name, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"router_training.schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.train not in MODES:
            raise ValueError(f"router_training.train must be one of {', '.join(MODES)}, not {self.train!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"router_training.dtype must be auto or one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"router_training.device must be a string such as auto, cpu or cuda, not {self.device!r}")

    def lr_at(self, step: int) -> float:
        warm = math.ceil(self.warmup * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.schedule == "constant":
            return self.lr
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
