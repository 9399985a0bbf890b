"""Streaming, batched correlation between neuron activations: of two models (X^T Y) or one model (X^T X).

`CorrelationAccumulator(layers, f_a, f_b)` takes calibration batches `xa` [layers, tokens, f_a] and `xb`
[layers, tokens, f_b] (bf16, fp16 or fp32) through `.update(xa, xb)` and gives the [layers, f_a, f_b] Pearson
correlation (or cosine similarity) of every neuron of `xa` with every neuron of `xb`, layer by layer.

Accuracy over 10^6-10^7 tokens. The running state is held in float64: the token count, the column means, the
column sums of squared deviations (M2) and the cross-comoment C = sum (x - mean_x)(y - mean_y)^T. Each batch
is reduced on its own and merged with Chan's parallel update (the merge adds the batch's own centred moments
plus a rank-1 term for the difference of the means), so the totals never subtract two large sums, however
many tokens stream through and whatever the activations' common offset. Inside a batch:
1. one pass gives each column's float64 sum and sum of squares (also the check for non-finite values, done
   before anything is changed: a non-finite activation makes these sums non-finite);
2. columns whose batch mean exceeds their batch standard deviation are shifted by that mean (rounded to the
   input dtype) before the product; the shifted values are computed exactly in float64 where the product runs
   in float64, and rounded to the input dtype where it runs on bf16/fp16 tensor cores (exact, by Sterbenz's
   lemma, for the values within a factor 2 of the mean). The other columns are used as they are, so zero-mean
   activations (the usual case for LLM FFNs) take no extra pass and no rounding at all;
3. the product X^T Y of the (shifted) batch runs as one batched matrix product over a group of layers,
   `block_tokens` tokens at a time. bf16/fp16 on the GPU: tensor cores with fp32 accumulation inside a block,
   block products summed in fp32, the update's sum added into the float64 total (the fp32 rounding is bounded
   by one update, never by the stream). fp32 inputs (any device) and every input on the CPU: the operands are
   widened to float64 and multiplied in float64 (exact products, float64 sums; on an H100 DGEMM runs at the
   SGEMM rate), since a long fp32 sum of same-sign products drifts past 1e-5 within a few thousand tokens;
4. the batch's centred comoment is that product minus the outer product of the shifted column sums over the
   token count, whose cancellation is at most 2x because of the shift rule in 2.
A column that is constant over every token seen has M2 == 0 exactly (its shift is the constant itself, so its
shifted values are 0) and correlates 0 with everything, never NaN.

Backends (`.backend`): "cuda" (the extension's CUDA kernels for the passes and the merge, cuBLAS for the
product), "cpp" (the extension's ATen/OpenMP CPU kernels), "torch" (plain PyTorch ops, any device). All three
run the same algorithm on the same numbers; see symphony_kernels/_ext.py for how the extension is found.

Cost and memory: 8 * layers * f_a * f_b bytes of float64 state, plus a scratch of at most `scratch_bytes` (the
block accumulators of a group of layers, and shifted or widened copies of a token block). Besides the product,
each update makes one read pass over its inputs and one pass over the float64 state (~24 bytes per entry), so
updates of >= 16K tokens run near the GEMM rate; smaller ones are bound by that pass (numbers and the command in
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from . import _ext
from ._correlation_ops import TorchOps, _batched_product, _normalize_device, _ops_for

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KINDS = ("pearson", "cosine")
BACKENDS = ("auto", "cuda", "cpp", "torch")
_STATE_KEYS = ("count", "mean_a", "m2_a", "mean_b", "m2_b", "comoment")


class CorrelationAccumulator:
    """Streaming [layers, f_a, f_b] correlation of two activation sets (or of one with itself, f_b=None).

    Args:
        layers, f_a, f_b: sizes; f_b=None accumulates X^T X of one model (then `update(xa)` takes one input).
        device: where the state lives; inputs must be on it.
        backend: "auto" (the CUDA extension on a GPU, the C++ one on the CPU, else plain torch), "cuda", "cpp",
            or "torch" (the plain-PyTorch fallback); `SYMPHONY_DISABLE_EXT=1` makes "auto" pick "torch".
        block_tokens: tokens per matrix product (bounds the fp32 rounding of bf16/fp16 products on the GPU, and
            the size of the float64 copies elsewhere).
        scratch_bytes: bound on the per-update scratch (layers are processed in groups that fit it).

    Attributes: `count` (tokens seen), `backend`, `layers`, `f_a`, `f_b` (None for X^T X), `device`.
    """

    def __init__(self, layers: int, f_a: int, f_b: int | None = None, *, device="cpu", backend: str = "auto",
                 block_tokens: int = 16384, scratch_bytes: int | None = None):
        for name, value in (("layers", layers), ("f_a", f_a)) + ((("f_b", f_b),) if f_b is not None else ()):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, not {block_tokens!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.device = _normalize_device(device)
        self.layers, self.f_a, self.f_b = layers, f_a, f_b
        self.block_tokens = block_tokens
        if scratch_bytes is None:
            scratch_bytes = (2 << 30) if self.device.type == "cuda" else (512 << 20)
        self.scratch_bytes = int(scratch_bytes)
        self.backend = self._pick_backend(backend)
        self._ops = _ops_for(self.backend)
        self._broken: str | None = None
        width_b = f_a if f_b is None else f_b
        f64 = dict(dtype=torch.float64, device=self.device)
        self.count = 0
        with torch.inference_mode(False):  # ordinary tensors: updatable inside and outside inference mode
            self._mean_a = torch.zeros(layers, f_a, **f64)
            self._m2_a = torch.zeros(layers, f_a, **f64)
            self._mean_b = None if f_b is None else torch.zeros(layers, f_b, **f64)
            self._m2_b = None if f_b is None else torch.zeros(layers, f_b, **f64)
            self._comoment = torch.zeros(layers, f_a, width_b, **f64)

    # ---------------------------------------------------------------------------------------------------------
    def _pick_backend(self, backend: str) -> str:
        on_cuda = self.device.type == "cuda"
        if backend == "auto":
            return _ext.backend_for(self.device)
        if backend == "cuda" and not on_cuda:
            raise ValueError(f"backend 'cuda' needs a CUDA device, not {self.device}")
        if backend == "cpp" and self.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU, not on {self.device}")
        if backend == "cuda":
            module = _ext.load()
            if module is None or not module.has_cuda():
                reason = _ext.info()["reason"] if module is None else "it was built without CUDA"
                raise ValueError(f"backend 'cuda' needs the extension's CUDA kernels: {reason}")
        return backend

    @property
    def self_correlation(self) -> bool:
        """True when accumulating X^T X of one input (f_b=None)."""
        return self.f_b is None

    def __repr__(self):
        fb = "None" if self.f_b is None else self.f_b
        return (f"CorrelationAccumulator(layers={self.layers}, f_a={self.f_a}, f_b={fb}, device={self.device}, "
                f"backend={self.backend!r}, count={self.count})")

    def _check_usable(self):
        if self._broken is not None:
            raise RuntimeError(f"this CorrelationAccumulator is unusable: an earlier update failed midway "
                               f"({self._broken}); start a new one")

    # ---------------------------------------------------------------------------------------------------------
    def _check_input(self, x, name: str, width: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, not {type(x).__name__}")
        if x.dim() != 3 or x.shape[0] != self.layers or x.shape[2] != width:
            raise ValueError(f"{name} must have shape [layers={self.layers}, tokens, {width}], "
                             f"not {list(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be bfloat16, float16 or float32, not {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}, but the accumulator lives on {self.device}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} holds zero tokens (in every layer, from layer 0)")
        return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()

    def _check_finite(self, s: torch.Tensor, q: torch.Tensor, name: str):
        # A finite input gives finite float64 sums (even squares of fp32's largest values fit), so a non-finite
        # sum means a NaN/inf activation.
        bad = ~(torch.isfinite(s) & torch.isfinite(q)).all(dim=1)
        if bool(bad.any()):
            layer = int(bad.nonzero()[0, 0])
            cols = (~(torch.isfinite(s[layer]) & torch.isfinite(q[layer]))).nonzero()[:, 0]
            raise ValueError(f"{name} holds non-finite activations (NaN or inf) in layer {layer} "
                             f"(neuron {int(cols[0])}{' and others' if cols.numel() > 1 else ''}); "
                             "nothing was accumulated")

    @staticmethod
    def _shift(s: torch.Tensor, q: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-column shift (float32 [L, F]): the batch mean, rounded to the input dtype, where mean^2 > var."""
        mean = s / tokens
        var = (q / tokens - mean * mean).clamp_min(0.0)
        shift = torch.where(mean * mean > var, mean, torch.zeros_like(mean))
        return shift.to(dtype).to(torch.float32)

    def _mm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The product's operand dtype: float64 on the CPU and for fp32 inputs, the input's half dtype otherwise."""
        return torch.float64 if self.device.type == "cpu" or dtype == torch.float32 else dtype

    def _group_size(self, tokens: int, dtype: torch.dtype, centred: bool) -> int:
        width_b = self.f_a if self.f_b is None else self.f_b
        block = min(tokens, self.block_tokens)
        mm = self._mm_dtype(dtype)
        acc_bytes = 8 if mm == torch.float64 else 4
        per_layer = 2 * acc_bytes * self.f_a * width_b  # the block accumulator and the product being formed
        if centred or mm != dtype:  # copies of a token block
            per_layer += block * (self.f_a + (0 if self.f_b is None else width_b)) * mm.itemsize
        return max(1, min(self.layers, self.scratch_bytes // max(1, per_layer)))

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, xa: torch.Tensor, xb: torch.Tensor | None = None) -> "CorrelationAccumulator":
        """Add one calibration batch: xa [layers, tokens, f_a] and xb [layers, tokens, f_b] (xb only when f_b was
        given), same dtype, on the accumulator's device. Bad input raises ValueError/TypeError naming the input
        and the layer, before any state changes. Returns self."""
        self._check_usable()
        xa = self._check_input(xa, "xa", self.f_a)
        if self.f_b is None:
            if xb is not None:
                raise ValueError("this accumulator correlates one input with itself (f_b=None): call update(xa)")
        else:
            if xb is None:
                raise ValueError(f"xb is missing: this accumulator correlates xa with an xb of width {self.f_b}")
            xb = self._check_input(xb, "xb", self.f_b)
            if xb.dtype != xa.dtype:
                raise TypeError(f"xa and xb must share one dtype, not {xa.dtype} and {xb.dtype}")
            if xb.shape[1] != xa.shape[1]:
                raise ValueError(f"xa and xb must hold the same tokens: {xa.shape[1]} against {xb.shape[1]}")
        ops = self._ops
        # Pass 1 (changes nothing): batch sums, the finiteness check, the shifts.
        sa, qa = ops.column_moments(xa)
        self._check_finite(sa, qa, "xa")
        if xb is not None:
            sb, qb = ops.column_moments(xb)
            self._check_finite(sb, qb, "xb")
        try:
            self._accumulate(xa, xb, sa, qa, *((sb, qb) if xb is not None else (None, None)))
        except BaseException as exc:  # the float64 totals may be half-merged: refuse further use
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        return self

    def _accumulate(self, xa, xb, sa, qa, sb, qb):
        ops = self._ops
        L, tokens, _ = xa.shape
        dtype = xa.dtype
        mm_dtype = self._mm_dtype(dtype)
        ka = self._shift(sa, qa, tokens, dtype)
        need_a = (ka != 0).any(dim=1).tolist()
        if xb is not None:
            kb = self._shift(sb, qb, tokens, dtype)
            need_b = (kb != 0).any(dim=1).tolist()
        # Sums of the values that enter the product (the shifted ones where a layer is shifted).
        sca, qca = sa.clone(), qa.clone()
        scb, qcb = (sb.clone(), qb.clone()) if xb is not None else (None, None)
        centred = any(need_a) or (xb is not None and any(need_b))
        g = self._group_size(tokens, dtype, centred)
        blocks = [(t, min(tokens, t + self.block_tokens)) for t in range(0, tokens, self.block_tokens)]
        n_old, n_new = self.count, self.count + tokens
        w = n_old * tokens / n_new
        for l0 in range(0, L, g):
            l1 = min(L, l0 + g)
            ca = any(need_a[l0:l1])
            cb = xb is not None and any(need_b[l0:l1])
            if ca:
                sca[l0:l1] = 0.0
                qca[l0:l1] = 0.0
            if cb:
                scb[l0:l1] = 0.0
                qcb[l0:l1] = 0.0
            p = None
            for t0, t1 in blocks:
                a_blk = self._operand(xa[l0:l1, t0:t1], ka[l0:l1] if ca else None, mm_dtype,
                                      sca[l0:l1], qca[l0:l1])
                if xb is None:
                    b_blk = a_blk
                else:
                    b_blk = self._operand(xb[l0:l1, t0:t1], kb[l0:l1] if cb else None, mm_dtype,
                                          scb[l0:l1], qcb[l0:l1])
                nxt = _batched_product(a_blk, b_blk, p)
                if nxt is None:  # no fp32 accumulation into p available: flush p, start again
                    ops.merge_comoment_(self._comoment[l0:l1], p, None, None)
                    nxt = _batched_product(a_blk, b_blk)
                p = nxt
                del a_blk, b_blk, nxt
            # The rank terms need the complete sums of the shifted values: merged with the last product.
            u, v = self._rank_terms(l0, l1, tokens, w, ka, sca, kb if xb is not None else None, scb)
            ops.merge_comoment_(self._comoment[l0:l1], p, u, v)
            del p
        # Chan's update of the means and M2 (small tensors).
        self._merge_stats(self._mean_a, self._m2_a, ka, sca, qca, tokens, n_old, n_new)
        if xb is not None:
            self._merge_stats(self._mean_b, self._m2_b, kb, scb, qcb, tokens, n_old, n_new)
        self.count = n_new

    def _operand(self, x, shift, mm_dtype, s_out, q_out):
        """The product's operand for one block: shifted (accumulating its sums into s_out/q_out) or as is."""
        if shift is None:
            return x if x.dtype == mm_dtype else x.to(mm_dtype)
        y, s, q = self._ops.center(x, shift, mm_dtype)
        s_out += s
        q_out += q
        return y

    def _rank_terms(self, l0, l1, tokens, w, ka, sca, kb, scb):
        """u [g, A, 2], v [g, B, 2] with u v^T = -sum_a sum_b^T / n + w * delta_a delta_b^T (float64)."""
        mean_ba = ka[l0:l1].double() + sca[l0:l1] / tokens
        da = mean_ba - self._mean_a[l0:l1]
        if kb is None:
            scb_, db = sca[l0:l1], da
        else:
            scb_ = scb[l0:l1]
            db = kb[l0:l1].double() + scb_ / tokens - self._mean_b[l0:l1]
        u = torch.stack([-sca[l0:l1] / tokens, w * da], dim=-1)
        v = torch.stack([scb_, db], dim=-1)
        return u.contiguous(), v.contiguous()

    @staticmethod
    def _merge_stats(mean, m2, k, s, q, tokens, n_old, n_new):
        mean_b = k.double() + s / tokens
        m2_b = (q - s * s / tokens).clamp_min(0.0)
        delta = mean_b - mean
        m2 += m2_b + (n_old * tokens / n_new) * delta * delta
        mean += delta * (tokens / n_new)

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def correlation(self, kind: str = "pearson") -> torch.Tensor:
        """[layers, f_a, f_b] float32 on the accumulator's device. "pearson": cov / (std_a std_b); "cosine":
        sum(x y) / (|x| |y|) over the raw activations. A neuron with zero variance (pearson) or all-zero
        activations (cosine) correlates 0 with everything; values are clamped to [-1, 1]."""
        self._check_usable()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if self.count == 0:
            raise ValueError("no tokens accumulated yet: call update() first")
        mean_a, m2_a = self._mean_a, self._m2_a
        mean_b, m2_b = (mean_a, m2_a) if self.f_b is None else (self._mean_b, self._m2_b)
        if kind == "pearson":
            da, db, alpha = m2_a, m2_b, 0.0
        else:
            da = m2_a + self.count * mean_a * mean_a
            db = m2_b + self.count * mean_b * mean_b
            alpha = float(self.count)
        inv_a = torch.where(da > 0, da.clamp_min(1e-300).rsqrt(), torch.zeros_like(da))
        inv_b = torch.where(db > 0, db.clamp_min(1e-300).rsqrt(), torch.zeros_like(db))
        return self._ops.finalize(self._comoment, mean_a.contiguous(), mean_b.contiguous(), alpha,
                                  inv_a.contiguous(), inv_b.contiguous())

    def statistics(self) -> dict:
        """Float64 column statistics: {"mean_a", "var_a", "mean_b", "var_b"} ([layers, f] population variance)."""
        self._check_usable()
        n = max(self.count, 1)
        out = {"mean_a": self._mean_a.clone(), "var_a": self._m2_a / n}
        if self.f_b is None:
            out.update(mean_b=out["mean_a"], var_b=out["var_a"])
        else:
            out.update(mean_b=self._mean_b.clone(), var_b=self._m2_b / n)
        return out

    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The float64 state (count, means, M2s, comoment) for saving or for `load_state_dict` elsewhere."""
        self._check_usable()
        return {"count": self.count, "mean_a": self._mean_a.clone(), "m2_a": self._m2_a.clone(),
                "mean_b": None if self._mean_b is None else self._mean_b.clone(),
                "m2_b": None if self._m2_b is None else self._m2_b.clone(), "comoment": self._comoment.clone()}

    def load_state_dict(self, state: dict) -> "CorrelationAccumulator":
        """Replace the state by one from `state_dict()` of an accumulator of the same sizes."""
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise ValueError(f"state must be a dict with keys {', '.join(_STATE_KEYS)}")
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state['count'] must be a non-negative int, not {count!r}")
        width_b = self.f_a if self.f_b is None else self.f_b
        shapes = {"mean_a": (self.layers, self.f_a), "m2_a": (self.layers, self.f_a),
                  "comoment": (self.layers, self.f_a, width_b)}
        if self.f_b is not None:
            shapes.update(mean_b=(self.layers, self.f_b), m2_b=(self.layers, self.f_b))
        elif state["mean_b"] is not None or state["m2_b"] is not None:
            raise ValueError("state is of a two-input accumulator; this one correlates one input with itself")
        for key, shape in shapes.items():
            t = state[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"state[{key!r}] must be a tensor of shape {list(shape)}, "
                                 f"not {getattr(t, 'shape', type(t).__name__)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state[{key!r}] holds non-finite values")
        f64 = dict(dtype=torch.float64, device=self.device)
        with torch.inference_mode(False):
            self._mean_a = state["mean_a"].to(**f64).clone()
            self._m2_a = state["m2_a"].to(**f64).clone()
            if self.f_b is not None:
                self._mean_b = state["mean_b"].to(**f64).clone()
                self._m2_b = state["m2_b"].to(**f64).clone()
            self._comoment = state["comoment"].to(**f64).clone()
        self.count = count
        self._broken = None
        return self

    @torch.no_grad()
    def merge(self, other: "CorrelationAccumulator") -> "CorrelationAccumulator":
        """Add another accumulator's tokens (e.g. one from another process, through its state_dict)."""
        self._check_usable()
        if not isinstance(other, CorrelationAccumulator):
            raise TypeError(f"can only merge a CorrelationAccumulator, not {type(other).__name__}")
        other._check_usable()
        if (other.layers, other.f_a, other.f_b) != (self.layers, self.f_a, self.f_b):
            raise ValueError(f"cannot merge sizes {(other.layers, other.f_a, other.f_b)} into "
                             f"{(self.layers, self.f_a, self.f_b)}")
        if other.count == 0:
            return self
        n1, n2 = self.count, other.count
        n = n1 + n2
        w = n1 * n2 / n
        dev = self.device
        ma2, m2a2 = other._mean_a.to(dev), other._m2_a.to(dev)
        da = ma2 - self._mean_a
        if self.f_b is None:
            db = da
        else:
            db = other._mean_b.to(dev) - self._mean_b
        self._comoment += other._comoment.to(dev)
        self._comoment.baddbmm_(da[:, :, None], db[:, None, :], alpha=w)
        self._m2_a += m2a2 + w * da * da
        self._mean_a += da * (n2 / n)
        if self.f_b is not None:
            self._m2_b += other._m2_b.to(dev) + w * db * db
            self._mean_b += db * (n2 / n)
        self.count = n
        return self


def reference_correlation(xa, xb=None, kind: str = "pearson"):
    """float64 reference: [layers, f_a, f_b] correlation of whole activation sets (for tests; numpy-free)."""
    xa = xa.to(torch.float64)
    xb = xa if xb is None else xb.to(torch.float64)
    if kind == "pearson":
        xa = xa - xa.mean(dim=1, keepdim=True)
        xb = xb - xb.mean(dim=1, keepdim=True)
    c = xa.transpose(1, 2) @ xb
    na, nb = xa.square().sum(1), xb.square().sum(1)
    ia = torch.where(na > 0, 1 / na.clamp_min(1e-300).sqrt(), torch.zeros_like(na))
    ib = torch.where(nb > 0, 1 / nb.clamp_min(1e-300).sqrt(), torch.zeros_like(nb))
    return (c * ia[:, :, None] * ib[:, None, :]).clamp(-1, 1)


__all__ = ["CorrelationAccumulator", "TorchOps", "reference_correlation", "SUPPORTED_DTYPES", "KINDS"]
