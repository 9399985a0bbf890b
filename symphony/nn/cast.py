"""The dtypes the experts kernels run in, shared by SymphonyMoE and the transformers integration."""
from __future__ import annotations

import torch


def compute_dtype_cast(x: torch.Tensor, *params: torch.Tensor, strict: bool = True):
    """(x, params) for `symphony_kernels.moe_experts`: under autocast, x in the autocast dtype and the params
    left in float32 (the kernels round them on load) or cast to that dtype. Otherwise unchanged; with
    `strict`, params of another dtype than x are a TypeError (as they would be for nn.Linear)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return x.to(dtype), [p if p.dtype in (dtype, torch.float32) else p.to(dtype) for p in params]
    if strict:
        for p in params:
            if p.dtype != x.dtype:
                raise TypeError(f"hidden states are {x.dtype} but the layer's weights are {p.dtype}; cast one of "
                                "them or run under torch.autocast")
    return x, list(params)
