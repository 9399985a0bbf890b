"""The buffers of the routing launchers (one workspace per call) and the replay of eager calls, on the CPU.

A replay hands the workspace pieces to the compiled kernels as raw addresses. Here the compiled variants are
stand-ins that run the kernels through Triton's interpreter, turning those addresses back into tensors of the
workspace, so the replay path is checked end to end without a GPU (tests/kernels/test_launch.py replays on
one).
"""
import pytest
import torch

from symphony_kernels import _experts_launch, _launch, _routing_launch, routing
from symphony_kernels._runtime import INTERPRET
from symphony_kernels.reference import dispatch_reference, moe_experts_reference, route_reference

interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernels through Triton's CPU interpreter")


def _storage(t):
    return t.untyped_storage().data_ptr()


def _spans(buffers):
    return sorted((t.data_ptr(), t.data_ptr() + 4 * t.numel(), name) for name, t in buffers.items() if t.numel())


@pytest.mark.parametrize("T,E,k,programs,gather", [(1, 64, 8, 64, True), (37, 6, 3, 64, True), (0, 8, 2, 64, True),
                                                   (800, 64, 6, 3, True), (800, 64, 6, 3, False)])
def test_route_buffers_share_one_allocation_without_overlap(monkeypatch, T, E, k, programs, gather):
    monkeypatch.setattr(_routing_launch, "_SORT_PROGRAMS", programs)
    monkeypatch.setattr(_routing_launch, "_GATHER", gather)
    logits = torch.randn(T, E)
    call, plan = _routing_launch.route_call(logits, k, "softmax", True)
    ints = {name: t for name, t in call.buffers.items() if name != "weights"}
    assert {"ids", "counts", "offsets", "sorted_pairs"} <= set(ints)
    assert ("gcount" in ints) == (programs == 3) and ("scratch" in ints) == (not gather)
    ws = call.workspace[1]
    assert all(_storage(t) == _storage(ws) and t.data_ptr() % 16 == 0 for t in ints.values())
    spans = _spans(ints)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # no two pieces overlap
    assert spans[-1][1] <= ws.data_ptr() + 4 * ws.numel()
    assert _storage(plan[0]) != _storage(ws)  # the weights: their own allocation
    assert plan[1].shape == (T, k) and plan[2].shape == (E,) and plan[3].shape == (E + 1,)
    if programs == 3:
        assert not ints["gcount"].any()
    if T == 0:
        assert not plan[2].any() and not plan[3].any()
    again = _routing_launch.route_call(logits, k, "softmax", True)[0].workspace[1]
    assert _storage(again) != _storage(ws)  # a second call while the first one's plan is alive: its own buffers
    separate = _routing_launch.route_call(logits, k, "softmax", True, separate=True)[1]
    real = [t for t in separate if t.numel()]
    assert len({_storage(t) for t in real}) == len(real)  # what the custom op returns aliases nothing


@interpreter
def test_writing_into_a_plan_tensor_invalidates_the_plan():
    """The plan's integer tensors share one allocation and so one version counter (see RoutingPlan)."""
    import symphony_kernels as sk

    logits = torch.randn(20, 8)
    x, gate_up, down = torch.randn(20, 16), torch.randn(8, 24, 16), torch.randn(8, 16, 12)
    plan = sk.route(logits, 2)
    sk.moe_experts(x, gate_up, down, plan.topk_weights, plan.topk_ids, plan=plan)
    plan.expert_counts.add_(0)
    with pytest.raises(ValueError, match="changed since"):
        sk.moe_experts(x, gate_up, down, plan.topk_weights, plan.topk_ids, plan=plan)
    plan = sk.route(logits, 2)
    plan.topk_weights.mul_(2)  # the weights are an allocation of their own
    sk.moe_experts(x, gate_up, down, plan.topk_weights, plan.topk_ids, plan=plan)


