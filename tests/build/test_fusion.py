"""Backbone fusion: SLERP and the spherical mean, linear means, t schedules, and the selective row merge."""
import math

import pytest
import torch

from symphony.build.fusion import (karcher_coefficients, layer_schedule, linear_mean, merge_rows, slerp, source_weights,
                             spherical_mean)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def angle(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_identical_tensors_come_back_exactly(dtype, t):
    a = rand(17, 9, dtype=dtype)
    assert torch.equal(slerp(a, a.clone(), t), a)
    assert torch.equal(spherical_mean([a, a.clone(), a.clone()], [0.2, 0.3, 0.5]), a)
    assert torch.equal(linear_mean([a, a.clone(), a.clone()]), a)


def test_endpoints_are_exact():
    a, b = rand(8, 8, seed=1), rand(8, 8, seed=2)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    assert torch.equal(spherical_mean([a, b, a * 2], [0, 1, 0]), b)


def test_slerp_walks_the_great_circle_with_linear_norm():
    a, b = rand(64, 32, seed=3), rand(64, 32, seed=4) + 0.5 * rand(64, 32, seed=3)
    theta = angle(a, b)
    for t in (0.1, 0.25, 0.5, 0.9):
        m = slerp(a, b, t)
        assert abs(angle(a, m) - t * theta) < 1e-5 and abs(angle(m, b) - (1 - t) * theta) < 1e-5
        want = (1 - t) * a.double().norm() + t * b.double().norm()
        assert abs(m.double().norm() - want) / want < 1e-6
    # float64 in, float64 out, against the closed form on the raw vectors
    a64, b64 = a.double(), b.double()
    ua, ub = a64 / a64.norm(), b64 / b64.norm()
    t = 0.3
    direction = (math.sin((1 - t) * theta) * ua + math.sin(t * theta) * ub) / math.sin(theta)
    want = ((1 - t) * a64.norm() + t * b64.norm()) * direction
    assert torch.allclose(slerp(a64, b64, t), want, rtol=0, atol=1e-12)


def test_output_dtype_is_computed_wide():
    a, b = rand(50, seed=5, dtype=torch.bfloat16), rand(50, seed=6, dtype=torch.bfloat16)
    m32 = spherical_mean([a, b], dtype=torch.float32)
    assert m32.dtype == torch.float32
    assert torch.equal(m32.to(torch.bfloat16), spherical_mean([a, b]))


def test_karcher_mean_of_two_is_slerp_and_is_stationary():
    base = rand(40, seed=7)  # related tensors, as fine-tunes of one base are (angles well below 90 degrees)
    a, b, c = base + 0.8 * rand(40, seed=8), base + 0.8 * rand(40, seed=9), 2 * base + rand(40, seed=10)
    xs = [x / x.norm() for x in (a, b)]
    gram = torch.stack(xs).double() @ torch.stack(xs).double().T
    coef = karcher_coefficients(gram, torch.tensor([0.7, 0.3], dtype=torch.float64))
    q = coef[0] * xs[0].double() + coef[1] * xs[1].double()
    assert torch.allclose(q, slerp(xs[0], xs[1], 0.3).double(), atol=1e-6)
    # N = 3: the weighted sum of the log maps vanishes at the mean, and input order does not matter
    w = [0.5, 0.2, 0.3]
    m = spherical_mean([a, b, c], w).double()
    q = m / m.norm()
    tangent = torch.zeros_like(q)
    for x, wi in zip((a, b, c), w):
        u = x.double() / x.double().norm()
        cos = float(q @ u)
        th = math.acos(cos)
        tangent += wi * th / math.sin(th) * (u - cos * q)
    assert tangent.norm() < 1e-5
    assert torch.allclose(spherical_mean([c, a, b], [0.3, 0.5, 0.2]), m.float(), atol=1e-6)
    assert abs(m.norm() - sum(wi * x.double().norm() for x, wi in zip((a, b, c), w))) < 1e-4


def test_colinear_and_opposite_fall_back_to_linear():
    a = rand(30, seed=10)
    assert torch.allclose(slerp(a, 3 * a, 0.25), 1.5 * a, atol=1e-6)
    assert torch.allclose(slerp(a, -a, 0.25), 0.5 * a, atol=1e-6)
    z = torch.zeros(30)
    assert torch.allclose(slerp(a, z, 0.5), 0.5 * a)


def test_bad_input():
    with pytest.raises(ValueError, match="differ"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="differ"):
        linear_mean([torch.zeros(3), torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="t must lie"):
        slerp(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="weights"):
        spherical_mean([torch.ones(3), torch.ones(3)], [0, 0])
    with pytest.raises(ValueError, match="nothing"):
        linear_mean([])


def test_weights_and_schedules():
    assert source_weights(3, 1, None) == [1 / 3] * 3
    assert source_weights(3, 1, 0.4) == pytest.approx([0.2, 0.6, 0.2])
    assert source_weights(2, 0, 0.25) == [0.75, 0.25]
    assert layer_schedule(0.3, 3) == [0.3, 0.3, 0.3] and layer_schedule(None, 2) == [None, None]
    assert layer_schedule([0.1, 0.2, 0.3], 3) == [0.1, 0.2, 0.3]
    assert layer_schedule([0.0, 1.0], 5) == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert layer_schedule([0.0, 1.0, 0.0], 5) == pytest.approx([0, 0.5, 1, 0.5, 0])
    with pytest.raises(ValueError):
        layer_schedule([0.5], 4)


def _merge(tables, ids, mode="selective", anchor=0, dtype=torch.float32, chunk=3):
    chunks = list(merge_rows(lambda s, lo, hi: tables[s][lo:hi], ids, anchor, mode, dtype, chunk=chunk))
    assert all(c.shape[0] <= chunk for c in chunks)
    return torch.cat(chunks)


def test_selective_merge_over_a_union_vocabulary():
    # union rows 0..5: 0-3 shared by both, 4 only in source 0 (its row 4), 5 only in source 1 (its row 4)
    a, b = rand(5, 6, seed=11), rand(5, 6, seed=12)
    b[1] = a[1]  # a row both share bit for bit comes back unchanged
    ids = [torch.tensor([0, 1, 2, 3, 4, -1]), torch.tensor([0, 1, 2, 3, -1, 4])]
    out = _merge([a, b], ids)
    assert out.shape == (6, 6)
    assert torch.allclose(out[:4], (a[:4] + b[:4]) / 2, atol=1e-7)
    assert torch.equal(out[1], a[1]) and torch.equal(out[4], a[4]) and torch.equal(out[5], b[4])
    anchor = _merge([a, b], ids, mode="anchor", anchor=1)
    assert torch.equal(anchor[:4], b[:4]) and torch.equal(anchor[4], a[4]) and torch.equal(anchor[5], b[4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_identical_sources_merge_exactly(dtype):
    a = rand(10, 4, seed=13, dtype=dtype)
    ids = [torch.arange(10)] * 3
    assert torch.equal(_merge([a, a.clone(), a.clone()], ids, dtype=dtype), a)


def test_scattered_rows_and_uncovered_rows():
    a = rand(100, 3, seed=14)
    ids = [torch.tensor([99, 0, 50])]  # far apart: read row by row
    assert torch.equal(_merge([a], ids, chunk=3), a[[99, 0, 50]])
    with pytest.raises(ValueError, match="no source has"):
        _merge([a], [torch.tensor([0, -1])])
