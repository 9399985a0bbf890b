"""The `symphony build` configuration: a mergekit-like YAML file, read into validated dataclasses.

Every default lives here, in the dataclass fields below; examples/build.yaml shows them all with comments.
Relative paths are resolved against the folder of the YAML file (against the current folder for a config
given as a dict). A bad key or value is a SymphonyError that names the key and the value.

    preset: default              # default | paper: sets the paper's choices (PRESETS); explicit keys win
    sources:                     # >= 2 dense checkpoints of one architecture (llama, mistral, qwen2, qwen3)
      - name: general            # unique; default: the folder name
        path: ./qwen-general
        calibration: [general.txt]   # this source's domain text (hidden router init; default alignment text)
    anchor: general              # the source the others are aligned to; default: the first
    fusion:
      attention: slerp           # slerp | linear   (Q, K, V, O weights and biases)
      t: null                    # null: equal weights; a number in [0, 1]: the anchor gets 1 - t, the others
                                 #   share t; a list: per layer (one value per layer, or >= 2 values spread
                                 #   evenly over the layers and linearly interpolated)
      embeddings: selective      # selective (shared rows averaged, unique rows kept) | anchor
      norms: linear              # linear (average) | anchor
    alignment:
      enabled: auto              # auto: only where it can change the result; true; false
      calibration: []            # text files; default: every source's calibration files
      max_tokens: 131072
      seq_len: 512
      batch_size: 8
      solver: auto
      layers_per_pass: auto      # auto: the most layers per pass over the calibration text whose correlation
                                 #   state fits a quarter of the free GPU memory (at most 4 GiB on the CPU;
                                 #   symphony.build.correlate.auto_layers_per_pass); N: N layers per pass
    experts:
      sources: null              # names of the sources that give experts; default: all
      per_source: 1              # > 1 splits each aligned FFN into that many experts of f / per_source neurons
      top_k: 2
      shared_expert: none        # none | mean (Qwen2-MoE only: a shared expert = mean of the aligned FFNs)
      router_init: hidden        # hidden (per-source hidden-state centroids) | zeros | random
    router_training:             # stage 2: symphony.train.RouterTrainingConfig's fields, and
      text: []                   #   its text files; default: the alignment calibration text
    output:
      architecture: auto         # auto: qwen2 -> Qwen2MoeForCausalLM, qwen3 -> Qwen3MoeForCausalLM,
                                 #   llama/mistral -> MixtralForCausalLM
      dtype: auto                # auto (the anchor's stored dtype) | bfloat16 | float16 | float32
      max_shard_size: 2GB
      expert_layout: per_expert  # per_expert (what transformers' save_pretrained writes) | fused (stage 2,
                                 #   when it runs, saves through save_pretrained: per_expert)
    device: auto
    seed: 0

`preset: paper` puts symphony.build.presets.PRESETS["paper"], the paper's AAAI protocol (arXiv 2509.18542;
examples/build.yaml lists it), under the file's keys: a key the file gives wins. `preset: default` (or none):
the dataclasses' defaults.

Why not pydantic (what mergekit uses). The hand-written part is `_Reader` (about 60 lines: types, choices,
unknown keys, the key path in every message) plus the section parsers. pydantic would replace the type, choice
and unknown-key checks by declarations (Literal fields, `extra="forbid"`), about 60 lines, but what remains
would not shrink: its errors are multi-line ValidationError reports, and the CLI's rule is one line that
names the key, so an adapter from its error list to our message is needed anyway; paths relative to the YAML
file, size strings ("2GB"), numbers YAML reads as strings ("1e-3") and the cross-field checks (the anchor is a
source, top_k <= the experts, the hidden init needs calibration text) stay custom validators. For a net saving
of a few dozen lines it would add a hard dependency with a compiled core to every install. It does not pay here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from symphony.build.presets import apply_preset
from symphony.errors import SymphonyError

ATTENTION_MODES = ("slerp", "linear")
EMBEDDING_MODES = ("selective", "anchor")
NORM_MODES = ("linear", "anchor")
ALIGN_ENABLED = ("auto", True, False)
SHARED_EXPERT = ("none", "mean")
ROUTER_INIT = ("hidden", "zeros", "random")
OUTPUT_DTYPES = ("auto", "bfloat16", "float16", "float32")
EXPERT_LAYOUTS = ("per_expert", "fused")
ARCHITECTURES = ("auto", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM")
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class SourceSpec:
    name: str
    path: Path
    calibration: list[Path] = field(default_factory=list)


@dataclass
class FusionConfig:
    attention: str = "slerp"
    t: float | list[float] | None = None
    embeddings: str = "selective"
    norms: str = "linear"


@dataclass
class AlignmentConfig:
    enabled: str | bool = "auto"
    calibration: list[Path] = field(default_factory=list)
    max_tokens: int = 131072
    seq_len: int = 512
    batch_size: int = 8
    solver: str = "auto"
    layers_per_pass: str | int = "auto"


@dataclass
class ExpertsConfig:
    sources: list[str] | None = None
    per_source: int = 1
    top_k: int = 2
    shared_expert: str = "none"
    router_init: str = "hidden"


@dataclass
class OutputConfig:
    architecture: str = "auto"
    dtype: str = "auto"
    max_shard_size: int = 2 * 10**9
    expert_layout: str = "per_expert"


@dataclass
class BuildConfig:
    sources: list[SourceSpec]
    anchor: str
    fusion: FusionConfig
    alignment: AlignmentConfig
    experts: ExpertsConfig
    router_training: object  # symphony.train.RouterTrainingConfig
    router_text: list[Path]
    output: OutputConfig
    device: str = "auto"
    seed: int = 0
    preset: str = "default"

    @property
    def anchor_index(self) -> int:
        return [s.name for s in self.sources].index(self.anchor)

    @property
    def expert_sources(self) -> list[str]:
        """Names of the sources that give experts, in source order."""
        names = self.experts.sources
        return [s.name for s in self.sources if names is None or s.name in names]

    def calibration_files(self) -> list[Path]:
        """The alignment calibration files: alignment.calibration, else every source's calibration files."""
        if self.alignment.calibration:
            return list(self.alignment.calibration)
        return list(dict.fromkeys(p for s in self.sources for p in s.calibration))

    def training_files(self) -> list[Path]:
        return list(self.router_text) if self.router_text else self.calibration_files()

    def to_dict(self) -> dict:
        """JSON/YAML-ready form of the resolved config (paths as strings)."""
        def plain(x):
            if dataclasses.is_dataclass(x):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return str(x) if isinstance(x, Path) else x

        out = plain(self)
        out["router_training"]["text"] = out.pop("router_text")
        return out


