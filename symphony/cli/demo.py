"""`symphony demo`: the built-in default job (the README's main command).

1. An MoE layer forward and backward through the public kernels API (symphony_kernels.route + moe_experts),
   checked against the plain-PyTorch reference in float64. On a machine without CUDA the Triton kernels run
   through Triton's interpreter (TRITON_INTERPRET=1 is set before triton is imported).
2. A full Symphony-MoE build from small built-in sources: three tiny Qwen2 models that share one base and were
   trained apart on prose, code and arithmetic (symphony.testing.make_family), each with its own domain text,
   into an output folder (default ./symphony-demo): sources/, text/, build.yaml, moe/ (the built checkpoint).
3. An eval table: held-out perplexity per domain of every source and of the built MoE, and which source's
   experts each domain's tokens are routed to.

A failure, Ctrl-C or SIGTERM before the end removes the work folder; a failed check keeps it for a look.
Checks (any failure exits non-zero): the kernels match the reference (relative error < 1e-5); the MoE loads in
transformers with no missing or unexpected weight and its experts are the source FFNs bit for bit; its mean
held-out perplexity over the three domains is lower than every source's.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

HELP = "the built-in default job: a checked MoE forward/backward, then a full build from small sources"
DOMAINS = ("prose", "code", "math")
MARKER = ".symphony-demo"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--out", default="symphony-demo", help="work folder (default ./symphony-demo); "
                                                               "replaced if an earlier demo made it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60, help="stage 2 router-training steps (default 60)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")


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

    def run(fn_route, fn_experts, dtype, device):
        leaves = [t.clone().to(device, dtype).requires_grad_() for t in (x, w_router, gate_up, down)]
        xs, wr, gu, dn = leaves
        weights, ids = fn_route(xs @ wr.t(), k)[:2]
        out = fn_experts(xs, gu, dn, weights.to(dtype), ids)
        out.square().sum().backward()
        return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = run(sk.route, sk.moe_experts, torch.float32, device)
    ref = run(route_reference, moe_experts_reference, torch.float64, "cpu")
    names = ["output", "grad hidden", "grad router", "grad gate_up", "grad down"]
    return {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(names, ours, ref)}


def _kernel_backend() -> str:
    from symphony_kernels import _runtime

    if torch.cuda.is_available():
        return "Triton kernels on CUDA"
    if _runtime.use_triton(torch.device("cpu")):
        return "Triton kernels through the interpreter (CPU)"
    return "the plain-PyTorch fallback (triton unavailable)"


def _check_out(out: Path):
    """The work folder may be replaced: it is new, or an earlier demo made it; never the current folder or one
    above it (symphony.outputs.check_output_path)."""
    from symphony.errors import SymphonyError
    from symphony.outputs import check_output_path

    check_output_path(out)
    if (out.exists() or out.is_symlink()) and not (out.is_dir() and (out / MARKER).is_file()):
        raise SymphonyError(f"{out} exists and was not made by `symphony demo`: give another --out")


def _prepare(out: Path) -> Path:
    _check_out(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `symphony demo`; deleted and remade by the next run\n")
    return out


def _write_sources(out: Path, seed: int) -> tuple[dict, dict, dict]:
    """Sources, per-domain training text and held-out text (a different seed)."""
    from symphony.testing import domain_text, make_family

    paths = dict(zip(DOMAINS, make_family(out / "sources", arch="qwen2", domains=DOMAINS, seed=seed)))
    (out / "text").mkdir()
    train, test = {}, {}
    for d in DOMAINS:
        train[d] = out / "text" / f"{d}.train.txt"
        test[d] = out / "text" / f"{d}.test.txt"
        train[d].write_text("\n".join(domain_text(d, 400, seed=seed + 100)) + "\n")
        test[d].write_text("\n".join(domain_text(d, 100, seed=seed + 200)) + "\n")
    return paths, train, test


def _build_config(out: Path, paths: dict, train: dict, steps: int, seed: int, device: str) -> Path:
    import yaml

    data = {"sources": [{"name": d, "path": os.path.relpath(paths[d], out), "calibration":
                         [os.path.relpath(train[d], out)]} for d in DOMAINS],
            "anchor": "prose",
            "fusion": {"attention": "slerp", "embeddings": "selective", "norms": "linear"},
            "experts": {"top_k": 2, "router_init": "hidden"},
            "alignment": {"enabled": "auto", "seq_len": 128},
            "router_training": {"steps": steps, "seq_len": 128, "batch_size": 8, "lr": 1e-2},
            "device": device, "seed": seed}
    path = out / "build.yaml"
    path.write_text("# written by `symphony demo`; run it again with: symphony build build.yaml --out moe2\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path


def _check_experts(moe_dir: Path, paths: dict) -> str | None:
    """None when the MoE loads with no missing/unexpected weight and its experts are the source FFNs bit for
    bit (alignment is skipped for whole-FFN experts, so they are unpermuted); else what is wrong."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from symphony.data import quiet_zero_size_init

    with quiet_zero_size_init():
        model, info = AutoModelForCausalLM.from_pretrained(moe_dir, dtype="auto", output_loading_info=True)
    bad = {k: sorted(v)[:3] for k, v in info.items() if v}
    if bad:
        return f"loading the MoE reported {bad}"
    for e, d in enumerate(DOMAINS):
        files = sorted(paths[d].glob("*.safetensors"))
        for i, layer in enumerate(model.model.layers):
            names = [f"model.layers.{i}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
            w = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    w.update({n: f.get_tensor(n) for n in names if n in f.keys()})
            gate, up, down = (w[n] for n in names)
            if not (torch.equal(layer.mlp.experts.gate_up_proj[e], torch.cat([gate, up]).to(gate.dtype))
                    and torch.equal(layer.mlp.experts.down_proj[e], down)):
                return f"expert {e} of layer {i} is not source {d!r}'s FFN"
    return None


def _evaluate(models: dict, test: dict, device: str) -> dict:
    from symphony.data import load_model, load_tokenizer
    from symphony.evaluate import perplexity

    table = {}
    for name, path in models.items():
        model, tok = load_model(path, device=device), load_tokenizer(path)
        table[name] = {d: perplexity(model, tok, [test[d].read_text()], seq_len=128, progress=False)["ppl"]
                       for d in DOMAINS}
        del model
    return table


def _routing(moe_dir: Path, test: dict, device: str) -> dict:
    """Per domain, the share of routed assignments that go to each source's experts (mean over layers)."""
    import json

    from symphony.data import load_model, load_tokenizer
    from symphony.evaluate import REPORT, expert_load, source_load

    sources = json.loads((moe_dir / REPORT).read_text())["expert_sources"]
    model, tok = load_model(moe_dir, device=device), load_tokenizer(moe_dir)
    out = {}
    for d in DOMAINS:
        per = source_load(expert_load(model, tok, [test[d].read_text()], seq_len=128, progress=False), sources)
        out[d] = {s: sum(v) / len(v) for s, v in per.items()}
    return out


def run(args) -> int:
    if not torch.cuda.is_available():  # before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from transformers.utils import logging

    from symphony.errors import SymphonyError
    from symphony.outputs import output_lock, output_path, terminate_as_exception

    logging.disable_progress_bar()

    if args.steps < 0:
        raise SymphonyError("--steps must be >= 0")
    out = output_path(args.out)
    _check_out(out)  # before any work
    failures = _kernel_step(args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with terminate_as_exception(resignal=True), output_lock(out):
        _prepare(out)
        try:
            failures += _build_and_evaluate(out, args)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # a half-made work folder is of no use to anyone
            raise
    if failures:
        raise SymphonyError("demo check failed: " + "; ".join(failures))
    print("\nall demo checks: OK")
    return 0


def _kernel_step(seed: int) -> list[str]:
    print(f"[1/3] MoE layer (T=24, d=32, f=48, E=4, top-2), fp32 vs float64 reference, on {_kernel_backend()}:")
    errors = check_moe_layer(seed)
    for name, err in errors.items():
        print(f"  {name:<13} relative error {err:.2e}")
    worst = max(errors.values())
    print(f"  kernel check: {'OK' if worst < 1e-5 else 'FAILED'}")
    return [] if worst < 1e-5 else [f"MoE layer: worst relative error {worst:.2e} >= 1e-5"]


def _build_and_evaluate(out: Path, args) -> list[str]:
    """Steps 2 and 3 in the work folder `out`; returns the failed checks."""
    from symphony.build.pipeline import build
    from symphony.build.report import format_summary

    failures = []
    print(f"\n[2/3] Symphony-MoE build from 3 small Qwen2 sources (prose, code, math) in {out}/")
    paths, train, test = _write_sources(out, args.seed)
    config = _build_config(out, paths, train, args.steps, args.seed, args.device)
    summary = build(config, out / "moe", progress=False)
    print(format_summary(summary))
    problem = _check_experts(out / "moe", paths)
    print(f"  load + experts check: {'OK' if problem is None else 'FAILED: ' + problem}")
    if problem:
        failures.append(problem)

    print(f"\n[3/3] held-out perplexity per domain ({out}/text/*.test.txt; lower is better)")
    table = _evaluate({**{f"source {d}": paths[d] for d in DOMAINS}, "Symphony-MoE": out / "moe"}, test,
                      args.device)
    print(f"  {'model':<14}" + "".join(f"{d:>9}" for d in DOMAINS) + f"{'mean':>9}")
    means = {}
    for name, row in table.items():
        means[name] = sum(row.values()) / len(row)
        print(f"  {name:<14}" + "".join(f"{row[d]:>9.2f}" for d in DOMAINS) + f"{means[name]:>9.2f}")
    routing = _routing(out / "moe", test, args.device)
    print("  routed to each source's experts (% of assignments, mean over layers):")
    print(f"  {'text':<14}" + "".join(f"{s:>9}" for s in DOMAINS))
    for d, row in routing.items():
        print(f"  {d:<14}" + "".join(f"{100 * row[s]:>8.1f}%" for s in DOMAINS))
    best = min((v, k) for k, v in means.items() if k != "Symphony-MoE")
    ok = means["Symphony-MoE"] < best[0]
    print(f"  quality check: MoE mean perplexity {means['Symphony-MoE']:.2f} "
          f"{'<' if ok else '>='} best source ({best[1]}) {best[0]:.2f}: {'OK' if ok else 'FAILED'}")
    if not ok:
        failures.append("the MoE's mean perplexity is not below every source's")
    return failures
