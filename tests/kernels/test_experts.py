"""symphony_kernels.moe_experts forward and backward against the float64 reference; edge cases; bad input.

CPU: the Triton kernels under TRITON_INTERPRET=1 on small fp32/fp16 shapes (both the decode path, T*k <= 64,
and the sorted grouped-GEMM path). GPU-marked: bf16/fp16/fp32 at larger shapes, torch.compile(fullgraph),
CUDA-graph capture, and offsets beyond 2^31 elements.
"""
import pytest
import torch

import symphony_kernels as sk
from symphony_kernels.reference import moe_experts_reference, route_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _problem(T, d, f, E, k, seed, ids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    gate_up = torch.randn(E, 2 * f, d, generator=g) / d ** 0.5
    down = torch.randn(E, d, f, generator=g) / f ** 0.5
    w = torch.rand(T, k, generator=g) + 0.1
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    return x, gate_up, down, w, ids.to(torch.int32)


def _compare(T, d, f, E, k, dtype=torch.float32, act="silu", seed=0, ids=None, weight_dtype=None, grads=True,
             prep=lambda ts: ts, plan=False):
    x, gate_up, down, w, ids = _problem(T, d, f, E, k, seed, ids)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(T, d, generator=g)
    wdt = weight_dtype or dtype
    leaves = [x.to(DEV, dtype, copy=True), gate_up.to(DEV, wdt, copy=True), down.to(DEV, wdt, copy=True),
              w.to(DEV, copy=True)]
    leaves = [t.requires_grad_(grads) for t in leaves]
    args = prep(leaves + [ids.to(DEV)])
    kw = {}
    if plan:  # a plan for these very ids
        from symphony_kernels.routing import dispatch
        counts, offsets, sorted_pairs = dispatch(args[4], E)
        kw = {"plan": sk.RoutingPlan(None, args[4], counts, offsets, sorted_pairs)}
    out = sk.moe_experts(*args, activation=act, **kw)
    assert out.dtype == dtype and out.shape == (T, d)
    # The reference runs in float64 on the very inputs the kernels see (rounded to dtype where they are).
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = moe_experts_reference(*ref_leaves, ids, act)
    assert _rel(out, ref) < TOL[dtype], _rel(out, ref)
    if grads:
        (out.float() * upstream.to(DEV)).sum().backward()
        (ref * upstream.double()).sum().backward()
        for name, a, b in zip(("hidden", "gate_up", "down"), leaves, ref_leaves):
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            assert _rel(a.grad, b.grad) < TOL[dtype], (name, _rel(a.grad, b.grad))
        # d weights[t, j] = sum_n G_n h_n (G = upstream[t] @ down[e], h = act(gate) * up) cancels heavily when
        # few tokens are routed; bound its error by the sum of the magnitudes of the terms instead.
        dw, dw_ref = leaves[3].grad, ref_leaves[3].grad
        assert dw is not None and dw.dtype == leaves[3].dtype
        scale = _dw_scale(ref_leaves, ids, upstream.double(), act)
        err = ((dw.double().cpu() - dw_ref).abs() / scale.clamp_min(1e-300)).max().item() if T else 0.0
        assert err < TOL[dtype], ("weights", err)
    return out


def _dw_scale(ref_leaves, ids, upstream, act):
    from symphony_kernels.reference import ACTIVATIONS

    x, gate_up, down, _ = (t.detach() for t in ref_leaves)
    f = down.shape[-1]
    e = ids.long()
    scale = torch.zeros(e.shape, dtype=torch.float64)
    for ex in torch.unique(e).tolist():
        t, j = torch.nonzero(e == ex, as_tuple=True)
        gu = x[t] @ gate_up[ex].t()
        h = ACTIVATIONS[act](gu[:, :f]) * gu[:, f:]
        scale[t, j] = ((upstream[t].abs() @ down[ex].abs()) * h.abs()).sum(-1)  # bounds the dot over d too
    return scale


@pytest.mark.parametrize("T,d,f,E,k,act", [
    (3, 32, 48, 4, 2, "silu"),       # decode path (T*k <= 64)
    (60, 24, 20, 2, 2, "silu"),      # decode path over few experts (E * next_pow2(T*k) <= 256)
    (40, 40, 24, 8, 2, "gelu"),      # sorted grouped-GEMM path
    (70, 33, 19, 8, 3, "silu"),      # odd d and f
    (50, 24, 40, 6, 3, "silu"),      # d a multiple of 8, not of 16 (the AL = 8 path)
    (30, 1, 3, 4, 2, "gelu"),        # d = 1
    (12, 7, 1, 5, 3, "silu"),        # f = 1
])
def test_experts_fp32(T, d, f, E, k, act):
    _compare(T, d, f, E, k, act=act, seed=T)


@pytest.mark.parametrize("T,E,k,grads", [(1, 1024, 32, False), (4, 300, 20, False), (5, 40, 24, True),
                                         (2, 96, 4, True)])
def test_experts_many_experts_and_large_top_k(T, E, k, grads):
    """Up to 1024 experts and top-32 (Qwen3-Next has 512 x top-10): the sorted path, and the decode path with
    one program row per pair (E >= 8 * T * k), gradients included."""
    _compare(T, 16, 8, E, k, seed=E, grads=grads)


def test_experts_fp16_with_fp32_weights():
    _compare(48, 32, 32, 8, 2, dtype=torch.float16, weight_dtype=torch.float32, seed=5)


def test_experts_fp16_decode():
    _compare(6, 32, 16, 8, 8, dtype=torch.float16, seed=6, act="gelu")


def test_experts_k1_ke_e1():
    _compare(20, 16, 16, 3, 1, seed=7)                   # k = 1
    _compare(17, 16, 16, 4, 4, seed=8)                   # k = E, every expert gets every token
    _compare(40, 16, 16, 1, 1, seed=9)                   # E = 1


def test_experts_unused_experts_and_one_expert_for_all():
    ids = torch.tensor([[5, 2]] * 30 + [[2, 5]] * 10)   # experts 0, 1, 3, 4, 6, 7 get nothing
    _compare(40, 16, 24, 8, 2, seed=10, ids=ids)
    _compare(5, 16, 24, 8, 1, seed=11, ids=torch.full((5, 1), 7))  # decode, all on expert 7


def test_experts_non_contiguous_inputs():
    def transposed_copy(t):  # same values, column-major strides
        return t.t().contiguous().t() if t.dim() == 2 else t.transpose(1, 2).contiguous().transpose(1, 2)

    def prep(ts):
        views = [transposed_copy(t) for t in ts]
        assert not any(v.is_contiguous() for v in views)
        return views

    _compare(36, 16, 24, 8, 2, seed=12, prep=prep)      # sorted path
    _compare(5, 16, 24, 4, 2, seed=12, prep=prep)       # decode path


def test_experts_with_plan_and_determinism():
    out = _compare(50, 16, 16, 8, 2, seed=13, plan=True, grads=False)
    x, gate_up, down, w, ids = _problem(50, 16, 16, 8, 2, 13)
    again = sk.moe_experts(x.to(DEV), gate_up.to(DEV), down.to(DEV), w.to(DEV), ids.to(DEV))
    assert torch.equal(out, again)                       # bitwise: no atomics, fixed reduction order


@pytest.mark.parametrize("T,E", [(8, 4), (40, 8), (4, 64)])  # decode, sorted, decode with a row per pair
def test_experts_dropped_pairs(T, E):
    x, gate_up, down, w, ids = _problem(T, 16, 16, E, 2, 14)
    ids[1, 0] = E                                         # transformers' expert-parallel sentinel
    ids[3, 1] = -1
    out = sk.moe_experts(x.to(DEV), gate_up.to(DEV), down.to(DEV), w.to(DEV), ids.to(DEV))
    live = (ids >= 0) & (ids < E)
    ref = moe_experts_reference(x.double(), gate_up.double(), down.double(), torch.where(live, w, 0).double(),
                                torch.where(live, ids, 0))
    assert _rel(out, ref) < 1e-5
    # Backward: a dropped pair's routing weight gets an exact-zero gradient, the rest match the reference.
    leaves = [t.to(DEV, copy=True).requires_grad_() for t in (x, gate_up, down, w)]
    g = torch.randn(T, 16, generator=torch.Generator().manual_seed(3))
    (sk.moe_experts(*leaves, ids.to(DEV)) * g.to(DEV)).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, gate_up, down, w)]
    w_live = torch.where(live, ref_leaves[3], torch.zeros_like(ref_leaves[3]))
    (moe_experts_reference(*ref_leaves[:3], w_live, torch.where(live, ids, 0)) * g.double()).sum().backward()
    assert leaves[3].grad[1, 0] == 0 and leaves[3].grad[3, 1] == 0
    for a, b in zip(leaves, ref_leaves):
        assert _rel(a.grad, b.grad) < 1e-5


