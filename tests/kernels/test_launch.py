"""The launch layer (symphony_kernels._launch): variant keys, the short launch path, background compilation with
the grouped-GEMM fallback, and warmup. The GPU-marked tests check that each path gives the kernels' own result."""
import pytest
import torch

import symphony_kernels as sk
from symphony_kernels import _launch
from symphony_kernels._warmup import planned_launches
from symphony_kernels.reference import moe_experts_reference


def test_variant_key_ignores_what_triton_does_not_specialise_on():
    """Token counts change from call to call but not the variant (they are do_not_specialize); a pointer that
    is not 16-byte aligned or an integer beyond int32 leaves the short path."""
    meta = (("BM", 16),)
    a = torch.empty(64, dtype=torch.bfloat16)
    key = _launch.Kernel.key((a, 5, 7), meta, 0)
    assert key == _launch.Kernel.key((torch.empty(8, dtype=torch.bfloat16), 500, 9), meta, 0)
    assert key != _launch.Kernel.key((torch.empty(8, dtype=torch.float16), 5, 7), meta, 0)
    assert _launch.Kernel.key((a[1:], 5, 7), meta, 0) is None          # 2 bytes off 16-byte alignment
    assert _launch.Kernel.key((a, 2**31, 7), meta, 0) is None


def test_warmup_plans_a_few_variants_for_many_token_counts():
    launches = planned_launches(2048, 768, 128, 8, tokens=(1, 2, 3, 8, 64, 512, 513, 4096))
    keys = {(id(k), k.key(args, meta, 0)) for k, _, args, meta in launches}
    assert len(launches) > len(keys) >= 6    # decode BM 16 and 64, small and large classes, dispatch kernels
    names = {getattr(k.fn, "__name__", None) or k.fn.fn.__name__ for k, *_ in launches}
    assert {"_up_kernel", "_down_kernel", "_combine_kernel", "_count_kernel", "_sort_kernel"} <= names


def test_compile_mode_switch():
    previous = sk.set_compile_mode("blocking")
    try:
        assert _launch.compile_mode() == "blocking"
        with pytest.raises(ValueError, match="compile mode"):
            sk.set_compile_mode("lazy")
    finally:
        sk.set_compile_mode(previous)


def _problem(T, d, f, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).cuda().bfloat16()
    gate_up = (torch.randn(E, 2 * f, d, generator=g) / d ** 0.5).cuda().bfloat16()
    down = (torch.randn(E, d, f, generator=g) / f ** 0.5).cuda().bfloat16()
    w = torch.rand(T, k, generator=g).cuda()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int().cuda()
    return x, gate_up, down, w, ids


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [3, 300])
def test_short_path_equals_triton_launch(T, monkeypatch):
    x, gate_up, down, w, ids = _problem(T, 136, 200, 8, 2, T)   # d, f multiples of 8, not of 16 (AL = 8)
    sk.set_compile_mode("blocking")
    with torch.no_grad():
        short = sk.moe_experts(x, gate_up, down, w, ids)
        monkeypatch.setattr(_launch, "_no_launch_hook", lambda: False)
        triton_launch = sk.moe_experts(x, gate_up, down, w, ids)
    assert torch.equal(short, triton_launch)
    ref = moe_experts_reference(*(t.double().cpu() for t in (x, gate_up, down, w)), ids.cpu())
    assert _rel(short, ref) < 1e-2


@pytest.mark.gpu
def test_background_compile_serves_the_fallback_then_the_kernels():
    """A shape class seen for the first time in eager inference: the call returns torch's grouped-GEMM result
    at once; once the background compile is done the kernels answer, bitwise what blocking mode gives."""
    x, gate_up, down, w, ids = _problem(40, 264, 328, 8, 2, 7)  # shapes no other test compiles
    previous = sk.set_compile_mode("background")
    try:
        with torch.no_grad():
            first = sk.moe_experts(x, gate_up, down, w, ids)
            pending = [f for k in _launch_kernels() for f in list(k.pending.values())]
            for future in pending:
                future.result()
            later = sk.moe_experts(x, gate_up, down, w, ids)
        sk.set_compile_mode("blocking")
        with torch.no_grad():
            blocking = sk.moe_experts(x, gate_up, down, w, ids)
    finally:
        sk.set_compile_mode(previous)
    ref = moe_experts_reference(*(t.double().cpu() for t in (x, gate_up, down, w)), ids.cpu())
    assert _rel(first, ref) < 1e-2 and _rel(later, ref) < 1e-2
    assert torch.equal(later, blocking)


def _launch_kernels():
    from symphony_kernels import _experts_launch, _routing_launch

    return list(_experts_launch._KERNELS.values()) + list(_routing_launch._KERNELS.values())


@pytest.mark.gpu
def test_warmup_compiles_ahead():
    assert sk.warmup(392, 136, 6, 2, tokens=(1, 700), blocking=True) > 0
    assert sk.warmup(392, 136, 6, 2, tokens=(1, 700)) == 0       # nothing left to compile
