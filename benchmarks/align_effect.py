"""Where does functional alignment change a Symphony-MoE's output? A measurement on small real sources (CPU).

Permuting an FFN's hidden neurons (rows of gate/up, columns of down) leaves that FFN's function unchanged, so
alignment can only matter where neuron i of one source meets neuron i of another. This script builds, from the
same sources, each MoE configuration twice (experts from unaligned and from aligned FFNs) and reports the
largest logit difference between the two, and their held-out loss (mean next-token NLL over the domains):

  whole       experts = whole source FFNs (per_source 1), top-2 of N
  shared      whole experts + a shared expert = the mean of the source FFNs (added with weight sigmoid(0) = 0.5,
              what a Qwen2-MoE shared_expert_gate of zeros gives)
  split       each FFN split into 2 experts of f/2 contiguous neurons (per_source 2, down projections times 2
              as symphony.build.assemble does), top-2 of 2N
  merged      no MoE: one dense FFN = the mean of the source FFNs (a dense merge)

with the router rows from hidden-state centroids (symphony.build.router_init.router_from_centroids, as `symphony build`
does; split experts of one source then share a row), or random rows, and for the MoEs also after a short
router training (`--train-steps` AdamW steps on the routers only, LM loss, identical for both variants). The
backbone (embeddings, attention, norms, lm_head) is the linear average of the sources in every variant.

A second table compares router initialisations on the relatives' whole-FFN MoE (no training): zeros, random,
and hidden-state centroids built three ways (raw; centred then unit norm; unit norm then centred and scaled,
i.e. router_from_centroids), each with the centroids from every source's own model or from the anchor alone.

Two families of sources are measured: "relatives" (symphony.testing.make_family: one shared base, then each
trained on its own domain; like Qwen2.5 and Qwen2.5-Coder) and "strangers" (the same recipe from independent
random initialisations). The MoE layers follow the kernels' contract (symphony_kernels.reference).

    OMP_NUM_THREADS=1 python benchmarks/align_effect.py [--arch qwen2] [--seeds 0 1 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from symphony.build.align import align_sources
from symphony.build.capture import decoder_layers
from symphony.build.permute import permute_ffn
from symphony.build.router_init import hidden_centroids, router_from_centroids
from symphony.data import token_stream
from symphony.testing import domain_text, make_family, make_tokenizer, tiny_config, train_steps
from symphony_kernels.reference import moe_experts_reference, route_reference

DOMAINS = ("prose", "code", "math")


class ToyMoE(torch.nn.Module):
    """An MoE FFN with the kernels' semantics: softmax top-k routing (renormalised), SwiGLU experts in
    transformers' layout, plus an optional dense shared expert added with weight `shared_weight`."""

    def __init__(self, router, gate_up, down, top_k, shared=None, shared_weight=0.5):
        super().__init__()
        self.router = torch.nn.Parameter(router.clone())
        self.register_buffer("gate_up", gate_up)
        self.register_buffer("down", down)
        self.top_k, self.shared, self.shared_weight = top_k, shared, shared_weight
        self.last_top1 = None  # top-1 expert of every token of the last forward

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, ids = route_reference(flat @ self.router.t(), self.top_k)
        self.last_top1 = ids[:, 0].detach()
        out = moe_experts_reference(flat, self.gate_up, self.down, w.to(flat.dtype), ids)
        if self.shared is not None:
            g, u, d = self.shared
            out = out + self.shared_weight * ((torch.nn.functional.silu(flat @ g.t()) * (flat @ u.t())) @ d.t())
        return out.view_as(x)


def ffns(model):
    return [(l.mlp.gate_proj.weight.detach().clone(), l.mlp.up_proj.weight.detach().clone(),
             l.mlp.down_proj.weight.detach().clone()) for l in decoder_layers(model)]


