"""CorrelationAccumulator against float64 numpy, on every backend this machine has (torch; the C++ extension; the
CUDA kernels on a GPU), plus its bad-input contract."""
import numpy as np
import pytest
import torch

from symphony_kernels import _ext
from symphony_kernels.correlation import CorrelationAccumulator, TorchOps
from symphony_kernels.matching import linear_assignment

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def ext_module():
    """The C++ extension, loaded (or JIT-built into the cache) once per session; skips when it cannot be had."""
    module = _ext.load()
    if module is None:
        pytest.skip(f"C++ extension unavailable: {_ext.info()['reason']}")
    return module


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("ext_module")
    return request.param


def np_corr(xa, xb=None, kind="pearson"):
    """float64 numpy reference: [L, A, B]; zero-variance (zero-norm) columns give 0."""
    a = np.asarray(xa.double().cpu().numpy())
    b = a if xb is None else np.asarray(xb.double().cpu().numpy())
    if kind == "pearson":
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean(axis=1, keepdims=True)
    c = np.einsum("lta,ltb->lab", a, b)
    na, nb = np.sqrt((a * a).sum(1)), np.sqrt((b * b).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = c / (na[:, :, None] * nb[:, None, :])
    r[~np.isfinite(r)] = 0.0
    return np.clip(r, -1, 1)


def stream(acc, xa, xb=None, sizes=(97, 250, 353)):
    """Feed the tokens of xa/xb in uneven batches."""
    t = 0
    T = xa.shape[1]
    k = 0
    while t < T:
        step = sizes[k % len(sizes)]
        acc.update(xa[:, t:t + step], None if xb is None else xb[:, t:t + step])
        t += step
        k += 1
    return acc


def maxerr(corr, ref):
    out = corr.double().cpu().numpy()
    assert np.isfinite(out).all()
    return float(np.abs(out - ref).max())


def make_pair(seed, L=3, T=700, A=19, B=23, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(L, T, A, generator=g) + offset
    mix = torch.randn(L, A, B, generator=g) / A ** 0.5
    xb = torch.einsum("lta,lab->ltb", xa, mix) + 0.3 * torch.randn(L, T, B, generator=g) - 2 * offset
    k = min(5, A, B)  # a few strongly (anti-)correlated pairs
    xb[:, :, :k] = -1.5 * xa[:, :, :k] + 0.05 * torch.randn(L, T, k, generator=g) - 2 * offset
    return xa, xb


@pytest.mark.parametrize("kind", ["pearson", "cosine"])
def test_random_and_correlated_data_match_float64(backend, kind):
    xa, xb = make_pair(0)
    acc = stream(CorrelationAccumulator(3, 19, 23, backend=backend), xa, xb)
    assert acc.backend == backend and acc.count == 700
    ref = np_corr(xa, xb, kind)
    assert maxerr(acc.correlation(kind), ref) < 1e-6
    assert np.abs(ref).max() > 0.99  # strongly correlated pairs are there: the test can fail


def test_offsets_and_shift_rule(backend):
    """Columns far from zero mean (shifted) mixed with zero-mean ones (not shifted)."""
    xa, xb = make_pair(1, offset=0.0)
    xa[:, :, :7] += 300.0
    xb[:, :, 5:] -= 40.0
    acc = stream(CorrelationAccumulator(3, 19, 23, backend=backend), xa, xb)
    assert maxerr(acc.correlation(), np_corr(xa, xb)) < 1e-6
    assert maxerr(acc.correlation("cosine"), np_corr(xa, xb, "cosine")) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_float64_of_their_values(backend, dtype):
    xa, xb = make_pair(2, offset=3.0)
    xa, xb = xa.to(dtype), xb.to(dtype)
    acc = stream(CorrelationAccumulator(3, 19, 23, backend=backend), xa, xb)
    assert maxerr(acc.correlation(), np_corr(xa, xb)) < 1e-6


def test_self_correlation(backend):
    xa, _ = make_pair(3)
    xa[1, :, 4] = xa[1, :, 2] * -2.0 + 1.0  # perfectly anti-correlated pair
    acc = stream(CorrelationAccumulator(3, 19, backend=backend), xa)
    c = acc.correlation()
    assert maxerr(c, np_corr(xa)) < 1e-6
    assert torch.allclose(c, c.transpose(1, 2), atol=1e-7)
    assert torch.allclose(torch.diagonal(c, dim1=1, dim2=2), torch.ones(3, 19), atol=1e-6)
    assert abs(float(c[1, 2, 4]) + 1.0) < 1e-6


def test_permuted_copy_is_recovered_with_correlation_one(backend):
    g = torch.Generator().manual_seed(4)
    L, T, f = 2, 600, 48
    xa = torch.randn(L, T, f, generator=g) * torch.rand(1, 1, f, generator=g) + torch.randn(1, 1, f, generator=g)
    planted = torch.stack([torch.randperm(f, generator=g) for _ in range(L)])  # xb[:, :, j] = xa[:, :, planted[j]]
    xb = torch.stack([xa[l][:, planted[l]] for l in range(L)])
    acc = stream(CorrelationAccumulator(L, f, f, backend=backend), xa, xb)
    corr = acc.correlation()
    perm = linear_assignment(corr)  # perm[i] = the column of xb matched to neuron i of xa
    expected = torch.argsort(planted, dim=1)
    assert torch.equal(perm, expected)
    matched = corr.gather(2, perm[:, :, None]).squeeze(2)
    assert float((matched - 1).abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_constant_neurons_give_zero_never_nan(backend, dtype):
    xa, xb = make_pair(5)
    xa[:, :, 3] = 5.0
    xa[:, :, 4] = 0.0
    xb[:, :, 2] = -1.5
    xa, xb = xa.to(dtype), xb.to(dtype)
    acc = stream(CorrelationAccumulator(3, 19, 23, backend=backend), xa, xb)
    for kind in ("pearson", "cosine"):
        c = acc.correlation(kind)
        assert bool(torch.isfinite(c).all())
        assert maxerr(c, np_corr(xa, xb, kind)) < 1e-6
    c = acc.correlation()
    assert bool((c[:, 3] == 0).all()) and bool((c[:, 4] == 0).all()) and bool((c[:, :, 2] == 0).all())
    assert bool((acc.correlation("cosine")[:, 4] == 0).all())
    assert float(acc.correlation("cosine")[0, 3].abs().max()) > 0  # a constant non-zero column has a direction
    st = acc.statistics()
    assert bool((st["var_a"][:, 3] == 0).all()) and bool((st["var_b"][:, 2] == 0).all())


def test_many_tokens_with_large_offset_do_not_drift(backend):
    """2^21 tokens, offset 1e4 standard deviations: float64 totals of per-batch centred moments stay exact, where
    a plain fp32 streaming sum loses everything."""
    g = torch.Generator().manual_seed(6)
    T, step = 1 << 21, 1 << 18
    base = torch.randn(1, T, 3, generator=g)
    xa = base + 1.0e4
    xb = torch.stack([base[..., 0] * 0.6 + 0.8 * torch.randn(1, T, generator=g), base[..., 1] * -0.3 +
                      torch.randn(1, T, generator=g)], dim=-1) + 5.0e3
    acc = CorrelationAccumulator(1, 3, 2, backend=backend)
    for t in range(0, T, step):
        acc.update(xa[:, t:t + step], xb[:, t:t + step])
    ref = np_corr(xa, xb)
    assert acc.count == T
    assert maxerr(acc.correlation(), ref) < 1e-7
    # The naive fp32 formula (sum xy - sum x sum y / n) on the same stream is useless here:
    sx = xa[0].sum(0)
    sy = xb[0].sum(0)
    sxy = xa[0].T @ xb[0]
    sxx, syy = (xa[0] ** 2).sum(0), (xb[0] ** 2).sum(0)
    cov = sxy - torch.outer(sx, sy) / T
    naive = cov / torch.sqrt(torch.outer(sxx - sx * sx / T, syy - sy * sy / T))
    naive_err = float(np.nan_to_num(np.abs(naive.double().numpy() - ref[0]), nan=1.0).max())
    assert naive_err > 0.05


def test_blocks_groups_and_noncontiguous_inputs_agree(backend):
    xa, xb = make_pair(7, T=400)
    xa[:, :, 1] += 50
    whole = CorrelationAccumulator(3, 19, 23, backend=backend).update(xa, xb).correlation()
    tiny = CorrelationAccumulator(3, 19, 23, backend=backend, block_tokens=37, scratch_bytes=1)
    xa_nc = xa.transpose(1, 2).contiguous().transpose(1, 2)  # same values, token stride 1
    xb_nc = xb.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xa_nc.is_contiguous()
    out = tiny.update(xa_nc, xb_nc).correlation()
    assert float((whole - out).abs().max()) < 1e-6


def test_cpp_backend_matches_torch_backend(ext_module):
    xa, xb = make_pair(8, L=2, T=900, A=40, B=33, offset=2.0)
    xa[:, :, 5] = 1.25
    for dtype in (torch.float32, torch.bfloat16):
        accs = [stream(CorrelationAccumulator(2, 40, 33, backend=b), xa.to(dtype), xb.to(dtype), sizes=(300,))
                for b in ("cpp", "torch")]
        sa, sb = accs[0].state_dict(), accs[1].state_dict()
        for key in ("mean_a", "m2_a", "mean_b", "m2_b", "comoment"):
            scale = float(sb[key].abs().max()) + 1e-30
            assert float((sa[key] - sb[key]).abs().max()) <= 1e-12 * scale, key
        assert float((accs[0].correlation() - accs[1].correlation()).abs().max()) < 1e-6


def test_cpp_ops_match_torch_ops(ext_module):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 70, 45, generator=g) * 3 + 10).to(torch.bfloat16)[:, 5:60]  # a token slice: layer stride
    shift = torch.randn(2, 45, generator=g) * 10
    for a, b in zip(ext_module.column_moments(x), TorchOps.column_moments(x)):
        assert torch.allclose(a, b, rtol=1e-14, atol=0)
    for out_dtype in (torch.bfloat16, torch.float32, torch.float64):
        ya, sa, qa = ext_module.center(x, shift, out_dtype)
        yb, sb, qb = TorchOps.center(x, shift, out_dtype)
        assert ya.dtype == out_dtype and torch.equal(ya, yb)
        assert torch.allclose(sa, sb, rtol=1e-14, atol=1e-12) and torch.allclose(qa, qb, rtol=1e-14, atol=0)
    c = torch.randn(2, 5, 7, dtype=torch.float64, generator=g)
    c2 = c.clone()
    p = torch.randn(2, 5, 7, generator=g)
    u = torch.randn(2, 5, 2, dtype=torch.float64, generator=g)
    v = torch.randn(2, 7, 2, dtype=torch.float64, generator=g)
    ext_module.merge_comoment_(c, p, u, v)
    TorchOps.merge_comoment_(c2, p, u, v)
    assert torch.allclose(c, c2, rtol=1e-14, atol=1e-14)
    ma, mb = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    ia, ib = torch.rand(2, 5, dtype=torch.float64), torch.rand(2, 7, dtype=torch.float64)
    assert torch.allclose(ext_module.finalize(c, ma, mb, 3.0, ia, ib), TorchOps.finalize(c, ma, mb, 3.0, ia, ib),
                          rtol=1e-6, atol=1e-7)


def test_state_dict_and_merge(backend):
    xa, xb = make_pair(10, T=600, offset=1.0)
    whole = CorrelationAccumulator(3, 19, 23, backend=backend).update(xa, xb)
    first = CorrelationAccumulator(3, 19, 23, backend=backend).update(xa[:, :250], xb[:, :250])
    second = CorrelationAccumulator(3, 19, 23, backend=backend).update(xa[:, 250:], xb[:, 250:])
    restored = CorrelationAccumulator(3, 19, 23, backend="torch").load_state_dict(first.state_dict())
    restored.merge(second)
    assert restored.count == 600
    assert float((restored.correlation() - whole.correlation()).abs().max()) < 1e-6
    # keep streaming after a restore
    again = CorrelationAccumulator(3, 19, 23, backend=backend).load_state_dict(first.state_dict())
    again.update(xa[:, 250:], xb[:, 250:])
    assert float((again.correlation() - whole.correlation()).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="shape"):
        CorrelationAccumulator(3, 19, 22).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="cannot merge"):
        restored.merge(CorrelationAccumulator(2, 19, 23))


