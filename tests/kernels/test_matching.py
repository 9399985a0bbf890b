"""linear_assignment: exact scipy solver, the auction (torch on the CPU; the CUDA kernel on a GPU) within its
certified gap of the optimum on random and adversarial matrices, planted permutations, and the input contract."""
import itertools
import warnings

import pytest
import torch

from symphony_kernels import _ext
from symphony_kernels.matching import (AUTO_AUCTION_MIN_N, auction, linear_assignment, matching_objective,
                                       resolve_solver)


def brute_force(scores):
    n = scores.shape[0]
    return max(sum(float(scores[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))


def is_perm(p):
    n = p.shape[-1]
    return bool((torch.sort(p, dim=-1).values == torch.arange(n, device=p.device)).all())


def rel_gap(scores, perm, ref_perm):
    best = matching_objective(scores, ref_perm)
    got = matching_objective(scores, perm)
    return float(((best - got) / best.abs().clamp_min(1e-12)).max())


def adversarial(n, g):
    """Matrices with ties and degenerate structure, each [n, n]."""
    row = torch.rand(n, generator=g)
    return {
        "all_equal": torch.full((n, n), 0.5),
        "identical_rows": row.repeat(n, 1),
        "identical_columns": row[:, None].repeat(1, n),
        "integer_ties": torch.randint(0, 3, (n, n), generator=g).float(),
        "rank_one": torch.outer(torch.rand(n, generator=g), torch.rand(n, generator=g)),
        "negative": -torch.rand(n, n, generator=g) - 5.0,
        "two_blocks": torch.block_diag(torch.ones(n // 2, n // 2), 2 * torch.ones(n - n // 2, n - n // 2)),
        "tiny_range": 1.0 + 1e-6 * torch.rand(n, n, generator=g),
    }


@pytest.mark.parametrize("solver", ["scipy", "auction"])
def test_small_matrices_reach_the_brute_force_optimum(solver):
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 7):
        s = torch.randn(n, n, generator=g)
        p = linear_assignment(s, solver=solver)
        assert p.shape == (n,) and p.dtype == torch.long and is_perm(p)
        assert abs(float(matching_objective(s, p)) - brute_force(s)) < 1e-9 * max(1.0, abs(brute_force(s)))
        q = linear_assignment(s, solver=solver, maximize=False)
        assert abs(float(matching_objective(-s, q)) - brute_force(-s)) < 1e-9 * max(1.0, abs(brute_force(-s)))


@pytest.mark.parametrize("n", [40, 65])
def test_auction_matches_scipy_on_random_matrices(n):
    g = torch.Generator().manual_seed(n)
    for s in (torch.rand(3, n, n, generator=g), torch.randn(3, n, n, generator=g).double(),
              torch.randn(3, n, n, generator=g).tanh() * 0.1):
        exact = linear_assignment(s, solver="scipy")
        p = linear_assignment(s, solver="auction")
        assert p.shape == (3, n) and is_perm(p)
        assert rel_gap(s, p, exact) <= 1e-5


def test_auction_on_adversarial_matrices():
    g = torch.Generator().manual_seed(1)
    for name, s in adversarial(24, g).items():
        exact = linear_assignment(s, solver="scipy")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # certified by the auction itself, no fallback
            p = linear_assignment(s, solver="auction")
        assert is_perm(p), name
        assert rel_gap(s, p, exact) <= 1e-4, name


def test_planted_permutation_is_recovered_exactly():
    g = torch.Generator().manual_seed(2)
    L, n = 3, 96
    planted = torch.stack([torch.randperm(n, generator=g) for _ in range(L)])
    s = torch.rand(L, n, n, generator=g) * 0.9
    s.scatter_(2, planted[:, :, None], 1.0)
    for solver in ("scipy", "auction"):
        assert torch.equal(linear_assignment(s, solver=solver), planted), solver


def test_uncertifiable_layers_fall_back_to_scipy_with_a_warning():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(2, 30, 30, generator=g).double()
    with pytest.warns(RuntimeWarning, match="solved them exactly with scipy"):
        p = auction(s, bid_cap=5)
    assert torch.allclose(matching_objective(s, p), matching_objective(s, linear_assignment(s, solver="scipy")))


def test_matching_objective():
    s = torch.arange(9.0).reshape(3, 3)
    assert float(matching_objective(s, torch.tensor([2, 1, 0]))) == 2 + 4 + 6
    out = matching_objective(torch.stack([s, -s]), torch.tensor([[0, 1, 2], [2, 0, 1]]))
    assert out.shape == (2,) and out.dtype == torch.float64 and out.tolist() == [12.0, -(2 + 3 + 7)]
    with pytest.raises(ValueError, match="perm must have shape"):
        matching_objective(s, torch.tensor([0, 1]))


def test_solver_choice_rule():
    assert resolve_solver("auto", torch.zeros(4, 4)) == "scipy"
    assert resolve_solver("auto", torch.zeros(2, AUTO_AUCTION_MIN_N, AUTO_AUCTION_MIN_N)) == "scipy"  # on the CPU
    assert resolve_solver("auction", torch.zeros(4, 4)) == "auction"
    if torch.cuda.is_available():
        assert resolve_solver("auto", torch.zeros(AUTO_AUCTION_MIN_N, AUTO_AUCTION_MIN_N, device="cuda")) == "auction"
        assert resolve_solver("auto", torch.zeros(8, 8, device="cuda")) == "scipy"


def test_bad_scores_are_refused():
    cases = [
        (torch.zeros(3, 4), ValueError, "square"),
        (torch.zeros(2, 3, 4), ValueError, "square"),
        (torch.zeros(5), ValueError, r"\[n, n\] or \[layers, n, n\]"),
        (torch.zeros(1, 1, 2, 2), ValueError, r"\[n, n\] or \[layers, n, n\]"),
        (torch.zeros(2, 0, 0), ValueError, "empty"),
        (torch.zeros(3, 3, dtype=torch.complex64), TypeError, "real"),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "torch.Tensor"),
    ]
    nan = torch.rand(3, 4, 4)
    nan[2, 1, 1] = float("nan")
    cases.append((nan, ValueError, "non-finite.*layer 2"))
    inf = torch.rand(4, 4)
    inf[0, 3] = -float("inf")
    cases.append((inf, ValueError, "non-finite"))
    for scores, exc, msg in cases:
        for solver in ("scipy", "auction", "auto"):
            with pytest.raises(exc, match=msg):
                linear_assignment(scores, solver=solver)
    with pytest.raises(ValueError, match="solver"):
        linear_assignment(torch.zeros(2, 2), solver="hungarian")
    with pytest.raises(ValueError, match="eps"):
        linear_assignment(torch.zeros(2, 2), solver="auction", eps=2.0)


def test_integer_scores_and_device_of_result():
    s = torch.tensor([[1, 5], [4, 1]])
    for solver in ("scipy", "auction"):
        p = linear_assignment(s, solver=solver)
        assert p.tolist() == [1, 0] and p.device == s.device


# ---- GPU ------------------------------------------------------------------------------------------------------
def _cuda_auction_or_skip():
    module = _ext.load()
    if module is None or not module.has_cuda():
        pytest.skip(f"CUDA extension unavailable: {_ext.info()['reason']}")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [257, 1024])  # scalar and 16-byte paths
def test_cuda_auction_matches_scipy(n):
    _cuda_auction_or_skip()
    g = torch.Generator().manual_seed(n)
    for s in (torch.rand(3, n, n, generator=g), torch.randn(3, n, n, generator=g).tanh()):
        exact = linear_assignment(s, solver="scipy")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = auction(s.cuda(), backend="cuda")
        assert p.is_cuda and is_perm(p)
        assert rel_gap(s, p.cpu(), exact) <= 1e-4


@pytest.mark.gpu
def test_cuda_auction_adversarial_and_planted():
    _cuda_auction_or_skip()
    g = torch.Generator().manual_seed(5)
    for name, s in adversarial(128, g).items():
        exact = linear_assignment(s, solver="scipy")
        p = auction(s[None].cuda(), backend="cuda")[0]
        assert is_perm(p), name
        assert rel_gap(s, p.cpu(), exact) <= 1e-4, name
    L, n = 4, 2048
    planted = torch.stack([torch.randperm(n, generator=g) for _ in range(L)])
    s = torch.rand(L, n, n, generator=g) * 0.9
    s.scatter_(2, planted[:, :, None], 1.0)
    assert torch.equal(linear_assignment(s.cuda()).cpu(), planted)