class _Interpreted:
    """Stands in for a compiled variant: runs the kernel through the interpreter, turning every raw address
    (a workspace piece) back into a tensor over the workspace of the tensors the replay is filling in."""
    function = packed_metadata = None

    def __init__(self, kernel, meta, live):
        self.kernel, self.meta, self.live = kernel, dict(meta), live

    def run(self, gx, gy, gz, stream, function, packed, *rest):
        args = list(rest[3:])  # (the variants here have no constexpr tail)
        spaces = [t.untyped_storage() for t in self.live.values() if isinstance(t, torch.Tensor)]
        for i, a in enumerate(args):
            if type(a) is int and a > 2**32:  # an address (the sizes and strides here are small)
                s = next(s for s in spaces if s.data_ptr() <= a < s.data_ptr() + s.nbytes())
                args[i] = torch.empty(0, dtype=torch.int32).set_(s)[(a - s.data_ptr()) // 4:]
        self.kernel.fn[(gx, gy, gz)](*args, **self.meta)


def _replay_on_cpu(monkeypatch, calls, inputs, keep):
    """A Replay of `calls` (CPU tensors) as if on CUDA device 0, its variants run by `_Interpreted`, and the
    dict that `replay.run` must be given (the stand-ins read the buffers from it)."""
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    live, seen = {}, set()
    for call in calls:
        call.device = 0
        for kernel, _, args, meta in call.launches:
            if id(kernel) not in seen:
                seen.add(id(kernel))
                monkeypatch.setattr(kernel, "variants", {})
            kernel.variants[kernel.key(args, meta, 0)] = (_Interpreted(kernel, meta, live), ())
    replay = _launch.Replay.record(calls, inputs, keep)
    assert replay is not None
    return replay, live


@interpreter
@pytest.mark.parametrize("T,E,k,programs,gather", [(37, 6, 3, 64, True), (800, 64, 6, 3, True),
                                                   (800, 64, 6, 3, False)])
def test_route_replay_runs_on_raw_addresses(monkeypatch, T, E, k, programs, gather):
    monkeypatch.setattr(_routing_launch, "_SORT_PROGRAMS", programs)
    monkeypatch.setattr(_routing_launch, "_GATHER", gather)
    g = torch.Generator().manual_seed(T + E)
    recorded = torch.randn(T, E, generator=g)
    call, _ = _routing_launch.route_call(recorded, k, "softmax", True)
    replay, live = _replay_on_cpu(monkeypatch, [call], {"logits": recorded}, routing._PLAN_NAMES)
    slots = [(tensor, v) for step in replay.steps for _, tensor, v in step[3]]
    assert {v for tensor, v in slots if tensor} == {"logits", "weights"}  # the rest: raw addresses
    assert any(not tensor for tensor, _ in slots)
    logits = torch.randn(T, E, generator=g)
    plans = []
    for _ in range(2):
        live.clear()
        live["logits"] = logits
        plans.append(routing._PLAN(replay.run(live)))
    first, second = plans
    w_ref, ids_ref = route_reference(logits.double(), k)
    assert torch.equal(first[1], ids_ref) and torch.allclose(first[0].double(), w_ref, atol=1e-6)
    for a, b in zip(first[2:], dispatch_reference(ids_ref, E)):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert _storage(first[1]) != _storage(second[1]) and _storage(first[0]) != _storage(second[0])


@interpreter
def test_experts_replay_with_its_dispatch_on_raw_addresses(monkeypatch):
    """moe_experts' replay of a call that dispatches (its dispatch buffers: one workspace, raw addresses)."""
    T, d, f, E, k = 70, 32, 24, 8, 2
    g = torch.Generator().manual_seed(5)
    x, gate_up, down = torch.randn(T, d, generator=g), torch.randn(E, 2 * f, d, generator=g) / 6, \
        torch.randn(E, d, f, generator=g) / 5
    w, ids = torch.rand(T, k, generator=g), torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    dispatch, (_, offsets, sorted_pairs) = _routing_launch.dispatch_call(ids, E)
    call, *_ = _experts_launch.forward_call(x, gate_up, down, w, ids, offsets, sorted_pairs, "silu", False)
    inputs = {"hidden": x, "gate_up": gate_up, "down": down, "weights": w, "ids": ids}
    replay, live = _replay_on_cpu(monkeypatch, [dispatch, call], inputs, ("sorted_pairs",))
    x2 = torch.randn(T, d, generator=g)
    live.update(inputs, hidden=x2)
    out = replay.run(live)["out"]
    ref = moe_experts_reference(*(t.double() for t in (x2, gate_up, down, w)), ids)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
