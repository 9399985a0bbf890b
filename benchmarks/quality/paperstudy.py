"""The paper-protocol study (issue 13): the paper family, its drift and inter-expert similarity, and the
contenders of papercontenders.py, each trained and evaluated seed by seed.

    PaperStudy(data_dir, out_dir, family_cfg=..., settings=..., device=...).run(contender, deadline)

Settings shared by every contender (`PaperSettings`): evaluation (test loss per domain in windows of the
family's context, greedy exact match on held-out math problems, routing per source), calibration text per source
(the first `calib_bytes` of its domain's train split; `align_tokens` of it for alignment), and the post-training
budget: `stage2_steps` steps of `stage2_batch_size` windows of the family's context over the first
`stage2_bytes` of every training domain's train split (equal bytes per domain), the recipe of `preset: paper`.
Out folder: family/ (unless given elsewhere), text/ (calibration files), work/ (models being made; removed after
evaluation).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from transformers import AutoConfig

from benchmarks.quality import data as qdata
from benchmarks.quality import drift as qdrift
from benchmarks.quality import merges as qmerges
from benchmarks.quality import metrics as qmetrics
from benchmarks.quality import paperdata
from benchmarks.quality import papercontenders as pc
from benchmarks.quality.bam import BamModel
from benchmarks.quality.family import from_preset
from benchmarks.quality.paperfamily import PaperFamilyConfig, make_paper_family, read_paper_family
from benchmarks.quality.posttrain import train_model
from benchmarks.quality.study import _param_counts, summarise
from symphony.data import load_model, load_tokenizer, token_stream, windows
from symphony.train import train_router


@dataclass
class PaperSettings:
    test_bytes: int = 300_000        # per domain
    val_bytes: int = 100_000         # per training domain (choosing the best dense merge)
    em_problems: int = 500
    eval_batch_size: int = 8
    calib_bytes: int = 1_000_000     # per source
    align_tokens: int = 262_144
    align_batch_size: int = 8
    stage2_steps: int = 306          # x 16 windows x 2048 tokens = 10.03M tokens
    stage2_batch_size: int = 16
    stage2_bytes: int = 6_000_000    # per training domain
    stage2_lr: float = 5e-5          # preset: paper's constant learning rate (a study of another size may vary it)
    seeds: int = 3
    drop_ratio: float = 0.5
    cka_tokens: int = 32_768

    PRESETS = {
        "gpu": {},
        # stage 2: 128 steps x 16 windows x 256 tokens = 0.52M tokens per run
        "cpu": dict(test_bytes=100_000, val_bytes=50_000, em_problems=200, eval_batch_size=16, calib_bytes=300_000,
                    align_tokens=65_536, align_batch_size=16, stage2_steps=128, stage2_batch_size=16,
                    stage2_bytes=2_000_000, cka_tokens=16_384),
        "toy": dict(test_bytes=10_000, val_bytes=5_000, em_problems=40, eval_batch_size=8, calib_bytes=20_000,
                    align_tokens=4096, align_batch_size=8, stage2_steps=6, stage2_batch_size=4, stage2_bytes=20_000,
                    seeds=2, cka_tokens=2048),
        "micro": dict(test_bytes=3_000, val_bytes=2_000, em_problems=10, eval_batch_size=8, calib_bytes=6_000,
                      align_tokens=1024, align_batch_size=8, stage2_steps=2, stage2_batch_size=2, stage2_bytes=6_000,
                      seeds=2, cka_tokens=512),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "PaperSettings":
        return from_preset(cls, "paper study", name, overrides)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (f.type == "int" and v != int(v)):
                raise ValueError(f"paper study setting {f.name} must be a non-negative number, not {v!r}")
        if not 0 <= self.drop_ratio <= 1:
            raise ValueError("drop_ratio must be in [0, 1]")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _as_saved(model, device: torch.device):
    """A trained in-memory model rounded to bfloat16 as a saved checkpoint is, and put in the dtype that the
    study evaluates checkpoints in (bfloat16 on CUDA, float32 elsewhere)."""
    model.to(torch.bfloat16)
    return model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


class PaperStudy:
    def __init__(self, data_dir, out_dir, *, family_cfg: PaperFamilyConfig, settings: PaperSettings, device,
                 family_dir=None, progress: bool = True):
        from symphony.data import resolve_device

        self.data_dir, self.out = Path(data_dir), Path(out_dir)
        self.manifest = qdata.read_manifest(self.data_dir)
        self.roles = paperdata.roles(self.manifest)
        self.domains = list(self.roles.values())
        self.anchor = self.roles["general"]
        self.ood = qdata.domains_with_role(self.manifest, "ood")
        self.family_cfg, self.settings, self.progress = family_cfg, settings, progress
        self.device = resolve_device(device)
        self.family_dir = Path(family_dir) if family_dir else self.out / "family"
        self.work, self.text_dir = self.out / "work", self.out / "text"
        self._merge_val = {}

    def log(self, msg):
        if self.progress:
            print(msg, flush=True)

    # --------------------------------------------------------------------------------------------- family
    def family(self) -> dict:
        summary = read_paper_family(self.family_dir, self.family_cfg, self.manifest)
        if summary is None:
            if self.family_dir.exists():
                shutil.rmtree(self.family_dir)
            self.log(f"family: training into {self.family_dir}")
            summary = make_paper_family(self.data_dir, self.family_dir, self.family_cfg, device=self.device,
                                        progress=self.progress)
            summary["reused"] = False
        else:
            self.log(f"family: reusing {self.family_dir} (weights {summary['weights']})")
            summary["reused"] = True
        return summary

    def drift(self) -> dict:
        """Parameter distance of every source to base A and to its own base; FFN neuron correlation to the anchor
        before and after matching, and the share of neurons the matching moves."""
        t = time.perf_counter()
        f = self.family_dir
        sources = {d: f / d for d in self.domains}
        own = {self.roles["general"]: "base_a", self.roles["math"]: "base_a", self.roles["code"]: "coder",
               self.roles["fourth"]: "base_b"}
        out = {"anchor": self.anchor, "to_base_a": qdrift.parameter_drift(f / "base_a", sources),
               "to_own_base": {d: qdrift.parameter_drift(f / b, {d: f / d})["to_base"][d] for d, b in own.items()},
               "bases": qdrift.parameter_drift(f / "base_a", {"base_b": f / "base_b", "coder": f / "coder"})}
        docs = [doc for d in self.domains for doc in qdata.load_split(self.data_dir, d, "val",
                                                                      max_bytes=self.settings.val_bytes)]
        out["neurons"] = qdrift.neuron_correlation(sources[self.anchor], {d: p for d, p in sources.items()
                                                                          if d != self.anchor}, docs,
                                                   seq_len=self.family_cfg.seq_len,
                                                   max_tokens=self.settings.align_tokens, device=self.device)
        out["seconds"] = time.perf_counter() - t
        for name, n in out["neurons"].items():
            self.log(f"drift: {name} vs anchor: neuron correlation {n['mean_before']:.3f} in place, "
                     f"{n['mean_after']:.3f} matched, {100 * n['mean_moved']:.1f}% of neurons moved")
        return out

    # ---------------------------------------------------------------------------------------------- texts
    def prepare_texts(self):
        s = self.settings
        self.text_dir.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.calib_files = {}
        for d in self.domains:
            path = self.text_dir / f"{d}.txt"
            path.write_text("\n\n".join(qdata.load_split(self.data_dir, d, "train", max_bytes=s.calib_bytes)) + "\n",
                            encoding="utf-8")
            self.calib_files[d] = path.resolve()
        self.stage2_docs = [doc for d in self.domains
                            for doc in qdata.load_split(self.data_dir, d, "train", max_bytes=s.stage2_bytes)]
        self.test_docs = {d: qdata.load_split(self.data_dir, d, "test", max_bytes=s.test_bytes)
                          for d in self.domains + self.ood}
        self.val_docs = {d: qdata.load_split(self.data_dir, d, "val", max_bytes=s.val_bytes) for d in self.domains}
        self.problems = [p for p in qdata.load_split(self.data_dir, self.roles["math"], "test")
                         if p.startswith("Problem: ")][:s.em_problems]

    def pipeline_config(self, c: pc.PaperContender, seed: int) -> dict:
        s = self.settings
        return pc.moe_config(c, family_dir=self.family_dir.resolve(), roles=self.roles, calib_files=self.calib_files,
                             align_tokens=s.align_tokens, seq_len=self.family_cfg.seq_len,
                             batch_size=s.align_batch_size, device=str(self.device), seed=seed)

    def recipe(self, c: pc.PaperContender, seed: int):
        """The stage-2 RouterTrainingConfig: the contender's pipeline config (symphony's for the others) parsed
        with the study's budget; the context is the family's."""
        from symphony.build.config import parse_config

        moe = c if c.kind == "moe" else pc.by_name(self.roles, "symphony")
        cfg = self.pipeline_config(moe, seed)
        s = self.settings
        cfg["router_training"] = {**cfg.get("router_training", {}), "steps": s.stage2_steps,  # keeps `train`
                                  "batch_size": s.stage2_batch_size, "seq_len": self.family_cfg.seq_len,
                                  "log_every": max(1, s.stage2_steps), "lr": s.stage2_lr}
        rt = parse_config(cfg).router_training
        rt.seed = seed
        return rt

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, model, tokenizer, expert_sources=None) -> dict:
        return qmetrics.evaluate(model, tokenizer, self.test_docs, seq_len=self.family_cfg.seq_len,
                                 batch_size=self.settings.eval_batch_size, problems=self.problems or None,
                                 expert_sources=expert_sources)

    def evaluate_dir(self, folder: Path, expert_sources=None) -> dict:
        from symphony.data import load_model, load_tokenizer

        model = load_model(folder, device=self.device, dtype="auto")
        try:
            out = self.evaluate(model, load_tokenizer(folder), expert_sources)
        finally:
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        out["params"] = _param_counts(folder)
        return out

    def mean_val_loss(self, folder: Path) -> float:
        from symphony.data import load_model, load_tokenizer

        model, tok = load_model(folder, device=self.device, dtype="auto"), load_tokenizer(folder)
        losses = [qmetrics.domain_loss(model, tok, docs, seq_len=self.family_cfg.seq_len,
                                       batch_size=self.settings.eval_batch_size)["nll"] for docs in self.val_docs.values()]
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------------------------------------- makers
    def make_merge(self, kind: str, out_dir: Path) -> dict:
        from symphony.build.align import align_sources
        from symphony.data import load_tokenizer, token_stream

        f = self.family_dir
        names = self.domains if kind != "linear-base-a" else [self.roles[r] for r in ("general", "math", "code")]
        states = [qmerges.load_state(f / d, self.device) for d in names]
        info = {"sources": names}
        if kind == "linear-aligned":
            ids = token_stream(load_tokenizer(f / self.anchor),
                               [p.read_text(encoding="utf-8") for p in self.calib_files.values()])
            res = align_sources([f / d for d in names], names.index(self.anchor), ids, device=self.device,
                                seq_len=self.family_cfg.seq_len, batch_size=self.settings.align_batch_size,
                                max_tokens=self.settings.align_tokens, progress=False)
            states = [qmerges.permute_to_anchor(st, res.perms[i].to(self.device)) for i, st in enumerate(states)]
        qmerges.save_like(f / self.anchor, qmerges.linear(states), out_dir)
        info["val_loss"] = self._merge_val[kind] = self.mean_val_loss(out_dir)
        return info

    def best_merge(self, out_dir: Path) -> dict:
        for kind in ("linear", "linear-aligned", "linear-base-a"):
            if kind not in self._merge_val:
                self.make_merge(kind, out_dir)
        best = min(self._merge_val, key=self._merge_val.get)
        self.make_merge(best, out_dir)
        return {"merge": best, "val_loss": dict(self._merge_val)}

    def build_moe(self, c: pc.PaperContender, seed: int, out_dir: Path) -> dict:
        from symphony.build.pipeline import build

        summary = build(self.pipeline_config(c, seed), out_dir, force=True, progress=False)
        info = {"alignment": summary.get("alignment"), "expert_sources": summary.get("expert_sources"),
                "timings_s": summary.get("timings_s")}
        if c.post in ("drop", "plain-embed"):
            state = qmerges.load_state(out_dir)
            if c.post == "drop":
                state = pc.drop_reinit(state, num_layers=self.family_cfg.num_layers, num_experts=len(self.domains),
                                       ratio=self.settings.drop_ratio, seed=seed)
            else:
                state = pc.plain_embeddings(state, [qmerges.load_state(self.family_dir / d) for d in self.domains])
            tmp = out_dir.with_name(out_dir.name + ".post")
            qmerges.save_like(out_dir, state, tmp)
            shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        return info

    def plain_embed_is_selective(self, seed: int) -> dict:
        """Build symphony's stage 1 and check its embedding rows against the index-wise mean of the sources'."""
        folder = self.work / "plain-embed-check"
        self.build_moe(pc.by_name(self.roles, "symphony"), seed, folder)
        built = qmerges.load_state(folder)
        plain = pc.plain_embeddings(built, [qmerges.load_state(self.family_dir / d) for d in self.domains])
        diff = max(float((built[k].float() - plain[k].float()).abs().max()) for k in ("model.embed_tokens.weight",
                                                                                      "lm_head.weight"))
        shutil.rmtree(folder, ignore_errors=True)
        return {"max_abs_diff": diff, "identical": diff == 0.0}

    def cka(self, seed: int = 0) -> dict:
        """cka.expert_similarity of symphony's stage 1 (aligned) and of no-align's (same sources, same seed)."""
        from benchmarks.quality.cka import expert_similarity

        out = {}
        texts = [p.read_text(encoding="utf-8") for p in self.calib_files.values()]
        for name in ("symphony", "no-align"):
            folder = self.work / f"cka-{name}"
            info = self.build_moe(pc.by_name(self.roles, name), seed, folder)
            out[name] = expert_similarity(folder, texts, seq_len=self.family_cfg.seq_len,
                                          max_tokens=self.settings.cka_tokens, device=self.device)
            out[name]["expert_sources"] = info["expert_sources"]
            shutil.rmtree(folder, ignore_errors=True)
        return out

    # ------------------------------------------------------------------------------------------ contenders
    def run(self, c: pc.PaperContender, deadline: float | None = None, done_runs: list | None = None) -> dict:
        """Make, post-train (seed by seed) and evaluate one contender; `done_runs`: runs of an earlier call whose
        seeds are not run again. plain-embed is not trained when its stage 1 is symphony's bit for bit (entry
        "same_as": "symphony")."""
        t0 = time.perf_counter()
        entry = {"group": c.group, "kind": c.kind, "about": c.about, "runs": list(done_runs or [])}
        done = {r.get("seed") for r in entry["runs"]}
        self.work.mkdir(parents=True, exist_ok=True)
        folder = self.work / c.name
        try:
            if c.name == "plain-embed":
                entry["check"] = self.plain_embed_is_selective(0)
            if c.kind == "checkpoint":
                entry["runs"] = [{"seed": None, **self.evaluate_dir(self.family_dir / c.member)}]
            elif c.kind == "merge":
                entry["merge"] = self.make_merge(c.merge, folder)
                entry["runs"] = [{"seed": None, **self.evaluate_dir(folder)}]
            elif entry.get("check", {}).get("identical"):
                entry["same_as"] = "symphony"  # the same model: paper_report.py shows symphony's numbers
            else:
                source = self.family_dir / self.anchor
                if c.member == "best-merge":
                    entry["merge"], source = self.best_merge(folder), folder
                for seed in (x for x in range(self.settings.seeds) if x not in done):
                    if deadline is not None and time.perf_counter() > deadline and entry["runs"]:
                        entry["note"] = f"time budget reached after {len(entry['runs'])} seed(s)"
                        break
                    run = self._train_and_evaluate(c, seed, source, entry)
                    entry["runs"].append({"seed": seed, **run})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        entry["summary"] = summarise(entry["runs"], self.domains, self.ood)
        entry["seconds"] = time.perf_counter() - t0
        return entry

    def _train_and_evaluate(self, c: pc.PaperContender, seed: int, source: Path, entry: dict) -> dict:
        rt = self.recipe(c, seed)
        if c.kind == "moe":
            stage1, trained = self.work / f"{c.name}-stage1", self.work / f"{c.name}-seed{seed}"
            entry.setdefault("build", {})[seed] = info = self.build_moe(c, seed, stage1)
            try:
                stage2 = train_router(stage1, self.stage2_docs, rt, trained, progress=False)
                run = self.evaluate_dir(trained, info["expert_sources"])
            finally:
                shutil.rmtree(stage1, ignore_errors=True)
                shutil.rmtree(trained, ignore_errors=True)
        else:
            tok = load_tokenizer(self.family_dir / self.anchor)
            data, _ = windows(token_stream(tok, self.stage2_docs), rt.seq_len)
            if c.kind == "bam":
                states = [qmerges.load_state(self.family_dir / d) for d in self.domains]
                model = BamModel.from_sources(AutoConfig.from_pretrained(self.family_dir / self.anchor), states,
                                              top_k=2, seed=seed)
                top_k, sources = 2, list(self.domains)
            else:
                model, top_k, sources = load_model(source, device="cpu", dtype="float32"), None, None
            stage2 = train_model(model, data, rt, top_k=top_k)
            total = stage2["trainable_params"]
            active = total - (model.active_saving() if c.kind == "bam" else 0)
            run = self.evaluate(_as_saved(model, self.device), tok, sources)
            run["params"] = {"total": total, "active": active}
            del model
        return {"stage2": {**{k: v for k, v in stage2.items() if k not in ("losses", "expert_load")}, "lr": rt.lr},
                **run}
