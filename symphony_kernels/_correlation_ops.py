"""The building blocks of `correlation.CorrelationAccumulator`: the four element-wise/reduction passes in plain
PyTorch (`TorchOps`, the reference of the extension's ops), the backend lookup, and the batched product."""
from __future__ import annotations

import contextlib

import torch

from . import _ext


# --------------------------------------------------------------------------------------------------------------
# The four element-wise/reduction passes, in plain torch. The extension implements the same four ops with the
# same signatures and the same results (csrc/correlation.h).
# --------------------------------------------------------------------------------------------------------------
class TorchOps:
    """Plain-PyTorch reference of the extension's ops; temporaries are bounded by working a few layers at a time."""

    name = "torch"
    _CHUNK = 1 << 25  # elements of float64 temporaries per step

    @classmethod
    def _layer_chunks(cls, n_layers: int, per_layer: int):
        step = max(1, cls._CHUNK // max(1, per_layer))
        return [(i, min(n_layers, i + step)) for i in range(0, n_layers, step)]

    @classmethod
    def column_moments(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [L, T, F] -> (sum over tokens [L, F], sum of squares [L, F]), float64."""
        L, T, F = x.shape
        s = torch.empty(L, F, dtype=torch.float64, device=x.device)
        q = torch.empty_like(s)
        for a, b in cls._layer_chunks(L, T * F):
            x64 = x[a:b].to(torch.float64)
            s[a:b] = x64.sum(dim=1)
            q[a:b] = x64.square().sum(dim=1)
        return s, q

    @classmethod
    def center(cls, x: torch.Tensor, shift: torch.Tensor, out_dtype: torch.dtype):
        """y = x - shift computed in float64 when out_dtype is float64 (exact), else in float32, rounded to
        `out_dtype`; with y's float64 column sums and sums of squares. shift [L, F] float32."""
        ct = torch.float64 if out_dtype == torch.float64 else torch.float32
        y = (x.to(ct) - shift.to(ct)[:, None, :]).to(out_dtype)
        s, q = cls.column_moments(y)
        return y, s, q

    @staticmethod
    def merge_comoment_(c: torch.Tensor, p: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None):
        """c [L, A, B] float64 += p (float32) + u @ v^T (u [L, A, R], v [L, B, R] float64; None for no term)."""
        c.add_(p)
        if u is not None:
            c.baddbmm_(u, v.transpose(1, 2))

    @classmethod
    def finalize(cls, c, mean_a, mean_b, alpha: float, inv_a, inv_b) -> torch.Tensor:
        """clamp((c + alpha * mean_a mean_b^T) * inv_a inv_b^T, -1, 1) as float32."""
        L, A, B = c.shape
        out = torch.empty(L, A, B, dtype=torch.float32, device=c.device)
        for a, b in cls._layer_chunks(L, A * B):
            r = c[a:b].clone()
            if alpha != 0.0:
                r.baddbmm_(mean_a[a:b, :, None], mean_b[a:b, None, :], alpha=alpha)
            r.mul_(inv_a[a:b, :, None]).mul_(inv_b[a:b, None, :]).clamp_(-1.0, 1.0)
            out[a:b] = r
        return out


def _ops_for(backend: str):
    if backend == "torch":
        return TorchOps
    module = _ext.load()
    if module is None:
        raise ValueError(f"backend {backend!r} needs the C++/CUDA extension, which is unavailable: "
                         f"{_ext.info()['reason']}")
    return module


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def _normalize_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def _full_fp32_matmul():
    """fp32 products in true fp32 (no TF32) while accumulating, whatever the caller set."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


_HALF_ACCUMULATE_OK = [True]  # torch.baddbmm(..., out_dtype=float32) works here (checked on first use)


def _batched_product(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor | None:
    """acc + a^T b per layer (a [g, t, A], b [g, t, B]); float64 for float64 operands, else float32 with fp32
    accumulation (tensor cores on the GPU). Returns the new accumulator, or None when the caller must flush
    `acc` first (a torch without baddbmm(out_dtype=...))."""
    at = a.transpose(1, 2)
    if a.dtype in (torch.float64, torch.float32):
        return torch.bmm(at, b) if acc is None else acc.baddbmm_(at, b)
    if acc is None:
        try:
            return torch.bmm(at, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            with _full_fp32_matmul():
                return torch.bmm(at.float(), b.float())
    if _HALF_ACCUMULATE_OK[0]:
        try:
            return torch.baddbmm(acc, at, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _HALF_ACCUMULATE_OK[0] = False
    return None