def averaged_backbone(models):
    """A copy of models[0] whose every parameter is the mean over the models (FFNs are replaced afterwards)."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    return out.eval()


def build(backbone, source_ffns, perms, kind, router_rows=None, top_k=2):
    """The `kind` model (whole / shared / split / merged) from per-source FFNs, each permuted by its perm."""
    model = copy.deepcopy(backbone)
    for l, layer in enumerate(decoder_layers(model)):
        aligned = [permute_ffn(*source_ffns[s][l], perms[s][l]) for s in range(len(source_ffns))]
        mean = tuple(torch.stack(t).mean(0) for t in zip(*aligned))
        if kind == "merged":
            for name, t in zip(("gate_proj", "up_proj", "down_proj"), mean):
                getattr(layer.mlp, name).weight.data.copy_(t)
            continue
        parts = 2 if kind == "split" else 1
        gate_up, down = [], []
        for g, u, d in aligned:
            for c in range(parts):
                sl = slice(c * g.shape[0] // parts, (c + 1) * g.shape[0] // parts)
                gate_up.append(torch.cat([g[sl], u[sl]]))
                down.append(d[:, sl] * parts)  # as symphony.build.assemble: all blocks at weight 1/m = the FFN
        layer.mlp = ToyMoE(router_rows[l], torch.stack(gate_up), torch.stack(down), top_k,
                           shared=mean if kind == "shared" else None)
    return model.eval()


@torch.no_grad()
def losses_and_logits(model, eval_ids):
    """(mean NLL over the domains, logits of every domain's windows concatenated)."""
    nlls, logits = [], []
    for ids in eval_ids:
        out = model(input_ids=ids).logits
        nlls.append(torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())
        logits.append(out.flatten(0, 1))
    return sum(nlls) / len(nlls), torch.cat(logits)


def train_routers(model, train_ids, steps, seed, lr=1e-2):
    params = [m.router for m in model.modules() if isinstance(m, ToyMoE)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, train_ids.numel() - 65, (8,), generator=gen)
        batch = torch.stack([train_ids[s:s + 64] for s in starts.tolist()])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def make_strangers(root, arch, seed, steps, base_steps=20, n_lines=400):
    """make_family's recipe, but every source from its own random initialisation (one shared tokenizer)."""
    from transformers import AutoModelForCausalLM

    texts = {d: domain_text(d, n_lines, seed) for d in DOMAINS}
    mix = [line for d in DOMAINS for line in texts[d]]
    paths = []
    for i, domain in enumerate(DOMAINS):
        tok = make_tokenizer(mix)
        torch.manual_seed(seed + 7919 * (i + 1))
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
        train_steps(model, tok, random.Random(seed).sample(mix, len(mix)), steps=base_steps, seed=seed)
        train_steps(model, tok, texts[domain], steps=steps, seed=seed + 1 + i, lr=1e-3)
        out = Path(root) / f"{arch}-{domain}"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths.append(out)
    return paths


def study(family, paths, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[0])
    calib = token_stream(tok, ["\n".join(domain_text(d, 150, seed=args.seed + 11)) for d in DOMAINS])
    eval_ids = [token_stream(tok, ["\n".join(domain_text(d, 300, seed=args.seed + 23))])[:64 * 24].view(24, 64)
                for d in DOMAINS]
    train_ids = token_stream(tok, ["\n".join(domain_text(d, 300, seed=args.seed + 31)) for d in DOMAINS])
    res = align_sources(paths, 0, calib, seq_len=64, batch_size=16, progress=False)
    print(f"[{family}, seed {args.seed}]")
    print(res.table())
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]
    source_ffns = [ffns(m) for m in models]
    backbone = averaged_backbone(models)
    n_layers, f = res.perms[0].shape
    identity = [torch.arange(f).expand(n_layers, f) for _ in paths]
    texts = [token_stream(tok, domain_text(d, 100, seed=args.seed + 41)) for d in DOMAINS]
    cents, norms = hidden_centroids(paths, texts, seq_len=64, batch_size=16, return_norms=True, progress=False)
    d = cents.shape[-1]
    g = torch.Generator().manual_seed(args.seed)
    rows = {}
    for per_source in (1, 2):
        E = per_source * len(paths)
        rows[("hidden", per_source)] = router_from_centroids(cents, experts_per_source=per_source, norms=norms)
        rand = torch.randn(n_layers, E, d, generator=g)
        rows[("random", per_source)] = rand / rand.norm(dim=2, keepdim=True) * 8.0 / norms.mean(1)[:, None, None]

    own = []
    for m, ids in zip(models, eval_ids):  # each source on its own domain, for scale
        own.append(losses_and_logits(m, [ids])[0])
    out = {"family": family, "seed": args.seed, "corr_before": [s["mean_before"] for s in res.report["sources"][1:]],
           "moved": [sum(x["moved"] for x in s["layers"]) / n_layers for s in res.report["sources"][1:]],
           "corr_after": [s["mean_after"] for s in res.report["sources"][1:]],
           "own_domain_loss": sum(own) / len(own), "rows": []}
    configs = [("whole", "hidden", 0), ("whole", "random", 0), ("whole", "hidden", args.train_steps),
               ("shared", "hidden", 0), ("shared", "hidden", args.train_steps),
               ("split", "hidden", 0), ("split", "random", 0), ("split", "hidden", args.train_steps),
               ("merged", "-", 0)]
    for kind, router, steps in configs:
        if (kind, router, steps) in [(c[0], c[1], c[2]) for c in configs[:configs.index((kind, router, steps))]]:
            continue  # --train-steps 0 repeats the untrained rows
        r = rows.get((router, 2 if kind == "split" else 1))
        variants = {}
        for name, perms in (("unaligned", identity), ("aligned", res.perms)):
            model = build(backbone, source_ffns, perms, kind, r)
            if steps:
                train_routers(model, train_ids, steps, seed=args.seed)
            variants[name] = losses_and_logits(model, eval_ids)
        delta = (variants["aligned"][1] - variants["unaligned"][1]).abs().max().item()
        row = {"config": kind, "router": router, "router_steps": steps, "max_abs_delta_logits": delta,
               "loss_unaligned": variants["unaligned"][0], "loss_aligned": variants["aligned"][0]}
        out["rows"].append(row)
    return out


