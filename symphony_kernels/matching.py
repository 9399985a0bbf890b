"""Maximum-weight perfect matching of neurons (linear assignment), per layer, on the CPU or the GPU.

`linear_assignment(scores)` takes [n, n] or [layers, n, n] scores and returns perm [n] / [layers, n] (int64, on
the scores' device) with perm[i] the column matched to row i, maximising sum_i scores[i, perm[i]] (minimising
with maximize=False).

Solvers:
- "scipy": exact; scipy.optimize.linear_sum_assignment, layer by layer, in float64 on the CPU.
- "auction": Bertsekas' forward auction with epsilon scaling, batched over layers. On a GPU with the extension it
  runs csrc/auction_cuda.cu: every layer's persons are shared among many warps that bid asynchronously (a warp
  scans a row for the best and second-best profit, then one 64-bit atomicMax on (price, bidder) settles the
  object), with no grid-wide barrier inside a phase. Elsewhere a vectorised Jacobi auction in torch runs the
  same phases (any device; float64 on the CPU). After each phase the result is certified against the dual
  bound D = sum_j price_j + sum_i max_j (scores_ij - price_j) >= optimum: a layer is done once
  D - objective <= eps * max(|objective|, 1e-3 * n * max|scores|), so the returned matching is within that
  relative gap of the exact optimum (eps defaults to 1e-5, ten times under the 1e-4 asked for). A layer
  that cannot be certified (bid cap reached, float32 price resolution exhausted) is solved by scipy instead,
  with a warning: never a silently worse matching.
- "auto": "auction" when the scores are on a CUDA device and n >= AUTO_AUCTION_MIN_N (512), else "scipy".

`matching_objective(scores, perm)` gives sum_i scores[i, perm[i]] per layer in float64.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _ext

SOLVERS = ("auto", "scipy", "auction")
AUTO_AUCTION_MIN_N = 512
DEFAULT_EPS = 1e-5
_THETA = 6.0  # epsilon reduction per phase


def _check_scores(scores) -> tuple[torch.Tensor, bool]:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, not {type(scores).__name__}")
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores must be [n, n] or [layers, n, n], not {list(scores.shape)}")
    if scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be square (a perfect matching of n rows to n columns), not "
                         f"{list(scores.shape[-2:])}")
    if scores.is_complex() or not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64,
                                                                                   torch.int16, torch.int8,
                                                                                   torch.uint8)):
        raise TypeError(f"scores must be real numbers, not {scores.dtype}")
    batched = scores.dim() == 3
    s = scores if batched else scores[None]
    if s.shape[1] == 0:
        raise ValueError("scores are empty (n = 0)")
    if s.is_floating_point():
        lo, hi = torch.aminmax(s.flatten(1), dim=1)  # NaN and inf show in the extremes; no [L, n, n] temporary
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
        if bool(bad.any()):
            layer = int(bad.nonzero()[0, 0])
            raise ValueError("scores hold non-finite values (NaN or inf)" + (f" in layer {layer}" if batched else ""))
    return s, batched


def matching_objective(scores: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """sum_i scores[i, perm[i]] in float64: a scalar tensor for [n, n], else [layers]."""
    s, batched = _check_scores(scores)
    p = perm if batched else perm[None]
    if tuple(p.shape) != tuple(s.shape[:2]):
        raise ValueError(f"perm must have shape {list(s.shape[:2]) if batched else [s.shape[1]]}, "
                         f"not {list(perm.shape)}")
    total = s.gather(2, p.to(s.device, torch.long)[:, :, None]).squeeze(2).double().sum(dim=1)
    return total if batched else total[0]


def linear_assignment(scores: torch.Tensor, *, maximize: bool = True, solver: str = "auto",
                      eps: float | None = None) -> torch.Tensor:
    """Best one-to-one matching of rows to columns per layer. Returns int64 perm [n] or [layers, n] on the scores'
    device; perm[i] is the column matched to row i. eps: the auction's certified relative optimality gap
    (default 1e-5); ignored by scipy. Raises ValueError for non-square, empty or non-finite scores."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1), not {eps!r}")
    s, batched = _check_scores(scores)
    solver = resolve_solver(solver, s)
    if not s.is_floating_point():
        s = s.double()
    if not maximize:
        s = -s
    if solver == "scipy":
        perm = _scipy(s)
    else:
        perm = auction(s, eps=DEFAULT_EPS if eps is None else float(eps))
    perm = perm.to(scores.device)
    return perm if batched else perm[0]


def resolve_solver(solver: str, scores: torch.Tensor) -> str:
    """The solver "auto" stands for: "auction" for CUDA scores with n >= AUTO_AUCTION_MIN_N, else "scipy"."""
    if solver != "auto":
        return solver
    return "auction" if scores.is_cuda and scores.shape[-1] >= AUTO_AUCTION_MIN_N else "scipy"


