"""Stage 1a, backbone fusion: SLERP / spherical mean of attention weights, averaged norms, and the selective
merge of embedding and lm_head rows over the union vocabulary.

SLERP here treats a tensor as one flat vector x = |x| * u (norm times direction). Two tensors a, b at
interpolation factor t give the point at fraction t of the great-circle arc from u_a to u_b, scaled by the
linearly interpolated norm (1 - t)|a| + t|b|:

    slerp(a, b, t) = ((1 - t)|a| + t|b|) * (sin((1 - t) theta) u_a + sin(t theta) u_b) / sin(theta),
    theta = arccos(<u_a, u_b>).

For N > 2 tensors with weights w_i (summing to 1) the direction is the weighted spherical (Karcher) mean of
the u_i: the unit vector q minimising sum_i w_i * angle(q, u_i)^2, found by Riemannian gradient steps
q <- exp_q(sum_i w_i log_q(u_i)) from the normalised linear mean; the norm is sum_i w_i |x_i|. For N = 2 this
is exactly slerp(a, b, w_b). The mean is unique when the directions lie within a quarter circle of each other
(angles below 90 degrees), which related checkpoints do by far; the iteration runs in the span of the inputs
(an N x N Gram matrix in float64), so it costs two passes over the tensors.

Fallbacks: near-colinear directions (every pairwise angle below 1e-4 rad), a zero tensor, or a pair of
opposite directions (angle above 90 degrees, where the mean is not unique) use the weighted linear mean.
Identical inputs are returned exactly (bit for bit), and a weight of 1 on one input returns that input.

Weights from the config's `t` (`source_weights`): t = None gives every source 1/N; a number t gives the
anchor 1 - t and the other sources t / (N - 1) each (for N = 2: slerp(anchor, other, t)). A per-layer list
is one t per layer, or >= 2 values spread evenly over the layers and linearly interpolated
(`layer_schedule`).

Selective merge of vocabulary rows (`merge_rows`): a union row is the mean of the rows of the sources that
have the token (mode "selective"), or the anchor's row where the anchor has the token (mode "anchor"); a
token one source alone has keeps that source's row. Sums run in a wider dtype than the inputs (float32 for
16-bit inputs, float64 for float32 ones), so a row all sources share bit for bit comes out unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

COLINEAR_ANGLE = 1e-4   # radians: below this for every pair, interpolate linearly
MAX_ANGLE = math.pi / 2  # above this for some pair, the spherical mean is not unique: interpolate linearly
_CHUNK = 1 << 22         # elements per chunk of the float64 passes


def source_weights(n: int, anchor_index: int, t: float | None) -> list[float]:
    """Fusion weights of n sources: equal for t=None, else 1 - t for the anchor and t / (n - 1) for each other."""
    if n < 1 or not 0 <= anchor_index < n:
        raise ValueError(f"bad source count {n} or anchor index {anchor_index}")
    if t is None:
        return [1.0 / n] * n
    if not 0 <= t <= 1:
        raise ValueError(f"t must lie in [0, 1], not {t}")
    if n == 1:
        return [1.0]
    return [1.0 - t if i == anchor_index else t / (n - 1) for i in range(n)]


def layer_schedule(t, num_layers: int) -> list[float | None]:
    """One t per layer from None, a number, a list of num_layers values, or >= 2 values spread evenly over the
    layers and linearly interpolated."""
    if t is None or isinstance(t, (int, float)):
        return [t] * num_layers
    t = list(t)
    if len(t) == num_layers:
        return [float(v) for v in t]
    if len(t) < 2:
        raise ValueError(f"a t schedule needs one value per layer ({num_layers}) or at least 2 values, not {t}")
    out = []
    for layer in range(num_layers):
        pos = layer / max(1, num_layers - 1) * (len(t) - 1)
        i = min(int(pos), len(t) - 2)
        frac = pos - i
        out.append((1 - frac) * t[i] + frac * t[i + 1])
    return out


def _check(tensors, weights):
    if not tensors:
        raise ValueError("nothing to fuse")
    if weights is None:
        weights = [1.0 / len(tensors)] * len(tensors)
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights for {len(tensors)} tensors")
    shape, dtype = tensors[0].shape, tensors[0].dtype
    for x in tensors[1:]:
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(f"tensors to fuse differ: {tuple(shape)} {dtype} vs {tuple(x.shape)} {x.dtype}")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0: {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _trivial(tensors, weights, dtype) -> torch.Tensor | None:
    """The exact answer where there is one: a single weighted input, or identical inputs."""
    nonzero = [x for x, w in zip(tensors, weights) if w > 0]
    if len(nonzero) == 1 or all(torch.equal(nonzero[0], x) for x in nonzero[1:]):
        return nonzero[0].to(dtype, copy=True)
    return None


def _combine(tensors, coefs, dtype) -> torch.Tensor:
    """sum_i coefs[i] * tensors[i], accumulated in float64 chunk by chunk, returned in `dtype`."""
    flat = [x.reshape(-1) for x in tensors]
    out = torch.empty(flat[0].numel(), dtype=dtype, device=flat[0].device)
    for start in range(0, out.numel(), _CHUNK):
        acc = sum(c * x[start:start + _CHUNK].double() for c, x in zip(coefs, flat) if c != 0)
        out[start:start + _CHUNK] = acc
    return out.view(tensors[0].shape)


def _gram(tensors) -> torch.Tensor:
    flat = [x.reshape(-1) for x in tensors]
    n = len(flat)
    g = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, flat[0].numel(), _CHUNK):
        block = torch.stack([x[start:start + _CHUNK].double() for x in flat])
        g += (block @ block.T).cpu()
    return g


def linear_mean(tensors: list[torch.Tensor], weights=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted mean (weights normalised to sum 1; default equal) in `dtype` (default: the inputs'), computed in
    float64; identical inputs are returned exactly."""
    weights = _check(tensors, weights)
    dtype = dtype or tensors[0].dtype
    exact = _trivial(tensors, weights, dtype)
    return exact if exact is not None else _combine(tensors, weights, dtype)


