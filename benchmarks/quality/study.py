"""The quality study end to end: family, contenders, evaluation, results.

    run_study(data_dir, out_dir, stage="all"|"family"|"contenders", preset="gpu"|"toy", ...)

Folder `out_dir` after a run:
    family/            base/ and one specialist per training domain (transformers checkpoints), family.json
                       (recipe, tokens/s, validation losses), drift.json (parameter distances, neuron correlation)
    text/              calibration text per domain (default and small) for the pipeline configs
    work/              models being built and evaluated (deleted after evaluation unless keep_models)
    results.json       everything measured, written again after each contender (a run cut short keeps its part)
    results.md         draft report: table, verdicts on the goals, alignment where it can and cannot matter
    results.png        plot of mean in-domain and OOD loss per contender

The contenders stage trains the family first when `out_dir`/family has none, with the same recipe and seed
(bit-identical on a CPU; on a GPU up to the non-determinism of its kernels).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from benchmarks.quality import contenders as qc
from benchmarks.quality import data as qdata
from benchmarks.quality import drift as qdrift
from benchmarks.quality import merges as qmerges
from benchmarks.quality import metrics as qmetrics
from benchmarks.quality.family import FamilyConfig, data_fingerprint, from_preset, make_family, read_family

STAGES = ("family", "contenders", "all")


@dataclass
class StudySettings:
    """Evaluation, calibration and stage 2 settings shared by every contender."""

    eval_seq_len: int = 512
    eval_batch_size: int = 32
    test_bytes: int = 250_000        # per domain (the whole test split at the gpu preset)
    val_bytes: int = 100_000         # per training domain, for choosing merge scales
    em_problems: int = 500           # held-out arithmetic problems for exact match
    calib_bytes: int = 300_000       # per domain, calibration text (alignment + hidden router init)
    calib_small_fraction: float = 1 / 16
    align_tokens: int = 131072       # alignment.max_tokens
    align_seq_len: int = 512
    align_batch_size: int = 16
    router_steps: int = 100          # stage 2: the same budget for every contender that trains
    router_batch_size: int = 16
    router_seq_len: int = 512
    router_lr: float = 1e-3
    full_lr: float = 1e-4            # full post-training learning rate
    aux_loss_coef: float = 0.01
    router_text_bytes: int = 400_000  # per training domain
    seeds: int = 3
    anchor: str | None = None        # default: the first training domain
    task_arith_scales: tuple = (0.3, 0.5, 0.7, 1.0)
    ties_scales: tuple = (0.5, 0.8, 1.0, 1.3)
    ties_density: float = 0.2
    drift_tokens: int = 65536

    PRESETS = {
        "gpu": {},
        "toy": dict(eval_seq_len=64, eval_batch_size=16, test_bytes=12_000, val_bytes=6_000, em_problems=40,
                    calib_bytes=16_000, align_tokens=4096, align_seq_len=64, align_batch_size=8, router_steps=6,
                    router_batch_size=4, router_seq_len=64, router_lr=5e-3, full_lr=1e-3, router_text_bytes=16_000,
                    seeds=2, task_arith_scales=(0.5, 1.0), ties_scales=(0.5, 1.0), drift_tokens=4096),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "StudySettings":
        return from_preset(cls, "study", name, overrides)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                               or not math.isfinite(v) or v <= 0):
                raise ValueError(f"study.{f.name} must be a positive number, not {v!r}")
            if f.type == "int" and not isinstance(v, int):
                raise ValueError(f"study.{f.name} must be an integer, not {v!r}")
        if not 0 < self.calib_small_fraction <= 1:
            raise ValueError("study.calib_small_fraction must be in (0, 1]")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _write_json(path: Path, obj):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Study:
    """One run's folders, data, settings and helpers: making, building, training and evaluating contenders."""

    def __init__(self, data_dir, out_dir, *, family_cfg: FamilyConfig, settings: StudySettings, device,
                 progress: bool = True, keep_models: bool = False):
        from symphony.data import resolve_device

        self.data_dir, self.out = Path(data_dir), Path(out_dir)
        self.manifest = qdata.read_manifest(self.data_dir)
        self.train_domains = qdata.domains_with_role(self.manifest, "train")
        self.ood_domains = qdata.domains_with_role(self.manifest, "ood")
        if len(self.train_domains) < 2:
            raise qdata.DataError(f"{data_dir} has {len(self.train_domains)} training domains; the study needs >= 2")
        self.family_cfg, self.settings = family_cfg, settings
        self.anchor = settings.anchor or self.train_domains[0]
        if self.anchor not in self.train_domains:
            raise ValueError(f"anchor {self.anchor!r} is not a training domain ({', '.join(self.train_domains)})")
        self.device = resolve_device(device)
        self.progress, self.keep_models = progress, keep_models
        self.family_dir, self.text_dir, self.work = self.out / "family", self.out / "text", self.out / "work"
        self.results_path = self.out / "results.json"

    # ------------------------------------------------------------------------------------------- family
    def log(self, msg: str):
        if self.progress:
            print(msg, flush=True)

    def family(self, retrain: bool = False) -> dict:
        """The family in `out`/family (trained unless one of the same recipe is there) and its drift report:
        {"summary": family.json, "drift": drift.json, "fingerprint"}."""
        summary = None if retrain else read_family(self.family_dir)
        if summary is not None and (summary.get("config") != self.family_cfg.to_dict()
                                    or summary.get("data") != data_fingerprint(self.manifest)):
            self.log("family: the existing family was made with another recipe or other data; training it again")
            summary = None
        if summary is None:
            if self.family_dir.exists():
                shutil.rmtree(self.family_dir)
            self.log(f"family: training in {self.family_dir}")
            summary = make_family(self.data_dir, self.family_dir, self.family_cfg, device=self.device,
                                  progress=self.progress)
        else:
            self.log(f"family: using {self.family_dir}")
        self.fingerprint = family_fingerprint(self.family_dir)
        drift_path = self.family_dir / "drift.json"
        drift = json.loads(drift_path.read_text()) if drift_path.is_file() and not retrain else None
        if drift is None or drift.get("anchor") != self.anchor:
            drift = self.drift()
            _write_json(drift_path, drift)
        return {"summary": summary, "drift": drift, "fingerprint": self.fingerprint}

    def drift(self) -> dict:
        t = time.perf_counter()
        specs = {d: self.family_dir / d for d in self.train_domains}
        out = {"anchor": self.anchor, "parameters": qdrift.parameter_drift(self.family_dir / "base", specs)}
        docs = [doc for d in self.train_domains for doc in qdata.load_split(self.data_dir, d, "val",
                                                                             max_bytes=self.settings.val_bytes)]
        others = {d: p for d, p in specs.items() if d != self.anchor}
        out["neurons"] = qdrift.neuron_correlation(specs[self.anchor], others, docs,
                                                   seq_len=self.settings.align_seq_len,
                                                   max_tokens=self.settings.drift_tokens, device=self.device)
        out["seconds"] = time.perf_counter() - t
        for name, n in out["neurons"].items():
            self.log(f"drift: {name} vs anchor {self.anchor}: neuron correlation {n['mean_before']:.3f} in place, "
                     f"{n['mean_after']:.3f} matched, {100 * n['mean_moved']:.1f}% of neurons moved; "
                     f"distance to base {out['parameters']['to_base'][name]['all']:.3f}")
        return out

    # -------------------------------------------------------------------------------------------- texts
    def prepare_texts(self) -> dict:
        """Calibration files per domain (default and small) and the router-training documents."""
        s = self.settings
        self.text_dir.mkdir(parents=True, exist_ok=True)
        files = {"default": {}, "small": {}}
        for d in self.train_domains:
            docs = qdata.load_split(self.data_dir, d, "train", max_bytes=s.calib_bytes)
            small = qdata.load_split(self.data_dir, d, "train", max_bytes=int(s.calib_bytes * s.calib_small_fraction))
            for kind, items in (("default", docs), ("small", small)):
                path = self.text_dir / f"{d}.{kind}.txt"
                path.write_text("\n\n".join(items) + "\n", encoding="utf-8")
                files[kind][d] = path.resolve()
        self.calib_files = files
        self.router_docs = [doc for d in self.train_domains
                            for doc in qdata.load_split(self.data_dir, d, "train", max_bytes=s.router_text_bytes)]
        self.test_docs = {d: qdata.load_split(self.data_dir, d, "test", max_bytes=s.test_bytes)
                          for d in self.train_domains + self.ood_domains}
        self.val_docs = {d: qdata.load_split(self.data_dir, d, "val", max_bytes=s.val_bytes)
                         for d in self.train_domains}
        self.problems = []
        if "math" in self.train_domains:
            self.problems = [p for p in qdata.load_split(self.data_dir, "math", "test")
                             if p.startswith("Problem: ")][:s.em_problems]
        return files

    # ------------------------------------------------------------------------------------------ evaluate
    def evaluate_dir(self, model_dir: Path) -> dict:
        from symphony.data import load_model, load_tokenizer

        report = model_dir / "alignment_report.json"
        expert_sources = json.loads(report.read_text()).get("expert_sources") if report.is_file() else None
        model = load_model(model_dir, device=self.device, dtype="auto")
        try:
            result = qmetrics.evaluate(model, load_tokenizer(model_dir), self.test_docs,
                                       seq_len=self.settings.eval_seq_len, batch_size=self.settings.eval_batch_size,
                                       problems=self.problems or None, expert_sources=expert_sources)
        finally:
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        result["params"] = _param_counts(model_dir)
        return result

    def _val_loss(self, state: dict) -> float:
        """Mean validation loss over the training domains of the base architecture holding `state`."""
        from symphony.data import load_model, load_tokenizer

        base = self.family_dir / "base"
        model = load_model(base, device=self.device, dtype="auto")
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(state[name].to(p.dtype))
        tok = load_tokenizer(base)
        losses = [qmetrics.domain_loss(model, tok, docs, seq_len=self.settings.eval_seq_len,
                                       batch_size=self.settings.eval_batch_size)["nll"]
                  for docs in self.val_docs.values()]
        del model
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------------------------------- contenders
    def make_merge(self, c: qc.Contender, out_dir: Path) -> dict:
        s = self.settings
        base = qmerges.load_state(self.family_dir / "base", self.device)
        states = [qmerges.load_state(self.family_dir / d, self.device) for d in self.train_domains]
        info = {}
        if c.merge == "linear":
            merged = qmerges.linear(states)
        elif c.merge == "linear_aligned":
            from symphony.build.align import align_sources
            from symphony.data import load_tokenizer, token_stream

            docs = [p.read_text(encoding="utf-8") for p in self.calib_files["default"].values()]
            ids = token_stream(load_tokenizer(self.family_dir / self.anchor), docs)
            srcs = [self.family_dir / d for d in self.train_domains]
            res = align_sources(srcs, self.train_domains.index(self.anchor), ids, device=self.device,
                                seq_len=s.align_seq_len, batch_size=s.align_batch_size, max_tokens=s.align_tokens,
                                progress=False)
            states = [qmerges.permute_to_anchor(st, res.perms[i].to(self.device)) for i, st in enumerate(states)]
            merged = qmerges.linear(states)
            info["moved"] = {e["name"]: sum(l["moved"] for l in e["layers"]) / len(e["layers"])
                             for e in res.report["sources"]}
        else:
            if c.merge == "task_arithmetic":
                scales, direction = s.task_arith_scales, qmerges.task_vector_sum(base, states)
            else:
                scales, direction = s.ties_scales, qmerges.ties_direction(base, states, density=s.ties_density)
            tried = {lam: self._val_loss(qmerges.apply_direction(base, direction, lam)) for lam in scales}
            best = min(tried, key=tried.get)
            info = {"scale": best, "val_loss_by_scale": {str(k): v for k, v in tried.items()}}
            merged = qmerges.apply_direction(base, direction, best)
            self.log(f"  {c.name}: scale {best} (validation loss "
                     + ", ".join(f"{k}: {v:.4f}" for k, v in tried.items()) + ")")
        qmerges.save_like(self.family_dir / "base", merged, out_dir)
        return info

    def build_moe(self, c: qc.Contender, out_dir: Path) -> dict:
        from symphony.build.pipeline import build

        s = self.settings
        cfg = qc.moe_config(c, family_dir=self.family_dir.resolve(), domains=self.train_domains, anchor=self.anchor,
                            calib_files=self.calib_files[c.calibration], align_tokens=s.align_tokens,
                            seq_len=s.align_seq_len, batch_size=s.align_batch_size, device=str(self.device))
        summary = build(cfg, out_dir, force=True, progress=False)
        report = json.loads((out_dir / "alignment_report.json").read_text())
        return {"config": cfg, "alignment": report.get("alignment"), "timings_s": summary.get("timings_s"),
                "expert_sources": summary.get("expert_sources")}

    def train_stage2(self, c: qc.Contender, stage1: Path, seed: int, out_dir: Path) -> dict:
        from symphony.train import RouterTrainingConfig, train_router

        s = self.settings
        cfg = RouterTrainingConfig(steps=s.router_steps, lr=s.full_lr if c.train == "full" else s.router_lr,
                                   batch_size=s.router_batch_size, seq_len=s.router_seq_len,
                                   aux_loss_coef=s.aux_loss_coef, train=c.train, seed=seed,
                                   device=str(self.device), log_every=s.router_steps)
        summary = train_router(stage1, self.router_docs, cfg, out_dir)
        return {k: summary[k] for k in ("steps", "first_loss", "last_loss", "tokens", "trainable_params")}

    def run_contender(self, c: qc.Contender, deadline: float | None) -> dict:
        t0 = time.perf_counter()
        entry = {"group": c.group, "kind": c.kind, "about": c.about, "train": c.train,
                 "alignment_can_matter": c.alignment_can_matter, "family": self.fingerprint, "runs": []}
        self.work.mkdir(parents=True, exist_ok=True)
        folder = self.work / c.name
        try:
            if c.kind == "checkpoint":
                entry["runs"].append({"seed": None, **self.evaluate_dir(self.family_dir / c.member)})
            elif c.kind == "merge":
                entry["merge"] = self.make_merge(c, folder)
                entry["runs"].append({"seed": None, **self.evaluate_dir(folder)})
            else:
                entry["build"] = self.build_moe(c, folder)
                if c.train is None:
                    entry["runs"].append({"seed": None, **self.evaluate_dir(folder)})
                else:
                    for seed in range(self.settings.seeds):
                        if deadline is not None and time.perf_counter() > deadline and entry["runs"]:
                            entry["note"] = f"time budget reached after {len(entry['runs'])} seed(s)"
                            break
                        trained = self.work / f"{c.name}-seed{seed}"
                        stage2 = self.train_stage2(c, folder, seed, trained)
                        entry["runs"].append({"seed": seed, "stage2": stage2, **self.evaluate_dir(trained)})
                        if not self.keep_models:
                            shutil.rmtree(trained, ignore_errors=True)
        finally:
            if not self.keep_models and c.kind != "checkpoint":
                shutil.rmtree(folder, ignore_errors=True)
        entry["summary"] = summarise(entry["runs"], self.train_domains, self.ood_domains)
        entry["seconds"] = time.perf_counter() - t0
        return entry