def test_experts_split_k_paths(monkeypatch):
    """The split-K partials of the down, dX and d(inter) GEMMs (summed by the combine and the activation
    backward passes): the GPU takes them at small batches; the interpreter's tiles never do, so force two."""
    from symphony_kernels import _experts_launch

    real = _experts_launch._pick

    def split_two(kernel, *args):
        cfg = real(kernel, *args)
        return cfg._replace(split=2) if kernel in ("down", "dx", "dinter") else cfg

    monkeypatch.setattr(_experts_launch, "_pick", split_two)
    _compare(40, 40, 24, 8, 2, seed=16)                  # sorted path
    _compare(5, 32, 48, 4, 2, seed=17, act="gelu")       # decode path


def test_experts_weight_gradients_gathered_in_the_loop(monkeypatch):
    """The weight-gradient kernels' by-token operands read through the plan inside their loop (what
    GATHER_ROWS = False selects) give the same gradients as the default row-order copies."""
    from symphony_kernels import _experts_launch

    monkeypatch.setattr(_experts_launch, "GATHER_ROWS", False)
    _compare(40, 40, 24, 8, 2, seed=18)                  # sorted path
    _compare(5, 32, 48, 4, 2, seed=19)                   # decode path


def test_experts_empty_batch():
    x, gate_up, down, w, ids = _problem(0, 16, 8, 4, 2, 15)
    leaves = [t.to(DEV).requires_grad_() for t in (x, gate_up, down, w)]
    out = sk.moe_experts(*leaves, ids.to(DEV))
    assert out.shape == (0, 16)
    out.sum().backward()
    assert leaves[1].grad is not None and leaves[1].grad.abs().sum() == 0


