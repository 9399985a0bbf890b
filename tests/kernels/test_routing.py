"""symphony_kernels.route / dispatch against the plain-PyTorch reference (float64), edge cases, bad input.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); GPU-marked tests add bf16,
larger shapes, torch.compile and CUDA-graph capture.
"""
import pytest
import torch

import symphony_kernels as sk
from symphony_kernels.reference import dispatch_reference, route_reference
from symphony_kernels.routing import dispatch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _check_plan(plan, logits, k, scoring="softmax", renormalize=True, tol=1e-5):
    w_ref, ids_ref = route_reference(logits.double(), k, scoring, renormalize)
    counts, offsets, sorted_pairs = dispatch_reference(ids_ref, logits.shape[1])
    assert plan.topk_ids.dtype == torch.int32 and plan.topk_weights.dtype in (torch.float32, torch.float64)
    assert torch.equal(plan.topk_ids.cpu(), ids_ref.cpu())
    err = (plan.topk_weights.double().cpu() - w_ref.cpu()).abs().max().item() if w_ref.numel() else 0.0
    assert err < tol, err
    assert torch.equal(plan.expert_counts.cpu(), counts.cpu())
    assert torch.equal(plan.expert_offsets.cpu(), offsets.cpu())
    assert torch.equal(plan.sorted_pairs.cpu(), sorted_pairs.cpu())


@pytest.mark.parametrize("T,E,k,scoring,renormalize", [
    (37, 8, 2, "softmax", True), (64, 128, 8, "softmax", False), (20, 256, 16, "sigmoid", True),
    (9, 4, 4, "softmax", True), (5, 1, 1, "softmax", True), (33, 6, 1, "sigmoid", False),
    (21, 512, 10, "softmax", True), (18, 1024, 32, "sigmoid", False), (600, 64, 4, "softmax", True)])
def test_route_matches_reference(T, E, k, scoring, renormalize):
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = torch.randn(T, E, generator=g).to(DEV)
    _check_plan(sk.route(logits, k, scoring=scoring, renormalize=renormalize), logits, k, scoring, renormalize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_route_other_logit_dtypes(dtype):
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    plan = sk.route(logits, 4)
    assert plan.topk_weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check_plan(plan, logits, 4)


def test_route_ties_and_non_finite():
    logits = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    logits[0] = 1.0                                   # all tied -> 0, 1, 2
    logits[1, [5, 2, 7]] = 9.0                        # tie among three -> 2, 5, 7
    logits[2] = float("nan")                          # nothing finite -> 0, 1, 2 with weight 0
    logits[3] = -float("inf")
    logits[4, 6] = float("inf")                       # a single +inf takes all the weight
    logits[5, [1, 3]] = float("inf")                  # two +inf share it
    logits[6, ::2] = float("nan")                     # NaN counts as -inf
    logits[7, 3] = -float("inf")
    logits = logits.to(DEV)
    for scoring in ("softmax", "sigmoid"):
        for renormalize in (True, False):
            plan = sk.route(logits, 3, scoring=scoring, renormalize=renormalize)
            _check_plan(plan, logits, 3, scoring, renormalize)
            ids = plan.topk_ids.cpu()
            assert ((ids >= 0) & (ids < 8)).all()
            assert torch.isfinite(plan.topk_weights).all()
    plan = sk.route(logits, 3)
    assert plan.topk_ids[0].tolist() == [0, 1, 2] and plan.topk_ids[1].tolist() == [2, 5, 7]
    assert plan.topk_ids[2].tolist() == [0, 1, 2] and plan.topk_weights[2].abs().sum() == 0
    assert plan.topk_weights[4, 0] == 1.0 and plan.topk_weights[5, :2].tolist() == [0.5, 0.5]


def test_route_non_contiguous_and_empty():
    base = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)).to(DEV)
    logits = base.t()                                 # [40, 8] with strides (1, 40)
    assert not logits.is_contiguous()
    _check_plan(sk.route(logits, 2), logits, 2)
    plan = sk.route(torch.zeros(0, 8, device=DEV), 2)
    assert plan.topk_weights.shape == (0, 2) and plan.sorted_pairs.numel() == 0
    assert plan.expert_counts.tolist() == [0] * 8 and plan.expert_offsets.tolist() == [0] * 9