def family_fingerprint(family_dir: Path) -> str:
    """A short hash of the family's weights: rows made on another family (e.g. a re-trained one) are flagged."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(family_dir).glob("*/*.safetensors")):
        h.update(path.parent.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:12]


def _param_counts(model_dir: Path) -> dict:
    from symphony.evaluate import config_summary

    s = config_summary(model_dir)
    return {"total": s["params"], "active": s["active_params"]}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summarise(runs: list[dict], train_domains: list[str], ood_domains: list[str]) -> dict:
    """Mean and sample standard deviation over the runs (seeds) of every loss, the in-domain and OOD means,
    and the exact match."""
    if not runs:
        return {}
    out = {"seeds": len(runs), "loss": {}, "loss_std": {}}
    for d in train_domains + ood_domains:
        out["loss"][d], out["loss_std"][d] = _mean_std([r["loss"][d] for r in runs])
    for key, ds in (("in_domain", train_domains), ("ood", ood_domains)):
        if ds:
            out[key], out[key + "_std"] = _mean_std([sum(r["loss"][d] for d in ds) / len(ds) for r in runs])
    if runs[0].get("math_em"):
        out["math_em"], out["math_em_std"] = _mean_std([r["math_em"]["em"] for r in runs])
    if runs[0].get("params"):
        out["params"] = runs[0]["params"]
    if runs[0].get("routing"):
        out["routing"] = {d: {k: v for k, v in runs[0]["routing"][d].items() if k != "load"}
                          for d in runs[0]["routing"]}
    return out


def _complete(entry: dict | None, c: qc.Contender, seeds: int) -> bool:
    if not entry or entry.get("skipped") or not entry.get("runs"):
        return False
    return len(entry["runs"]) >= (seeds if c.kind == "moe" and c.train else 1)


def validate(st: Study, chosen: list[qc.Contender]):
    """Check every chosen MoE contender's pipeline config and the stage 2 settings before any heavy work."""
    from symphony.build.config import parse_config
    from symphony.train import RouterTrainingConfig

    s = st.settings
    for mode, lr in (("router", s.router_lr), ("full", s.full_lr)):
        RouterTrainingConfig(steps=s.router_steps, lr=lr, batch_size=s.router_batch_size, seq_len=s.router_seq_len,
                             aux_loss_coef=s.aux_loss_coef, train=mode)
    for c in chosen:
        if c.kind != "moe":
            continue
        files = {d: (st.text_dir / f"{d}.{c.calibration}.txt").resolve() for d in st.train_domains}
        cfg = qc.moe_config(c, family_dir=st.family_dir.resolve(), domains=st.train_domains, anchor=st.anchor,
                            calib_files=files, align_tokens=s.align_tokens, seq_len=s.align_seq_len,
                            batch_size=s.align_batch_size, device=str(st.device))
        try:
            parse_config(cfg)
        except Exception as e:
            raise ValueError(f"contender {c.name}: bad pipeline config: {e}") from e