def karcher_coefficients(gram: torch.Tensor, weights: torch.Tensor, *, max_iter: int = 200,
                         tol: float = 1e-13) -> torch.Tensor:
    """Coefficients c of the weighted spherical mean q = sum_i c_i u_i of unit vectors u_i given by their Gram
    matrix (float64); raises ValueError if the iteration does not converge."""
    n = gram.shape[0]
    c = weights / torch.sqrt(weights @ gram @ weights)
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(max_iter):
        cos = (gram @ c).clamp(-1, 1)
        theta = torch.arccos(cos)
        scale = torch.where(theta > 1e-12, theta / torch.sin(theta).clamp_min(1e-300), torch.ones_like(theta))
        # tangent vector v = sum_i w_i * theta_i / sin(theta_i) * (u_i - cos_i q), as coefficients
        v = ((weights * scale)[:, None] * (eye - cos[:, None] * c[None, :])).sum(0)
        norm = torch.sqrt((v @ gram @ v).clamp_min(0))
        if norm < tol:
            return c
        c = torch.cos(norm) * c + torch.sin(norm) * v / norm
        c = c / torch.sqrt(c @ gram @ c)
    raise ValueError("the spherical mean did not converge")


def spherical_mean(tensors: list[torch.Tensor], weights=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted spherical mean of N >= 1 tensors (see the module docstring); for N = 2, slerp(a, b, w_b). The
    result is in `dtype` (default: the inputs'), computed in float64."""
    weights = _check(tensors, weights)
    dtype = dtype or tensors[0].dtype
    exact = _trivial(tensors, weights, dtype)
    if exact is not None:
        return exact
    keep = [i for i, w in enumerate(weights) if w > 0]
    xs, ws = [tensors[i] for i in keep], torch.tensor([weights[i] for i in keep], dtype=torch.float64)
    gram = _gram(xs)
    norms = gram.diagonal().sqrt()
    if bool((norms == 0).any()):
        return _combine(xs, ws.tolist(), dtype)
    cos = (gram / norms[:, None] / norms[None, :]).clamp(-1, 1)
    angles = torch.arccos(cos)
    if float(angles.max()) < COLINEAR_ANGLE or float(angles.max()) > MAX_ANGLE:
        return _combine(xs, ws.tolist(), dtype)
    if len(xs) == 2:
        theta, t = float(angles[0, 1]), float(ws[1])
        c = torch.tensor([math.sin((1 - t) * theta), math.sin(t * theta)], dtype=torch.float64) / math.sin(theta)
    else:
        c = karcher_coefficients(cos, ws)
    radius = float(ws @ norms)
    return _combine(xs, (radius * c / norms).tolist(), dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two tensors at t in [0, 1] (t = 0 gives a, t = 1 gives b); see the module docstring."""
    if not 0 <= t <= 1:
        raise ValueError(f"t must lie in [0, 1], not {t}")
    return spherical_mean([a, b], [1.0 - t, t])


def fuse(tensors: list[torch.Tensor], weights, mode: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fuse one tensor of every source: mode "slerp" (spherical mean) or "linear" (weighted mean)."""
    if mode == "slerp":
        return spherical_mean(tensors, weights, dtype)
    if mode == "linear":
        return linear_mean(tensors, weights, dtype)
    raise ValueError(f"unknown fusion mode {mode!r}")


def _wider(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def merge_rows(read_rows: Callable[[int, int, int], torch.Tensor], local_ids: list[torch.Tensor],
               anchor_index: int, mode: str, dtype: torch.dtype, chunk: int = 8192) -> Iterator[torch.Tensor]:
    """Selective merge of vocabulary rows, yielded in chunks of union rows (each [rows, d] in `dtype`).

    `read_rows(s, lo, hi)` returns rows lo..hi-1 of source s's tensor; `local_ids[s][u]` is source s's row for
    union row u (-1: the source lacks the token). Mode "selective": the mean of every source that has the
    row; "anchor": the anchor's row where it has it, else the mean of the sources that do.
    """
    if mode not in ("selective", "anchor"):
        raise ValueError(f"unknown embedding merge mode {mode!r}")
    size = local_ids[0].numel()
    for lo in range(0, size, chunk):
        hi = min(size, lo + chunk)
        ids = torch.stack([m[lo:hi] for m in local_ids])  # [sources, rows]
        use = ids >= 0
        if mode == "anchor":
            has_anchor = use[anchor_index]
            use = torch.where(has_anchor[None, :], torch.zeros_like(use), use)
            use[anchor_index] = has_anchor
        acc, count = None, torch.zeros(hi - lo, dtype=torch.long)
        for s in range(len(local_ids)):
            rows = use[s].nonzero().flatten()
            if rows.numel() == 0:
                continue
            local = ids[s, rows]
            first, last = int(local.min()), int(local.max()) + 1
            if last - first <= 4 * chunk:
                block = read_rows(s, first, last)[local - first]
            else:  # scattered rows: read them one by one
                block = torch.cat([read_rows(s, int(i), int(i) + 1) for i in local.tolist()])
            if acc is None:
                acc = torch.zeros(hi - lo, block.shape[1], dtype=_wider(block.dtype))
            acc.index_add_(0, rows, block.to(acc.dtype))
            count.index_add_(0, rows, torch.ones_like(rows))
        if acc is None or bool((count == 0).any()):
            raise ValueError(f"union rows {lo}..{hi - 1} include a row no source has")
        yield (acc / count[:, None].to(acc.dtype)).to(dtype)