def test_experts_no_grad_saves_nothing():
    x, gate_up, down, w, ids = _problem(40, 16, 16, 4, 2, 16)
    with torch.no_grad():
        out = sk.moe_experts(x.to(DEV), gate_up.to(DEV), down.to(DEV), w.to(DEV), ids.to(DEV))
    assert out.grad_fn is None and torch.isfinite(out).all()


def _bad(**over):
    x, gate_up, down, w, ids = _problem(4, 8, 6, 4, 2, 0)
    args = dict(hidden=x, gate_up_proj=gate_up, down_proj=down, topk_weights=w, topk_ids=ids)
    args.update(over)
    return lambda: sk.moe_experts(**{k: v for k, v in args.items() if k != "activation"},
                                  **({"activation": over["activation"]} if "activation" in over else {}))


@pytest.mark.parametrize("call,exc,match", [
    (_bad(hidden=torch.randn(4, 8, 1)), ValueError, "hidden must have 2"),
    (_bad(gate_up_proj=torch.randn(4, 12, 9)), ValueError, "hidden size"),
    (_bad(gate_up_proj=torch.randn(4, 11, 8)), ValueError, "2f"),
    (_bad(down_proj=torch.randn(4, 8, 5)), ValueError, "down_proj"),
    (_bad(topk_ids=torch.zeros(4, 3, dtype=torch.int32)), ValueError, "topk_weights"),
    (_bad(topk_ids=torch.zeros(4, 2)), TypeError, "integer"),
    (_bad(topk_weights=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "float"),
    (_bad(hidden=torch.randn(4, 8, dtype=torch.float16), gate_up_proj=torch.randn(4, 12, 8, dtype=torch.bfloat16)),
     TypeError, "gate_up_proj must be float32 or"),
    (_bad(hidden=torch.randint(0, 2, (4, 8))), TypeError, "hidden must be"),
    (_bad(activation="relu"), ValueError, "activation"),
    (_bad(topk_ids=torch.zeros(4, 5, dtype=torch.int32), topk_weights=torch.zeros(4, 5)), ValueError, "top_k"),
    (_bad(gate_up_proj=torch.randn(1025, 12, 8), down_proj=torch.randn(1025, 8, 6)), ValueError, "experts"),
    (_bad(hidden=torch.randn(4, 8, device="meta")), ValueError, "device"),
    (_bad(hidden="x"), TypeError, "Tensor"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_plan_of_other_ids_is_refused():
    """A plan is tied to the ids it was made from: other ids of the same shape, ids changed since, or a plan
    made up by hand (rows out of range) are refused before any kernel runs."""
    x, gate_up, down, w, ids = (t.to(DEV) for t in _problem(40, 16, 16, 8, 2, 31))
    plan = sk.route(torch.randn(40, 8, device=DEV), 2)
    sk.moe_experts(x, gate_up, down, plan.topk_weights, plan.topk_ids, plan=plan)      # its own ids: fine
    with pytest.raises(ValueError, match="other topk_ids"):
        sk.moe_experts(x, gate_up, down, w, ids, plan=plan)
    other = plan.topk_ids.clone()
    with pytest.raises(ValueError, match="other topk_ids"):
        sk.moe_experts(x, gate_up, down, plan.topk_weights, other, plan=plan)          # equal values, other tensor
    plan.topk_ids[0, 0] = (plan.topk_ids[0, 0] + 1) % 8
    with pytest.raises(ValueError, match="changed since"):
        sk.moe_experts(x, gate_up, down, plan.topk_weights, plan.topk_ids, plan=plan)
    forged = sk.RoutingPlan(w, ids, plan.expert_counts, plan.expert_offsets,
                            torch.full((80,), 10**6, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="not made by"):
        sk.moe_experts(x, gate_up, down, w, ids, plan=forged)


def test_meta_tensors_give_shapes():
    x = torch.empty(5, 16, device="meta")
    plan = sk.route(torch.empty(5, 8, device="meta"), 2)
    assert plan.topk_ids.shape == (5, 2) and plan.sorted_pairs.shape == (10,) and plan.expert_offsets.shape == (9,)
    out = sk.moe_experts(x, torch.empty(8, 32, 16, device="meta"), torch.empty(8, 16, 16, device="meta"),
                         plan.topk_weights, plan.topk_ids)
    assert out.device.type == "meta" and out.shape == (5, 16)


# ------------------------------------------------------------------------------------------------- GPU
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,T,d,f,E,k", [
    (BF16, 1, 896, 4864, 4, 2), (FP32, 1, 896, 4864, 4, 2), (FP16, 8, 256, 512, 128, 8),
    (FP32, 8, 256, 512, 128, 8), (BF16, 300, 512, 768, 8, 2), (FP16, 300, 512, 768, 8, 2),
    (FP32, 300, 512, 768, 8, 2), (BF16, 2048, 256, 192, 128, 8), (BF16, 1000, 200, 300, 5, 3),
    (FP32, 1000, 200, 300, 5, 3),
    (BF16, 1, 256, 128, 512, 10), (FP32, 2, 256, 128, 512, 10),   # decode, a program row per pair
    (BF16, 64, 256, 384, 128, 8), (FP32, 64, 512, 256, 512, 10)])  # sorted, few rows per expert: short tiles
def test_experts_gpu(dtype, T, d, f, E, k):
    _compare(T, d, f, E, k, dtype=dtype, seed=T + E, act="gelu" if E == 5 else "silu")


@pytest.mark.gpu
def test_experts_gpu_fp32_weights_bf16_hidden():
    _compare(700, 256, 384, 8, 2, dtype=torch.bfloat16, weight_dtype=torch.float32, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("T,d,f,E,k", [(600, 256, 384, 8, 2), (301, 128, 96, 64, 6)])
def test_experts_gpu_weight_gradients_grouped_mm(monkeypatch, T, d, f, E, k):
    """The bf16 weight gradients through torch._grouped_mm (Hopper) against the Triton kernel: the same values,
    exact zeros for experts that get no token, dropped pairs ignored, and bitwise the same on a second run."""
    from symphony_kernels import _experts_launch

    x, gate_up, down, w, _ = _problem(T, d, f, E, k, 40)
    ids = torch.randint(2, E, (T, k), generator=torch.Generator().manual_seed(42), dtype=torch.int32)  # not 0, 1
    ids[5, 0], ids[7, k - 1] = -1, E                    # dropped pairs
    g = torch.randn(T, d, generator=torch.Generator().manual_seed(41))

    def grads(grouped):
        monkeypatch.setattr(_experts_launch, "GROUPED_MM_WGRAD", grouped)
        leaves = [t.to("cuda", BF16, copy=True).requires_grad_() for t in (x, gate_up, down)]
        wd = w.cuda().requires_grad_()
        (sk.moe_experts(*leaves, wd, ids.cuda()).float() * g.cuda()).sum().backward()
        return [t.grad for t in leaves] + [wd.grad]

    first, again, triton_only = grads(True), grads(True), grads(False)
    for a, b, c in zip(first, again, triton_only):
        assert torch.equal(a, b)
        assert _rel(a, c) < 1e-2
    for dw in first[1:3]:
        assert dw[:2].abs().max() == 0                  # experts 0 and 1: exact zeros


@pytest.mark.gpu
def test_experts_compile_fullgraph():
    x, gate_up, down, w, ids = _problem(256, 128, 256, 8, 2, 21)
    leaves = [t.cuda().to(torch.bfloat16).requires_grad_() for t in (x, gate_up, down)]
    logits = torch.randn(256, 8, device="cuda", requires_grad=True)

    def layer(x, gate_up, down, logits):
        plan = sk.route(logits, 2)
        return sk.moe_experts(x, gate_up, down, plan.topk_weights, plan.topk_ids, plan=plan)

    out = torch.compile(layer, fullgraph=True)(*leaves, logits)
    out.float().square().sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves + [logits]]
    rw, rid = route_reference(ref_leaves[3], 2)
    ref = moe_experts_reference(*ref_leaves[:3], rw, rid)
    ref.square().sum().backward()
    assert _rel(out, ref) < 1e-2
    for a, b in zip(leaves + [logits], ref_leaves):
        assert _rel(a.grad, b.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 512])
def test_experts_cuda_graph(T):
    x, gate_up, down, w, ids = _problem(T, 256, 512, 8, 2, 22)
    x, gate_up, down, w, ids = (t.cuda() for t in (x, gate_up, down, w, ids))
    x, gate_up, down = (t.to(torch.bfloat16) for t in (x, gate_up, down))
    sk.moe_experts(x, gate_up, down, w, ids)              # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.moe_experts(x, gate_up, down, w, ids)
    x2, _, _, w2, ids2 = _problem(T, 256, 512, 8, 2, 23)
    x.copy_(x2.cuda()), w.copy_(w2.cuda()), ids.copy_(ids2.cuda())
    graph.replay()
    ref = moe_experts_reference(x.double().cpu(), gate_up.double().cpu(), down.double().cpu(), w2.double(), ids2)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_experts_offsets_beyond_int32():
    """T * d > 2^31: row offsets of hidden, the per-pair outputs and the result need int64 arithmetic."""
    T, d, f, E = 2**31 // 4096 + 4096, 4096, 16, 2
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(E, 2 * f, d, device="cuda", dtype=torch.bfloat16) / 64
    down = torch.randn(E, d, f, device="cuda", dtype=torch.bfloat16) / 4
    ids = (torch.arange(T, device="cuda") % E).view(T, 1).int()
    w = torch.ones(T, 1, device="cuda")
    with torch.no_grad():
        out = sk.moe_experts(x, gate_up, down, w, ids)
    rows = torch.tensor([0, 1, T // 2, T - 2, T - 1], device="cuda")
    ref = moe_experts_reference(x[rows].double(), gate_up.double(), down.double(), w[rows].double(), ids[rows])
    assert _rel(out[rows], ref) < 1e-2


def test_custom_ops_registration():
    """The torch.library ops (what torch.compile traces) pass opcheck: fake shapes, autograd, schema."""
    from symphony_kernels import ops

    x, gate_up, down, w, ids = _problem(3, 16, 16, 4, 2, 30)
    args = [t.to(DEV).requires_grad_() for t in (x, gate_up, down, w)] + [ids.to(DEV)] * 3 + ["silu", True]
    torch.library.opcheck(ops.moe_experts_op, args, test_utils=("test_schema", "test_faketensor",
                                                                "test_autograd_registration"))
    logits = torch.randn(10, 6, device=DEV, requires_grad=True)
    torch.library.opcheck(ops.route_op, (logits, 2, "softmax", True))
    torch.library.opcheck(ops.dispatch_op, (ids.to(DEV), 4))


def test_reference_fallback_without_interpreter():
    """CPU tensors without TRITON_INTERPRET=1 take the documented reference path, gradients included."""
    import os
    import subprocess
    import sys

    code = ("import torch, symphony_kernels as sk\n"
            "from symphony_kernels._runtime import use_triton\n"
            "assert not use_triton(torch.device('cpu'))\n"
            "x = torch.randn(6, 8, requires_grad=True)\n"
            "plan = sk.route(torch.randn(6, 4), 2)\n"
            "out = sk.moe_experts(x, torch.randn(4, 12, 8), torch.randn(4, 8, 6), plan.topk_weights, plan.topk_ids)\n"
            "out.sum().backward(); assert x.grad is not None and out.shape == (6, 8)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