def router_init_rows(cents, norms, variant):
    """[layers, N, d] router rows of one "hidden" init variant (whole experts, one per source)."""
    L, N, d = cents.shape
    if variant == "raw":          # the centroids themselves
        return cents.clone()
    if variant == "centre,unit":  # centred, then unit norm (symphony.build.router_init.router_weights at the time of writing)
        c = cents - cents.mean(1, keepdim=True)
        return c / c.norm(dim=2, keepdim=True).clamp_min(1e-12)
    if variant == "unit,centre":  # symphony.build.router_init.router_from_centroids (unit, centred, scale 8 / mean norm)
        return router_from_centroids(cents, norms=norms)
    raise ValueError(variant)


def router_init_study(paths, args):
    """Whole-FFN MoEs (top-2 of N, no training) with each router init: held-out loss, and the share of each
    domain's tokens whose top-1 expert is that domain's source (per layer, mean over domains)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[0])
    eval_ids = [token_stream(tok, ["\n".join(domain_text(d, 300, seed=args.seed + 23))])[:64 * 24].view(24, 64)
                for d in DOMAINS]
    texts = [token_stream(tok, domain_text(d, 100, seed=args.seed + 41)) for d in DOMAINS]
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]
    source_ffns = [ffns(m) for m in models]
    backbone = averaged_backbone(models)
    n_layers, f = len(source_ffns[0]), source_ffns[0][0][0].shape[0]
    identity = [torch.arange(f).expand(n_layers, f) for _ in paths]
    d = backbone.config.hidden_size
    g = torch.Generator().manual_seed(args.seed)
    rows = {"zeros": torch.zeros(n_layers, len(paths), d),
            "random": torch.randn(n_layers, len(paths), d, generator=g) * 0.02}
    for runner in (None, 0):
        cents, norms = hidden_centroids(paths, texts, seq_len=64, batch_size=16, runner=runner,
                                        return_norms=True, progress=False)
        for variant in ("raw", "centre,unit", "unit,centre"):
            rows[f"hidden {variant}" + (", anchor runs" if runner == 0 else "")] = router_init_rows(cents, norms,
                                                                                                 variant)
    out = []
    for name, r in rows.items():
        model = build(backbone, source_ffns, identity, "whole", r)
        moes = [m for m in model.modules() if isinstance(m, ToyMoE)]
        hits, total, nlls = torch.zeros(n_layers), 0, []
        with torch.no_grad():
            for s, ids in enumerate(eval_ids):
                logits = model(input_ids=ids).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                nlls.append(nll.item())
                hits += torch.tensor([(m.last_top1 == s).float().mean().item() for m in moes])
        out.append({"router_init": name, "loss": sum(nlls) / len(nlls),
                    "own_source_top1": (hits / len(eval_ids)).tolist()})
    return out


def summarise(results):
    """Rows aggregated over seeds: max |delta logits| (the largest seen), mean losses, delta loss mean/min/max."""
    groups = {}
    for res in results:
        for r in res["rows"]:
            groups.setdefault((res["family"], r["config"], r["router"], r["router_steps"]), []).append(r)
    out = []
    for (family, config, router, steps), rows in groups.items():
        d = [r["loss_aligned"] - r["loss_unaligned"] for r in rows]
        out.append({"family": family, "config": config, "router": router, "router_steps": steps, "seeds": len(rows),
                    "max_abs_delta_logits": max(r["max_abs_delta_logits"] for r in rows),
                    "loss_unaligned": sum(r["loss_unaligned"] for r in rows) / len(rows),
                    "loss_aligned": sum(r["loss_aligned"] for r in rows) / len(rows),
                    "dloss_mean": sum(d) / len(d), "dloss_min": min(d), "dloss_max": max(d)})
    return out


def print_table(results):
    summary = summarise(results)
    seeds = summary[0]["seeds"]
    print(f"\nAligned minus unaligned, {seeds} seed(s): max |delta logit| over held-out tokens, mean held-out loss "
          "(nats/token), delta loss mean [min, max]")
    print(f"{'family':<10} {'config':<7} {'router':<7} {'steps':>5} {'max|dlogit|':>12} {'loss unal.':>10} "
          f"{'loss al.':>9} {'dloss':>8}  {'[min, max]':<18}")
    for r in summary:
        print(f"{r['family']:<10} {r['config']:<7} {r['router']:<7} {r['router_steps']:>5} "
              f"{r['max_abs_delta_logits']:>12.2e} {r['loss_unaligned']:>10.4f} {r['loss_aligned']:>9.4f} "
              f"{r['dloss_mean']:>+8.4f}  [{r['dloss_min']:+.4f}, {r['dloss_max']:+.4f}]")
    for family in dict.fromkeys(r["family"] for r in results):
        fam = [r for r in results if r["family"] == family]
        mean = lambda key: sum(sum(r[key]) / len(r[key]) for r in fam) / len(fam)  # noqa: E731
        print(f"{family}: mean matched FFN correlation to the anchor {mean('corr_before'):.3f} before, "
              f"{mean('corr_after'):.3f} after alignment, {100 * mean('moved'):.0f}% of neurons moved; "
              f"sources on their own domain: loss {sum(r['own_domain_loss'] for r in fam) / len(fam):.4f}")
    return summary


def print_router_inits(inits):
    """Router-init rows averaged over seeds (relatives family, whole experts, no training)."""
    names = [r["router_init"] for r in inits[0]]
    out = []
    for k, name in enumerate(names):
        runs = [seed_rows[k] for seed_rows in inits]
        layers = len(runs[0]["own_source_top1"])
        out.append({"router_init": name, "loss": sum(r["loss"] for r in runs) / len(runs),
                    "own_source_top1": [sum(r["own_source_top1"][l] for r in runs) / len(runs) for l in range(layers)]})
    print(f"\nRouter init, relatives, whole experts top-2, no training, {len(inits)} seed(s): held-out loss and the "
          "share of each domain's tokens whose top-1 expert is its own source (per layer)")
    print(f"{'router init':<32} {'loss':>7}  own-source top-1 per layer")
    for r in out:
        print(f"{r['router_init']:<32} {r['loss']:>7.4f}  " + "  ".join(f"{x:.2f}" for x in r["own_source_top1"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="qwen2", choices=("qwen2", "qwen3", "llama", "mistral"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60, help="training steps of each source on its domain")
    p.add_argument("--train-steps", type=int, default=40, help="router training steps (0: skip those rows)")
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    start = time.perf_counter()
    results, inits = [], []
    for seed in args.seeds:
        args.seed = seed
        with tempfile.TemporaryDirectory() as tmp:
            relatives = make_family(Path(tmp) / "relatives", arch=args.arch, domains=DOMAINS, seed=seed,
                                    steps=args.steps)
            results.append(study("relatives", relatives, args))
            inits.append(router_init_study(relatives, args))
            strangers = make_strangers(Path(tmp) / "strangers", args.arch, seed, args.steps)
            results.append(study("strangers", strangers, args))
    summary = print_table(results)
    init_summary = print_router_inits(inits)
    print(f"({time.perf_counter() - start:.0f} s, torch {torch.__version__}, arch {args.arch}, seeds {args.seeds})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "router_init": init_summary, "runs": results,
                                               "router_init_runs": inits}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