def _scipy(s: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    host = s.detach().to("cpu", torch.float64).numpy()
    out = np.empty(host.shape[:2], dtype=np.int64)
    for layer in range(host.shape[0]):
        rows, cols = linear_sum_assignment(host[layer], maximize=True)
        out[layer, rows] = cols
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------------------
# Auction with epsilon scaling
# --------------------------------------------------------------------------------------------------------------
def auction(s: torch.Tensor, *, eps: float = DEFAULT_EPS, backend: str = "auto",
            bid_cap: int | None = None) -> torch.Tensor:
    """Maximising auction on [layers, n, n] finite scores (linear_assignment checks them); returns perm
    [layers, n] (int64, on s's device).

    backend: "auto" (the CUDA kernel on a GPU when the extension has it, else torch), "cuda" or "torch".
    bid_cap: bids per layer and phase before the layer is given up (default 2000 n + 100000).
    Layers that the auction cannot certify within `eps` are solved exactly by scipy (with a warning)."""
    if backend not in ("auto", "cuda", "torch"):
        raise ValueError(f"backend must be auto, cuda or torch, not {backend!r}")
    L, n, _ = s.shape
    if n == 1:
        return torch.zeros(L, 1, dtype=torch.long, device=s.device)
    module = _ext.load() if backend in ("auto", "cuda") and s.is_cuda else None
    use_cuda = module is not None and module.has_cuda()
    if backend == "cuda" and not use_cuda:
        raise ValueError("backend 'cuda' needs CUDA scores and the extension's CUDA kernels")
    work_dtype = torch.float32 if s.is_cuda else torch.float64
    a = s.detach().to(work_dtype).contiguous()
    lo, hi = torch.aminmax(a.flatten(1), dim=1)
    scale = torch.maximum(lo.abs(), hi.abs()).double()  # [L]
    perm = torch.arange(n, device=a.device).repeat(L, 1)
    price = torch.zeros(L, n, dtype=work_dtype, device=a.device)
    # float32 prices resolve about 2^-23 of their magnitude: keep eps well above that.
    floor = scale * (2.0 ** -20 if work_dtype == torch.float32 else 2.0 ** -45)
    eps_l = torch.maximum(scale / 4.0, floor)
    active = scale > 0  # an all-zero layer: every matching is optimal, keep the identity
    uncertain = torch.zeros(L, dtype=torch.bool, device=a.device)
    runner = _CudaAuction(module, a, price) if use_cuda else _TorchAuction(a, price)
    cap = 2000 * n + 100_000 if bid_cap is None else int(bid_cap)
    while bool(active.any()):
        layers = active.nonzero()[:, 0]
        done, mine = runner.phase(layers, eps_l, cap)
        ok = done & _is_permutation(mine)
        perm[layers[ok]] = mine[ok]
        failed = layers[~ok]
        if failed.numel():
            uncertain[failed] = True
            active[failed] = False
        good = layers[ok]
        if good.numel():
            primal = _objective(a, good, mine[ok])
            dual = runner.dual(good)
            target = eps * torch.maximum(primal.abs(), 1e-3 * n * scale[good])
            fine = (dual - primal) <= target
            at_floor = eps_l[good] <= floor[good] * (1 + 1e-9)
            uncertain[good[~fine & at_floor]] = True
            active[good[fine | at_floor]] = False
            eps_l[good] = torch.maximum(eps_l[good] / _THETA, floor[good])
        # Prices only matter up to a common shift: keep them small so that float32 resolves eps.
        price -= price.amin(dim=1, keepdim=True)
    if bool(uncertain.any()):
        bad = uncertain.nonzero()[:, 0]
        warnings.warn(f"auction could not certify layer(s) {bad.tolist()} within eps={eps:g}; "
                      "solved them exactly with scipy instead", RuntimeWarning, stacklevel=3)
        perm[bad] = _scipy(s[bad]).to(perm.device)
    return perm


def _is_permutation(mine: torch.Tensor) -> torch.Tensor:
    n = mine.shape[1]
    if mine.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=mine.device)
    valid = ((mine >= 0) & (mine < n)).all(dim=1)
    srt = torch.sort(mine.clamp(0, n - 1), dim=1).values
    return valid & (srt == torch.arange(n, device=mine.device)).all(dim=1)


