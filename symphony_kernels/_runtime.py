"""Where the Triton kernels can run, and shared limits of the kernels.

- CUDA tensors: the Triton kernels (Triton must be installed).
- CPU tensors: the Triton kernels through Triton's interpreter when TRITON_INTERPRET=1 was set before
  `triton` was first imported (what the tests do); otherwise the plain-PyTorch reference of
  `symphony_kernels.reference` (correct, slow, with autograd through PyTorch).
"""
from __future__ import annotations

import os

import torch

MAX_EXPERTS = 1024
MAX_TOP_K = 32
# Pairs (T * k) are addressed with int32 ids (sorted_pairs, topk_ids); beyond that the plan cannot be built.
MAX_PAIRS = 2**31 - 1

try:  # Triton reads TRITON_INTERPRET when it is imported; record what it saw.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux x86_64 dependency
    HAS_TRITON = False
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernels run for tensors on `device` (see the module docstring)."""
    if device.type == "cuda":
        if not HAS_TRITON:
            raise RuntimeError("symphony_kernels needs triton for CUDA tensors; install triton")
        return True
    return device.type == "cpu" and HAS_TRITON and INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