def test_route_every_token_on_one_expert():
    logits = torch.full((70, 16), -5.0, device=DEV)
    logits[:, 11] = 5.0
    plan = sk.route(logits, 1)
    assert plan.expert_counts.tolist() == [0] * 11 + [70] + [0] * 4
    assert plan.sorted_pairs.tolist() == list(range(70))


@pytest.mark.parametrize("scoring,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                                 ("sigmoid", False)])
def test_route_gradient(scoring, renormalize):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(30, 8, generator=g)
    logits[3, 2] = float("inf")
    logits[4] = -float("inf")
    logits[5, 1] = float("nan")
    upstream = torch.randn(30, 3, generator=g)
    x = logits.clone().to(DEV).requires_grad_()
    (sk.route(x, 3, scoring=scoring, renormalize=renormalize).topk_weights * upstream.to(DEV)).sum().backward()
    xr = logits.clone().double().requires_grad_()
    (route_reference(xr, 3, scoring, renormalize)[0] * upstream.double()).sum().backward()
    ours = x.grad.double().cpu()
    assert torch.isfinite(ours).all()
    # Autograd of the reference gives NaN at a +inf logit (0 * inf inside torch.where); the weights do not
    # depend on it, and ours gives 0 there. Everywhere else the two agree.
    nan = torch.isnan(xr.grad)
    assert torch.equal(nan, torch.isposinf(logits) & (scoring == "softmax"))
    assert (ours[nan] == 0).all()
    ref = torch.where(nan, torch.zeros_like(xr.grad), xr.grad)
    err = (ours - ref).norm() / ref.norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("T,E,k", [(45, 8, 2), (300, 5, 3), (17, 256, 4)])
def test_dispatch_matches_reference(T, E, k):
    g = torch.Generator().manual_seed(T + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEV)
    counts, offsets, sorted_pairs = dispatch(ids, E)
    ref = dispatch_reference(ids, E)
    for a, b in zip((counts, offsets, sorted_pairs), ref):
        assert a.dtype == torch.int32 and torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("T", [40, 700])  # one count block (no sort launch), three blocks
def test_dispatch_repeated_and_dropped_ids(T):
    g = torch.Generator().manual_seed(6)
    E = 6
    ids = torch.randint(-2, E + 2, (T, 4), generator=g)   # repeats within a row, ids outside [0, E)
    counts, offsets, sorted_pairs = dispatch(ids.to(DEV), E)
    flat = ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    expect = torch.sort(key, stable=True).indices
    assert torch.equal(sorted_pairs.cpu().long(), expect)
    assert torch.equal(counts.cpu().long(), torch.bincount(key, minlength=E + 1)[:E])
    assert offsets[-1].item() == int(((flat >= 0) & (flat < E)).sum())


@pytest.mark.parametrize("call,exc,match", [
    (lambda: sk.route(torch.randn(4, 8), 9), ValueError, "top_k"),
    (lambda: sk.route(torch.randn(4, 1025), 2), ValueError, "experts"),
    (lambda: sk.route(torch.randn(4, 64), 33), ValueError, "top_k"),
    (lambda: sk.route(torch.randn(4, 8), 0), ValueError, "top_k"),
    (lambda: sk.route(torch.randn(4, 8, 2), 2), ValueError, "tokens, experts"),
    (lambda: sk.route(torch.randint(0, 3, (4, 8)), 2), TypeError, "float"),
    (lambda: sk.route(torch.randn(4, 8), 2.0), TypeError, "int"),
    (lambda: sk.route(torch.randn(4, 8), 2, scoring="relu"), ValueError, "scoring"),
    (lambda: sk.route([[1.0]], 1), TypeError, "Tensor"),
    (lambda: dispatch(torch.zeros(4, 2), 8), TypeError, "integer"),
    (lambda: dispatch(torch.zeros(4, 2, dtype=torch.long), 1025), ValueError, "num_experts"),
    (lambda: dispatch(torch.zeros(4, 33, dtype=torch.long), 64), ValueError, "top_k"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,T,E,k", [(torch.bfloat16, 4096, 8, 2), (torch.float16, 3000, 128, 8),
                                         (torch.float32, 20000, 256, 8), (torch.bfloat16, 65536, 64, 6)])
def test_route_gpu(dtype, T, E, k):
    g = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=g).to("cuda", dtype)
    _check_plan(sk.route(logits, k), logits, k)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(min(T, 2000))]).cuda()
    for a, b in zip(dispatch(ids, E), dispatch_reference(ids, E)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_route_compile_and_graph():
    logits = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda x: sk.route(x, 4).topk_weights.square().sum(), fullgraph=True)
    loss = fn(logits)
    loss.backward()
    ref = logits.detach().clone().requires_grad_()
    route_reference(ref, 4)[0].square().sum().backward()
    assert (logits.grad.float() - ref.grad.float()).norm() / ref.grad.float().norm() < 1e-2
    static = torch.randn(256, 128, device="cuda")
    sk.route(static, 8)                                # compile the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = sk.route(static, 8)
    static.copy_(torch.randn(256, 128, device="cuda"))
    graph.replay()
    _check_plan(plan, static, 8)


