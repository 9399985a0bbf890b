"""`symphony demo`: the built-in default job.

1. An MoE layer forward and backward through the public kernels API, checked against the plain-PyTorch
   reference in float64.
"""
import argparse

import torch

HELP = "the built-in default job: a checked MoE forward/backward"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--seed", type=int, default=0)


def check_moe_layer(seed: int = 0, T: int = 24, d: int = 32, f: int = 48, E: int = 4, k: int = 2) -> dict:
    """Route and run an MoE layer (fp32) through the public API; compare output and all gradients with
    the float64 reference. Returns the relative errors."""
    import symphony_kernels as sk
    from symphony_kernels.reference import moe_experts_reference, route_reference

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    w_router = torch.randn(E, d, generator=g) / d**0.5
    gate_up = torch.randn(E, 2 * f, d, generator=g) / d**0.5
    down = torch.randn(E, d, f, generator=g) / f**0.5

    def run(fn_route, fn_experts, dtype):
        leaves = [t.clone().to(dtype).requires_grad_() for t in (x, w_router, gate_up, down)]
        xs, wr, gu, dn = leaves
        weights, ids = fn_route(xs @ wr.t(), k)[:2]
        out = fn_experts(xs, gu, dn, weights.to(dtype), ids)
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(sk.route, sk.moe_experts, torch.float32)
    ref = run(route_reference, moe_experts_reference, torch.float64)
    names = ["output", "grad hidden", "grad router", "grad gate_up", "grad down"]
    return {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(names, ours, ref)}


def run(args) -> int:
    from symphony.errors import SymphonyError

    errors = check_moe_layer(args.seed)
    print("MoE layer (T=24, d=32, f=48, E=4, top-2), fp32 vs float64 reference:")
    for name, err in errors.items():
        print(f"  {name:<13} relative error {err:.2e}")
    worst = max(errors.values())
    if not worst < 1e-5:
        raise SymphonyError(f"MoE layer check failed: worst relative error {worst:.2e} >= 1e-5")
    print("MoE layer check: OK")
    return 0