def _objective(a: torch.Tensor, layers: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sum_i a[l, i, cols[k, i]] for l = layers[k], float64, without copying any layer of a."""
    n = a.shape[1]
    flat = a.view(a.shape[0], n * n)
    idx = torch.arange(n, device=a.device) * n + cols
    return flat[layers[:, None], idx].double().sum(dim=1)


def _row_profit(a: torch.Tensor, price: torch.Tensor, layers: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """sum_j price_j + sum_i max_j (a_ij - price_j) per layer, float64 (torch, row chunks to bound memory)."""
    n = a.shape[1]
    rows = max(1, chunk // n)
    out = torch.zeros(layers.numel(), dtype=torch.float64, device=a.device)
    for k, l in enumerate(layers.tolist()):
        p = price[l].double()
        tot = p.sum()
        for r0 in range(0, n, rows):
            tot = tot + (a[l, r0:r0 + rows].double() - p).amax(dim=1).sum()
        out[k] = tot
    return out


class _TorchAuction:
    """Jacobi auction: every unassigned person bids at once; an object goes to its highest bid (ties: the higher
    person id). Ties between objects go to the first in the order (i + k) mod n, which spreads identical rows."""

    def __init__(self, a: torch.Tensor, price: torch.Tensor):
        self.a, self.price = a, price
        n = a.shape[1]
        self.ar = torch.arange(n, device=a.device)
        self.rows_per_step = max(1, (1 << 24) // n)

    def phase(self, layers: torch.Tensor, eps_l: torch.Tensor, cap: int):
        a, price, ar = self.a, self.price, self.ar
        La, n = layers.numel(), a.shape[1]
        dev = a.device
        owner = torch.full((La, n), -1, dtype=torch.long, device=dev)  # object -> person
        mine = torch.full((La, n), -1, dtype=torch.long, device=dev)   # person -> object
        eps = eps_l[layers].to(a.dtype)
        lp = price[layers]  # prices of the active layers (copied back at the end)
        bids = 0
        while True:
            un = (mine < 0).nonzero()
            m = un.shape[0]
            if m == 0:
                break
            bids += m
            if bids > cap:
                price[layers] = lp
                return torch.zeros(La, dtype=torch.bool, device=dev), mine
            k_idx, i_idx = un[:, 0], un[:, 1]
            j_all, bid_all = [], []
            for r0 in range(0, m, self.rows_per_step):
                k, i = k_idx[r0:r0 + self.rows_per_step], i_idx[r0:r0 + self.rows_per_step]
                cols = (i[:, None] + ar[None, :]) % n
                vals = a[layers[k][:, None], i[:, None], cols] - lp[k[:, None], cols]
                r1 = vals.argmax(dim=1, keepdim=True)
                v1 = vals.gather(1, r1)
                v2 = vals.scatter(1, r1, float("-inf")).amax(dim=1, keepdim=True)
                j = cols.gather(1, r1)[:, 0]
                j_all.append(j)
                bid_all.append(lp[k, j] + (v1 - v2)[:, 0] + eps[k])
            j, bid = torch.cat(j_all), torch.cat(bid_all)
            key = k_idx * n + j
            best = torch.full((La * n,), float("-inf"), dtype=a.dtype, device=dev)
            best.scatter_reduce_(0, key, bid, reduce="amax")
            top = bid == best[key]
            who = torch.full((La * n,), -1, dtype=torch.long, device=dev)
            who.scatter_reduce_(0, key[top], i_idx[top], reduce="amax")
            win = top & (i_idx == who[key])
            kw, jw, iw = k_idx[win], j[win], i_idx[win]
            prev = owner[kw, jw]
            had = prev >= 0
            mine[kw[had], prev[had]] = -1
            owner[kw, jw] = iw
            mine[kw, iw] = jw
            lp[kw, jw] = bid[win]
        price[layers] = lp
        return torch.ones(La, dtype=torch.bool, device=dev), mine

    def dual(self, layers: torch.Tensor) -> torch.Tensor:
        return _row_profit(self.a, self.price, layers)


class _CudaAuction:
    """The extension's asynchronous GPU auction (csrc/auction_cuda.cu); state lives on the device."""

    def __init__(self, module, a: torch.Tensor, price: torch.Tensor):
        self.m, self.a, self.price = module, a, price
        L, n, _ = a.shape
        dev = a.device
        self.owner = torch.empty(L, n, dtype=torch.int64, device=dev)
        self.mine = torch.empty(L, n, dtype=torch.int32, device=dev)
        self.counters = torch.zeros(L, 4, dtype=torch.int64, device=dev)  # owned, bids, failed, spare

    def phase(self, layers: torch.Tensor, eps_l: torch.Tensor, cap: int):
        lay = layers.to(torch.int32).contiguous()
        self.m.auction_phase(self.a, lay, eps_l.to(torch.float32).contiguous(), self.price, self.owner, self.mine,
                             self.counters, int(cap))
        done = self.counters[layers, 2] == 0
        return done, self.mine[layers].long()

    def dual(self, layers: torch.Tensor) -> torch.Tensor:
        profit = self.m.auction_profit(self.a, layers.to(torch.int32).contiguous(), self.price)  # [La, n] f64
        return profit.sum(dim=1) + self.price[layers].double().sum(dim=1)


__all__ = ["linear_assignment", "matching_objective", "auction", "resolve_solver", "SOLVERS", "AUTO_AUCTION_MIN_N"]