def test_bad_input_is_refused_before_any_change(backend):
    xa, xb = make_pair(11, T=50)
    acc = CorrelationAccumulator(3, 19, 23, backend=backend).update(xa, xb)
    before = acc.state_dict()

    def unchanged():
        after = acc.state_dict()
        assert after["count"] == before["count"]
        for key in ("mean_a", "m2_a", "mean_b", "m2_b", "comoment"):
            assert torch.equal(after[key], before[key]), key

    bad = xa.clone()
    bad[2, 17, 4] = float("nan")
    with pytest.raises(ValueError, match="xa holds non-finite.*layer 2"):
        acc.update(bad, xb)
    unchanged()
    bad = xb.clone()
    bad[1, 3, 0] = float("inf")
    with pytest.raises(ValueError, match="xb holds non-finite.*layer 1"):
        acc.update(xa, bad)
    unchanged()
    cases = [
        ((xa[:2], xb[:2]), ValueError, "xa must have shape"),
        ((xa, xb[:, :, :5]), ValueError, "xb must have shape"),
        ((xa, xb[:, :40]), ValueError, "same tokens"),
        ((xa[:, :0], xb[:, :0]), ValueError, "zero tokens"),
        ((xa, xb.bfloat16()), TypeError, "share one dtype"),
        ((xa.double(), xb.double()), TypeError, "bfloat16, float16 or float32"),
        ((xa.int(), xb), TypeError, "bfloat16, float16 or float32"),
        ((xa.numpy(), xb), TypeError, "torch.Tensor"),
        ((xa, None), ValueError, "xb is missing"),
        ((xa.to("meta"), xb), ValueError, "accumulator lives on cpu"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            acc.update(*args)
        unchanged()
    with pytest.raises(ValueError, match="call update\\(xa\\)"):
        CorrelationAccumulator(3, 19, backend=backend).update(xa, xa)
    # After refused updates, the accumulator goes on as if they never happened.
    acc.update(xa, xb)
    ref = np_corr(torch.cat([xa, xa], 1), torch.cat([xb, xb], 1))
    assert maxerr(acc.correlation(), ref) < 1e-6


def test_inference_mode_inside_and_outside(backend):
    xa, xb = make_pair(15, T=300)
    with torch.inference_mode():
        acc = CorrelationAccumulator(3, 19, 23, backend=backend).update(xa[:, :100], xb[:, :100])
    acc.update(xa[:, 100:200], xb[:, 100:200])  # made in inference mode, updated outside
    with torch.inference_mode():
        acc.update(xa[:, 200:], xb[:, 200:])
        c = acc.correlation()
    restored = CorrelationAccumulator(3, 19, 23, backend=backend)
    with torch.inference_mode():
        restored.load_state_dict(acc.state_dict())
    restored.update(xa[:, :1], xb[:, :1])
    assert maxerr(c, np_corr(xa, xb)) < 1e-6


def test_constructor_and_correlation_arguments():
    with pytest.raises(ValueError, match="no tokens"):
        CorrelationAccumulator(2, 3, 4).correlation()
    with pytest.raises(ValueError, match="kind"):
        CorrelationAccumulator(2, 3, 4).update(torch.randn(2, 5, 3), torch.randn(2, 5, 4)).correlation("spearman")
    for bad in (dict(layers=0, f_a=3), dict(layers=2, f_a=-1), dict(layers=2, f_a=3, f_b=2.5)):
        with pytest.raises(ValueError, match="positive int"):
            CorrelationAccumulator(**bad)
    with pytest.raises(ValueError, match="backend"):
        CorrelationAccumulator(2, 3, backend="fortran")
    with pytest.raises(ValueError, match="CUDA"):
        CorrelationAccumulator(2, 3, backend="cuda")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            CorrelationAccumulator(2, 3, device="cuda")
    acc = CorrelationAccumulator(2, 3)
    assert acc.backend == _ext.backend_for("cpu") and "count=0" in repr(acc)


# ---- GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widths", [(256, 192), (37, 45)])  # 16-byte loads, and the scalar path
def test_cuda_backends_match_float64(dtype, widths):
    A, B = widths
    xa, xb = make_pair(12, L=4, T=5000, A=A, B=B)
    xa[:, :, :9] += 20.0
    xa[:, :, 10] = 3.0
    xa, xb = xa.to(dtype), xb.to(dtype)
    ref = np_corr(xa, xb)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for b in ("torch", "cuda"):
        if b == "cuda" and not (_ext.load() is not None and _ext.load().has_cuda()):
            pytest.skip(f"CUDA extension unavailable: {_ext.info()['reason']}")
        acc = stream(CorrelationAccumulator(4, A, B, device="cuda", backend=b), xa.cuda(), xb.cuda(),
                     sizes=(1000, 1500, 2500))
        c = acc.correlation()
        assert c.is_cuda and acc.backend == b
        assert maxerr(c, ref) < tol, b
        assert bool((c[:, 10] == 0).all())


@pytest.mark.gpu
def test_cuda_ops_match_torch_ops():
    module = _ext.load()
    if module is None or not module.has_cuda():
        pytest.skip(f"CUDA extension unavailable: {_ext.info()['reason']}")
    g = torch.Generator().manual_seed(13)
    for dtype, F in ((torch.bfloat16, 4096), (torch.float16, 100), (torch.float32, 260)):
        x = (torch.randn(3, 3000, F, generator=g) * 2 + 5).to(dtype).cuda()[:, 100:2900]
        shift = (torch.randn(3, F, generator=g) * 5).cuda()
        for a, b in zip(module.column_moments(x), TorchOps.column_moments(x)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-9)
        for out_dtype in (dtype, torch.float64):
            ya, sa, qa = module.center(x, shift, out_dtype)
            yb, sb, qb = TorchOps.center(x, shift, out_dtype)
            assert torch.equal(ya, yb)
            assert torch.allclose(sa, sb, rtol=1e-12, atol=1e-9) and torch.allclose(qa, qb, rtol=1e-12, atol=1e-9)
    c = torch.randn(3, 70, 129, dtype=torch.float64, device="cuda")
    c2 = c.clone()
    p = torch.randn(3, 70, 129, device="cuda")
    u = torch.randn(3, 70, 2, dtype=torch.float64, device="cuda")
    v = torch.randn(3, 129, 2, dtype=torch.float64, device="cuda")
    module.merge_comoment_(c, p, u, v)
    TorchOps.merge_comoment_(c2, p, u, v)
    assert torch.allclose(c, c2, rtol=1e-13, atol=1e-13)
    ma, mb = torch.randn(3, 70, dtype=torch.float64, device="cuda"), torch.randn(3, 129, dtype=torch.float64,
                                                                                  device="cuda")
    ia, ib = torch.rand_like(ma), torch.rand_like(mb)
    assert torch.allclose(module.finalize(c, ma, mb, 2.0, ia, ib), TorchOps.finalize(c, ma, mb, 2.0, ia, ib),
                          rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_cuda_many_tokens_bf16_offset():
    """bf16 on tensor cores, 2^21 tokens with a large offset: the shift keeps it accurate."""
    g = torch.Generator(device="cuda").manual_seed(14)
    T, step, f = 1 << 21, 1 << 17, 64
    acc = CorrelationAccumulator(2, f, f, device="cuda")
    xs, ys = [], []
    for _ in range(0, T, step):
        x = torch.randn(2, step, f, device="cuda", generator=g)
        y = 0.7 * x + 0.7 * torch.randn(2, step, f, device="cuda", generator=g)
        x, y = (x + 300.0).bfloat16(), (y - 80.0).bfloat16()
        acc.update(x, y)
        xs.append(x)
        ys.append(y)
    xa, xb = torch.cat(xs, 1).double(), torch.cat(ys, 1).double()
    xa, xb = xa - xa.mean(1, keepdim=True), xb - xb.mean(1, keepdim=True)
    ref = (xa.transpose(1, 2) @ xb) / torch.sqrt((xa * xa).sum(1)[:, :, None] * (xb * xb).sum(1)[:, None, :])
    assert float((acc.correlation().double() - ref).abs().max()) < 2e-3