def parse_size(value, key: str) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "1GiB" (KB/MB/GB are powers of 10)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        for unit in sorted(SIZE_UNITS, key=len, reverse=True):
            if text.endswith(unit):
                try:
                    number = float(text[: -len(unit)])
                except ValueError:
                    break
                if number > 0 and math.isfinite(number):
                    return int(number * SIZE_UNITS[unit])
                break
    raise SymphonyError(f"{key}: {value!r} is not a size (use bytes or a string such as 2GB, 500MB, 1GiB)")


class _Reader:
    """Reads one mapping of the YAML, checking types and refusing unknown keys, with the key path in errors."""

    def __init__(self, data, where: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SymphonyError(f"{where or 'the config'} must be a mapping, not {type(data).__name__}: {data!r}")
        self.data, self.where, self.used = data, where, set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name, default=None):
        self.used.add(name)
        return self.data.get(name, default)

    def has(self, name) -> bool:
        return name in self.data

    def choice(self, name, choices, default):
        value = self.get(name, default)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)) or value not in choices:
            raise SymphonyError(f"{self.key(name)}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value

    def integer(self, name, default, low):
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SymphonyError(f"{self.key(name)}: {value!r} must be an integer >= {low}")
        return value

    def files(self, name, base: Path) -> list[Path]:
        value = self.get(name, [])
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SymphonyError(f"{self.key(name)}: {value!r} must be a file name or a list of file names")
        return [_resolve(v, base) for v in value]

    def done(self):
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            raise SymphonyError(f"unknown key {self.key(str(unknown[0]))!r} (known: {', '.join(sorted(self.used))})")


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _schedule(value, key: str):
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) < 2:
        raise SymphonyError(f"{key}: a per-layer list needs at least 2 values, not {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise SymphonyError(f"{key}: {v!r} must be a number in [0, 1]")
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def _sources(value, base: Path) -> list[SourceSpec]:
    if not isinstance(value, list) or len(value) < 2:
        raise SymphonyError(f"sources: a build needs a list of at least 2 sources, not {value!r}")
    specs = []
    for i, item in enumerate(value):
        where = f"sources[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        r = _Reader(item, where)
        path = r.get("path")
        if not isinstance(path, str) or not path:
            raise SymphonyError(f"{where}.path: {path!r} must be the folder of a checkpoint")
        path = _resolve(path, base)
        name = r.get("name", path.name)
        if not isinstance(name, str) or not name:
            raise SymphonyError(f"{where}.name: {name!r} must be a non-empty string")
        specs.append(SourceSpec(name, path, r.files("calibration", base)))
        r.done()
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SymphonyError(f"sources: the name {dup!r} is used twice (names must be unique)")
    return specs


def parse_config(data: dict, base_dir=None) -> BuildConfig:
    """A BuildConfig from a parsed YAML mapping; relative paths are taken from `base_dir` (default: cwd)."""
    from symphony.train import RouterTrainingConfig

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data, preset = apply_preset(data)
    top = _Reader(data, "")
    sources = _sources(top.get("sources"), base)
    names = [s.name for s in sources]
    anchor = top.get("anchor", names[0])
    if anchor not in names:
        raise SymphonyError(f"anchor: {anchor!r} is not a source name ({', '.join(names)})")

    r = _Reader(top.get("fusion"), "fusion")
    fusion = FusionConfig(attention=r.choice("attention", ATTENTION_MODES, "slerp"),
                          t=_schedule(r.get("t"), "fusion.t"),
                          embeddings=r.choice("embeddings", EMBEDDING_MODES, "selective"),
                          norms=r.choice("norms", NORM_MODES, "linear"))
    r.done()

    r = _Reader(top.get("alignment"), "alignment")
    alignment = AlignmentConfig(enabled=r.choice("enabled", ALIGN_ENABLED, "auto"),
                                calibration=r.files("calibration", base),
                                max_tokens=r.integer("max_tokens", 131072, 2),
                                seq_len=r.integer("seq_len", 512, 2),
                                batch_size=r.integer("batch_size", 8, 1),
                                solver=r.get("solver", "auto"))
    try:
        from symphony_kernels.matching import SOLVERS
    except ImportError:  # matching not installed: alignment will say so if alignment runs
        SOLVERS = None
    if not isinstance(alignment.solver, str) or (SOLVERS and alignment.solver not in SOLVERS):
        raise SymphonyError(f"alignment.solver: {alignment.solver!r} is not one of "
                            f"{', '.join(SOLVERS or ['auto'])}")
    lpp = alignment.layers_per_pass = r.get("layers_per_pass", "auto")
    if lpp != "auto" and (isinstance(lpp, bool) or not isinstance(lpp, int) or lpp < 1):
        raise SymphonyError(f"alignment.layers_per_pass: {lpp!r} must be auto or an integer >= 1")
    r.done()

    r = _Reader(top.get("experts"), "experts")
    chosen = r.get("sources")
    if chosen is not None:
        if not isinstance(chosen, list) or not chosen or not all(isinstance(n, str) for n in chosen):
            raise SymphonyError(f"experts.sources: {chosen!r} must be a non-empty list of source names")
        bad = next((n for n in chosen if n not in names), None)
        if bad is not None:
            raise SymphonyError(f"experts.sources: {bad!r} is not a source name ({', '.join(names)})")
        if len(set(chosen)) != len(chosen):
            raise SymphonyError(f"experts.sources: {chosen!r} names a source twice")
    experts = ExpertsConfig(sources=chosen, per_source=r.integer("per_source", 1, 1),
                            top_k=r.integer("top_k", 2, 1),
                            shared_expert=r.choice("shared_expert", SHARED_EXPERT, "none"),
                            router_init=r.choice("router_init", ROUTER_INIT, "hidden"))
    r.done()
    n_experts = len(chosen if chosen is not None else names) * experts.per_source
    if experts.top_k > n_experts:
        raise SymphonyError(f"experts.top_k: {experts.top_k} is more than the {n_experts} experts")

    r = _Reader(top.get("router_training"), "router_training")
    router_text = r.files("text", base)
    fields = {f.name for f in dataclasses.fields(RouterTrainingConfig)}
    kwargs = {k: r.get(k) for k in list(r.data) if k in fields}
    r.used |= fields
    r.done()
    device = top.get("device", "auto")
    if not isinstance(device, str):
        raise SymphonyError(f"device: {device!r} must be a string such as auto, cpu, cuda or cuda:0")
    seed = top.integer("seed", 0, 0)
    kwargs.setdefault("device", device)
    kwargs.setdefault("seed", seed)
    try:
        training = RouterTrainingConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise SymphonyError(str(e)) from e

    r = _Reader(top.get("output"), "output")
    output = OutputConfig(architecture=r.choice("architecture", ARCHITECTURES, "auto"),
                          dtype=r.choice("dtype", OUTPUT_DTYPES, "auto"),
                          max_shard_size=parse_size(r.get("max_shard_size", "2GB"), "output.max_shard_size"),
                          expert_layout=r.choice("expert_layout", EXPERT_LAYOUTS, "per_expert"))
    r.done()
    top.done()

    cfg = BuildConfig(sources=sources, anchor=anchor, fusion=fusion, alignment=alignment, experts=experts,
                      router_training=training, router_text=router_text, output=output, device=device, seed=seed,
                      preset=preset)
    if experts.router_init == "hidden":
        missing = [s.name for s in sources if s.name in cfg.expert_sources and not s.calibration]
        if missing:
            raise SymphonyError(f"experts.router_init: hidden needs calibration text for every expert source; "
                                f"sources[{names.index(missing[0])}] ({missing[0]!r}) has none (give its "
                                "calibration files, or use router_init: zeros or random)")
    if training.steps > 0 and not cfg.training_files():
        raise SymphonyError("router_training: stage 2 needs text: give router_training.text, "
                            "alignment.calibration or the sources' calibration files (or router_training.steps: 0)")
    return cfg


def load_config(path) -> BuildConfig:
    """Read and validate a build config YAML file."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise SymphonyError(f"{path} is a folder, not a config file")
    if not path.is_file():
        raise SymphonyError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SymphonyError(f"cannot read the config {path}: {' '.join(str(e).split())}") from e
    return parse_config(data, base_dir=path.resolve().parent)