@pytest.mark.parametrize("gather", [True, False])
def test_sort_in_chunks_of_blocks(monkeypatch, gather):
    """Few sort programs, many count blocks each: blocks are placed several per step (and with the
    scratch-row lookup instead of tl.gather); the plan must not change."""
    from symphony_kernels import _routing_launch

    monkeypatch.setattr(_routing_launch, "_SORT_PROGRAMS", 3)
    monkeypatch.setattr(_routing_launch, "_GATHER", gather)
    logits = torch.randn(800, 64, generator=torch.Generator().manual_seed(7)).to(DEV)   # 7 blocks: 3 + 3 + 1
    _check_plan(sk.route(logits, 6), logits, 6)
    ids = torch.randint(-1, 9, (1700, 3), generator=torch.Generator().manual_seed(8))   # 7 blocks too
    counts, offsets, sorted_pairs = dispatch(ids.to(DEV), 8)
    flat = ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < 8), flat, torch.full_like(flat, 8))
    assert torch.equal(sorted_pairs.cpu().long(), torch.sort(key, stable=True).indices)


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (2, 7, 3), (3, 512, 10), (9, 512, 10), (16, 6, 2), (40, 64, 4)])
def test_one_launch_plan_equals_the_sorted_one(monkeypatch, T, E, k):
    """A call of one count block is planned by its first kernel alone: the same plan as the two-launch path."""
    from symphony_kernels import _routing_launch

    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)).to(DEV)
    call, _ = _routing_launch.route_call(logits, k, "softmax", True)
    assert len(call.launches) == 1
    ids = torch.randint(-1, E + 1, (T, k), generator=torch.Generator().manual_seed(E)).to(DEV)
    one = (sk.route(logits, k), dispatch(ids, E))
    monkeypatch.setattr(_routing_launch, "_ONE_LAUNCH", False)
    assert len(_routing_launch.route_call(logits, k, "softmax", True)[0].launches) == 2
    two = (sk.route(logits, k), dispatch(ids, E))
    for a, b in zip((*one[0], *one[1]), (*two[0], *two[1])):
        assert torch.equal(a.cpu(), b.cpu())
    _check_plan(one[0], logits, k)


def test_reference_route_gradient_at_inf_is_zero(monkeypatch):
    """Without the kernels (CPU, no interpreter) route gives the kernels' gradient: 0 where the scores do not
    depend on a logit (a +inf maximum), never NaN."""
    from symphony_kernels import routing

    monkeypatch.setattr(routing, "use_triton", lambda device: False)
    logits = torch.randn(4, 6, dtype=torch.float64)
    logits[1, 2] = float("inf")
    logits.requires_grad_()
    plan = sk.route(logits, 2)
    plan.topk_weights.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
    kernel_logits = logits.detach().clone().requires_grad_()
    monkeypatch.undo()
    sk.route(kernel_logits.to(DEV), 2).topk_weights.sum().backward()
    assert torch.allclose(logits.grad, kernel_logits.grad.cpu(), atol=1e-6)