def select(train_domains: list[str], only=None, smoke: bool = False) -> list[qc.Contender]:
    """The contenders to run, in order: `only` (names), else the smoke set, else all."""
    everything = qc.contenders(train_domains)
    if only:
        known = {c.name for c in everything}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown contender {unknown[0]!r}; known: {', '.join(c.name for c in everything)}")
        return [c for c in everything if c.name in only]
    return qc.smoke_set(everything) if smoke else everything


def run_study(data_dir, out_dir, *, stage: str = "all", preset: str = "gpu", family_overrides=None,
              study_overrides=None, only=None, all_contenders: bool = False, previous=None,
              missing_only: bool = False, budget_s: float | None = None, device="auto", progress: bool = True,
              keep_models: bool = False, retrain: bool = False) -> dict:
    """Run the stage(s) of the study into `out_dir` and return the results (see the module docstring).

    Contenders: `only` (names), else all of them (the toy preset: the smoke set unless `all_contenders`).
    previous: a results.json (default: `out_dir`/results.json when stage is "contenders") whose contenders are
    kept unless run again; with `missing_only`, only the chosen contenders that it lacks, skipped or ran with
    fewer seeds than asked are run. budget_s: no new contender or seed starts after that many seconds; the contenders
    not started are recorded as skipped. A contender that raises is recorded with its error (the traceback goes
    to stderr) and the run goes on; `results["failed"]` lists them."""
    from benchmarks.quality import report as qreport

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    start = time.perf_counter()
    deadline = start + budget_s if budget_s else None
    family_cfg = FamilyConfig.preset(preset, **(family_overrides or {}))
    settings = StudySettings.preset(preset, **(study_overrides or {}))
    out = Path(out_dir)
    st = Study(data_dir, out, family_cfg=family_cfg, settings=settings, device=device, progress=progress,
               keep_models=keep_models)
    chosen = select(st.train_domains, only, smoke=preset == "toy" and not all_contenders)
    validate(st, chosen)
    if previous is None and stage == "contenders" and st.results_path.is_file():
        previous = st.results_path
    kept = {}
    if previous is not None:
        old = json.loads(Path(previous).read_text())
        if old.get("preset") != preset:
            raise ValueError(f"{previous} holds results of preset {old.get('preset')!r}, not {preset!r}")
        kept = old.get("contenders", {})
    if missing_only:
        if previous is None:
            raise ValueError("missing_only needs previous results")
        chosen = [c for c in chosen if not _complete(kept.get(c.name), c, settings.seeds)]
    out.mkdir(parents=True, exist_ok=True)

    results = {"preset": preset, "device": str(st.device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(st.device) if st.device.type == "cuda" else None,
               "data": {"train": st.train_domains, "ood": st.ood_domains,
                        "sizes": {d: v["splits"] for d, v in st.manifest["domains"].items()}},
               "anchor": st.anchor, "family_config": family_cfg.to_dict(), "settings": settings.to_dict(),
               "contenders": dict(kept), "timings_s": {}}
    t = time.perf_counter()
    results["family"] = st.family(retrain=retrain)
    results["timings_s"]["family"] = time.perf_counter() - t
    _write_json(st.results_path, results)
    if stage == "family":
        return results

    st.prepare_texts()
    t = time.perf_counter()
    for c in chosen:
        if deadline is not None and time.perf_counter() > deadline:
            results["contenders"][c.name] = {"group": c.group, "kind": c.kind, "about": c.about,
                                             "skipped": "time budget reached", "runs": [], "summary": {}}
            st.log(f"{c.name}: skipped (time budget)")
            continue
        st.log(f"{c.name}: {c.about}")
        try:
            entry = st.run_contender(c, deadline)
        except Exception as e:  # noqa: BLE001 - one broken contender must not cost the others: record, go on
            traceback.print_exc()
            results["contenders"][c.name] = {"group": c.group, "kind": c.kind, "about": c.about, "runs": [],
                                             "summary": {}, "error": f"{type(e).__name__}: {e}"}
            st.log(f"  {c.name}: FAILED ({type(e).__name__}: {e})")
            _write_json(st.results_path, results)
            continue
        results["contenders"][c.name] = entry
        s = entry["summary"]
        st.log(f"  {c.name}: in-domain {s.get('in_domain', float('nan')):.4f}, OOD {s.get('ood', float('nan')):.4f}"
               + (f", math EM {s['math_em']:.3f}" if "math_em" in s else "") + f" ({entry['seconds']:.1f} s)")
        results["timings_s"]["contenders"] = time.perf_counter() - t
        _write_json(st.results_path, results)
    order = [c.name for c in qc.contenders(st.train_domains)]
    results["contenders"] = dict(sorted(results["contenders"].items(),
                                        key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    results["timings_s"]["total"] = time.perf_counter() - start
    results["failed"] = [n for n, e in results["contenders"].items() if e.get("error")]
    results["verdicts"] = qreport.verdicts(results)
    _write_json(st.results_path, results)
    qreport.write_markdown(results, out / "results.md")
    qreport.plot(results, out / "results.png")
    if not keep_models and st.work.exists() and not any(st.work.iterdir()):
        st.work.rmdir()
    return results
