"""The launch layer (symphony_kernels._launch): variant keys, the short launch path, background compilation with
the grouped-GEMM fallback, and warmup. The GPU-marked tests check that each path gives the kernels' own result."""
import pytest
import torch

import symphony_kernels as sk
from symphony_kernels import _launch
from symphony_kernels._warmup import planned_launches
from symphony_kernels.reference import moe_experts_reference


def test_variant_key_is_what_triton_specialises_on():
    """A per-call integer (do_not_specialize) changes nothing; any other integer keys on being 1 or a multiple of
    16, as Triton's specialisation does; a pointer that is not 16-byte aligned or an integer beyond int32 leaves
    the short path."""
    from symphony_kernels._experts_fwd import _combine_kernel  # y, sy_s (DNS), sy_r, out, so_t, ids, T (DNS), ...

    kernel = _launch.Kernel(_combine_kernel)
    if not kernel.specialised:  # the interpreter's functions carry no parameter list
        kernel.specialised = (True, False, True, True, True, True, False, True, True, False)
    meta = (("BM", 16),)
    y, out, ids = torch.empty(64, dtype=torch.bfloat16), torch.empty(64), torch.empty(8, dtype=torch.int32)
    base = (y, 100, 32, out, 32, ids, 5, 32, 8, 1)
    key = kernel.key(base, meta, 0)
    assert key == kernel.key((y, 7, 32, out, 32, ids, 900, 32, 8, 3), meta, 0)        # per-call integers
    assert key != kernel.key((y, 100, 40, out, 32, ids, 5, 32, 8, 1), meta, 0)        # 40: not a multiple of 16
    assert key != kernel.key((y, 100, 32, out, 32, ids, 5, 32, 1, 1), meta, 0)        # E = 1: a constant
    assert key != kernel.key((y.half(), 100, 32, out, 32, ids, 5, 32, 8, 1), meta, 0)
    assert kernel.key((y[1:], *base[1:]), meta, 0) is None                            # 2 bytes off alignment
    assert kernel.key((y, 100, 2**31, *base[3:]), meta, 0) is None


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("batched", [True, False])
def test_fallback_is_the_same_function(device, batched, monkeypatch):
    """What serves a call while its kernels compile: the batched product (few pairs) or the grouped GEMM."""
    from symphony_kernels import _fallback

    if device == "cpu" and not batched:
        pytest.skip("grouped_mm runs on CUDA")
    if not batched:
        monkeypatch.setattr(_fallback, "BATCHED_MAX_BYTES", 0)
    g = torch.Generator().manual_seed(3)
    T, d, f, E, k = 37, 64, 48, 6, 2
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    x, gate_up, down = (torch.randn(*s, generator=g).to(device, dt) / 4 for s in ((T, d), (E, 2 * f, d), (E, d, f)))
    w = torch.rand(T, k, generator=g).to(device)
    ids = torch.randint(0, E, (T, k), generator=g).to(device)
    ids[0, 1] = E                                     # a dropped pair
    out = _fallback.moe_experts(x, gate_up, down, w, ids, "silu")
    live = (ids >= 0) & (ids < E)
    ref = moe_experts_reference(*(t.double().cpu() for t in (x, gate_up, down)), torch.where(live, w, 0).double().cpu(),
                                torch.where(live, ids, 0).cpu())
    assert _rel(out, ref) < (1e-6 if dt == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T,with_plan", [(2, False), (300, False), (300, True)])
def test_replay_equals_the_first_call(T, with_plan):
    """The second eager call of a signature replays the first one's launches: bitwise the same result, and a
    call with other data in the same shapes gives its own (correct) result."""
    from symphony_kernels import experts

    x, gate_up, down, w, ids = _problem(T, 128, 96, 8, 2, 40 + T)
    sk.set_compile_mode("blocking")
    with torch.no_grad():
        if with_plan:
            plan = sk.route(torch.randn(T, 8, device="cuda"), 2)
            w, ids = plan.topk_weights, plan.topk_ids
        kw = {"plan": plan} if with_plan else {}
        first = sk.moe_experts(x, gate_up, down, w, ids, **kw)
        assert any(key[0] == x.shape for key in experts._REPLAYS)
        again = sk.moe_experts(x, gate_up, down, w, ids, **kw)
        x2 = torch.randn_like(x)
        other = sk.moe_experts(x2, gate_up, down, w, ids, **kw)
    assert torch.equal(first, again)
    ref = moe_experts_reference(*(t.double().cpu() for t in (x2, gate_up, down, w)), ids.cpu())
    assert _rel(other, ref) < 1e-2


def test_launch_hooks_turn_the_short_path_off():
    from triton import knobs

    assert _launch._no_launch_hook()
    knobs.runtime.launch_enter_hook.add(print)
    try:
        assert not _launch._no_launch_hook()
    finally:
        knobs.runtime.launch_enter_hook.remove(print)


def test_bf16_on_the_cpu_takes_the_reference():
    """Triton's CPU interpreter computes bf16 products wrongly; CPU bf16 calls get the reference instead."""
    g = torch.Generator().manual_seed(0)
    x, gate_up, down = (torch.randn(*s, generator=g).bfloat16() for s in ((9, 32), (4, 32, 32), (4, 32, 16)))
    w, ids = torch.rand(9, 2, generator=g), torch.randint(0, 4, (9, 2), generator=g).int()
    out = sk.moe_experts(x, gate_up, down, w, ids)
    ref = moe_experts_reference(*(t.double() for t in (x, gate_up, down, w)), ids)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_route_replay_equals_the_first_call():
    from symphony_kernels import routing

    logits = torch.randn(37, 64, device="cuda")
    with torch.no_grad():
        first = sk.route(logits, 6)
        assert any(key[0] == logits.shape for key in routing._REPLAYS)
        again = sk.route(logits, 6)
        other_logits = torch.randn_like(logits)
        other = sk.route(other_logits, 6)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    w_ref, ids_ref = sk.reference.route_reference(other_logits.double().cpu(), 6)
    assert torch.equal(other.topk_ids.cpu(), ids_ref) and torch.allclose(other.topk_weights.cpu().double(), w_ref,
                                                                           atol=1e-5)
    x = torch.randn(37, 32, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(64, 48, 32, device="cuda", dtype=torch.bfloat16)
    dn = torch.randn(64, 32, 24, device="cuda", dtype=torch.bfloat16)
    sk.moe_experts(x, gu, dn, other.topk_weights, other.topk_ids, plan=other)  # a replayed plan is a valid plan


@pytest.mark.parametrize("kw,match", [(dict(num_experts=0), "positive"), (dict(top_k=9), "top_k"),
                                      (dict(dtype=torch.int8), "dtype"), (dict(tokens=[]), "tokens"),
                                      (dict(activation="relu"), "activation"), (dict(num_experts=2000), "1024")])
def test_warmup_bad_input(kw, match):
    args = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2) | kw
    with pytest.raises((ValueError, TypeError), match=match):
        sk.warmup(args.pop("hidden_size"), args.pop("intermediate_size"), args.pop("num_experts"), args.pop("top_k"),
                  device="cpu", **args)


def test_a_failed_background_compile_is_compiled_in_the_caller():
    """A variant whose background compile raised counts as ready, so the next call compiles it in place and
    the error reaches the user instead of the stand-in serving every call."""
    kernel = _launch.Kernel(lambda: None)
    args, meta = (torch.empty(16), 8), (("BM", 16),)
    key = kernel.key(args, meta, 0)
    assert not kernel.ready(args, meta, 0)
    kernel.failed.add(key)
    assert kernel.ready(args, meta, 0) and kernel.compile_async(args, meta, 0) is None
