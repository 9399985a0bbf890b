"""Source checkpoints of a Symphony-MoE build: lazy tensor access, architecture checks, the union vocabulary.

A `Source` is one local dense transformers checkpoint (config.json + safetensors, one file or sharded with
`model.safetensors.index.json`) of the Llama, Mistral, Qwen2 or Qwen3 family. Opening it is cheap: it reads
the config, the tokenizer (refused without tokenizer files, or when it turns a probe text into no tokens:
symphony.data.check_tokenizer) and every safetensors header (a missing or truncated file is found here), and checks
that every tensor the architecture needs is present with the right shape. Tensors are then read one at a
time, on demand (`Source.tensor`), and checked for NaN/inf as they are read.

Weight names are the same in all four families (`model.layers.{i}.mlp.gate_proj.weight`, ...); the FFN of a
layer is `gate_proj`, `up_proj` [f, d] and `down_proj` [d, f], computing down(act(gate x) * up x).

Vocabulary (`build_vocabulary`): the union vocabulary is the anchor's tokenizer plus the tokens that other
sources add (appended in source order, each source's new tokens by their id). Tokens the sources share must
mean the same thing: a token that is in two vocabularies with different ids is refused unless it is an added
token in one of them (added tokens are matched by their text), and the two tokenizers must cut a probe text
into the same tokens. `Vocabulary.local_ids[s][u]` is source s's embedding row for union row u, or -1 where the
source lacks that token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from symphony.data import check_tokenizer
from symphony.errors import SymphonyError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_types(config) -> list[str] | None:
    """Sliding-window layout that changes the function: per-layer attention types, or None for all-full."""
    types = getattr(config, "layer_types", None)
    if config.model_type == "mistral":
        return None
    if types is None and getattr(config, "use_sliding_window", False):
        return ["sliding_attention"] * config.num_hidden_layers
    if types and all(t == "full_attention" for t in types):
        return None
    return list(types) if types else None


def _sliding_window(config):
    if config.model_type == "mistral" or _layer_types(config):
        return getattr(config, "sliding_window", None)
    return None


# (label, getter) of every config property that must agree between sources, in the order they are compared.
ARCHITECTURE_FIELDS = (
    ("model_type (family)", lambda c: c.model_type),
    ("hidden_size", lambda c: c.hidden_size),
    ("num_hidden_layers", lambda c: c.num_hidden_layers),
    ("num_attention_heads", lambda c: c.num_attention_heads),
    ("num_key_value_heads", lambda c: getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
    ("head_dim", _head_dim),
    ("intermediate_size", lambda c: c.intermediate_size),
    ("hidden_act", lambda c: c.hidden_act),
    ("rope_parameters", lambda c: getattr(c, "rope_parameters", None)),
    ("rms_norm_eps", lambda c: c.rms_norm_eps),
    ("tie_word_embeddings", lambda c: bool(getattr(c, "tie_word_embeddings", False))),
    ("attention_bias", lambda c: bool(getattr(c, "attention_bias", c.model_type == "qwen2"))),
    ("mlp_bias", lambda c: bool(getattr(c, "mlp_bias", False))),
    ("sliding-window layers (layer_types)", _layer_types),
    ("sliding_window", _sliding_window),
)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SymphonyError(f"cannot read {what} {path}: {e}") from e


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this dense config must hold (built on the meta device, so
    the names are those of the installed transformers)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


class Source:
    """One dense source checkpoint, read lazily. Use `open_source`; the constructor does no checking.

    Attributes: name, path, config (transformers config), tokenizer, family (model_type), files (tensor name ->
    safetensors file). `union_ids`, `local_ids` are set by `build_vocabulary` (None until then).
    """

    def __init__(self, name: str, path: Path, config, tokenizer, files: dict[str, Path]):
        self.name, self.path, self.config, self.tokenizer, self.files = name, path, config, tokenizer, files
        self.family = config.model_type
        self.local_ids: torch.Tensor | None = None  # [union vocab] -> this source's row, -1 where missing
        self.fallback_id: int | None = None          # local id used for union tokens this source lacks

    def __repr__(self):
        return f"Source({self.name!r}, {str(self.path)!r}, {self.family})"

    # Sizes -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    # Tensors ---------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._file(name), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def _file(self, name: str) -> str:
        if name not in self.files:
            raise SymphonyError(f"source {self.name!r} has no tensor {name!r}")
        return str(self.files[name])

    def tensor(self, name: str, *, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """One tensor, read from disk now (nothing is cached), checked finite, in `dtype` (default: as stored)."""
        from safetensors import SafetensorError, safe_open

        path = self._file(name)
        try:
            with safe_open(path, framework="pt") as f:
                t = f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise SymphonyError(f"cannot read tensor {name!r} of source {self.name!r} from {path}: {e}") from e
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SymphonyError(f"source {self.name!r}: tensor {name!r} holds {bad} NaN/inf value(s) ({path})")
        return t.to(device=device, dtype=dtype or t.dtype)

    def rows(self, name: str, lo: int, hi: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows lo..hi-1 of a tensor (only those are read), checked finite."""
        from safetensors import SafetensorError, safe_open

        path = self._file(name)
        try:
            with safe_open(path, framework="pt") as f:
                t = f.get_slice(name)[lo:hi]
        except (OSError, SafetensorError) as e:
            raise SymphonyError(f"cannot read tensor {name!r} of source {self.name!r} from {path}: {e}") from e
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SymphonyError(f"source {self.name!r}: tensor {name!r} holds NaN/inf values (rows {lo}..{hi - 1}; "
                                f"{path})")
        return t.to(dtype or t.dtype)

    @staticmethod
    def ffn_names(layer: int) -> tuple[str, str, str]:
        """(gate_proj, up_proj, down_proj) weight names of a layer's FFN."""
        p = f"model.layers.{layer}.mlp."
        return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"

    def ffn(self, layer: int, *, dtype=None, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [f, d], up [f, d], down [d, f]) of one layer, read now."""
        return tuple(self.tensor(n, dtype=dtype, device=device) for n in self.ffn_names(layer))

    # Dense model and tokens ------------------------------------------------------------------------------
    def load_model(self, *, device="cpu", dtype=torch.float32):
        """The whole dense model (for calibration forwards), in eval mode; weights checked finite as loaded."""
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad checkpoint, said in one line
            raise SymphonyError(f"cannot load source {self.name!r} from {self.path}: {e}") from e
        for n, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise SymphonyError(f"source {self.name!r}: tensor {n!r} holds NaN/inf values")
        return model.to(device).eval()

    def to_local(self, union_ids: torch.Tensor) -> torch.Tensor:
        """Union-vocabulary token ids -> this source's ids; tokens it lacks become `fallback_id` (its unk token,
        else its end-of-text token, else 0)."""
        if self.local_ids is None:
            raise RuntimeError("build_vocabulary has not been run on this source")
        local = self.local_ids.to(union_ids.device)[union_ids]
        return torch.where(local >= 0, local, torch.full_like(local, self.fallback_id))


def _weight_files(name: str, path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index json or the single safetensors file; every file opened (headers)."""
    from safetensors import SafetensorError, safe_open

    if (path / INDEX).is_file():
        index = _read_json(path / INDEX, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SymphonyError(f"source {name!r}: {path / INDEX} has no weight_map")
        files = {k: path / v for k, v in weight_map.items()}
    elif (path / SINGLE).is_file():
        files = None
    else:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(found[:3])}: convert to safetensors first)" if found else ""
        raise SymphonyError(f"source {name!r}: no {SINGLE} or {INDEX} in {path}{hint}")
    names_in = {}
    for file in sorted(set(files.values())) if files else [path / SINGLE]:
        if not file.is_file():
            raise SymphonyError(f"source {name!r}: safetensors file missing: {file}")
        try:
            with safe_open(str(file), framework="pt") as f:
                names_in[file] = set(f.keys())
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a truncated or corrupt file
            raise SymphonyError(f"source {name!r}: unreadable safetensors file {file} (truncated or corrupt?): "
                                f"{e}") from e
    if files is None:
        return {k: path / SINGLE for k in names_in[path / SINGLE]}
    for k, file in files.items():
        if k not in names_in[file]:
            raise SymphonyError(f"source {name!r}: {INDEX} puts {k!r} in {file.name}, which does not hold it")
    return files


def open_source(name: str, path) -> Source:
    """Open and check one source (config, tokenizer, safetensors headers, tensor names and shapes): cheap,
    reads no weights. Every problem is a SymphonyError that names the source and the file or tensor."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise SymphonyError(f"source {name!r}: folder not found: {path}")
    if not (path / "config.json").is_file():
        raise SymphonyError(f"source {name!r}: {path} is not a transformers checkpoint (no config.json)")
    raw = _read_json(path / "config.json", "config")
    family = raw.get("model_type") if isinstance(raw, dict) else None
    if family not in FAMILIES:
        raise SymphonyError(f"source {name!r}: model_type {family!r} is not supported; "
                            f"supported dense families: {', '.join(FAMILIES)}")
    if raw.get("quantization_config"):
        raise SymphonyError(f"source {name!r}: quantized checkpoints are not supported ({path})")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise SymphonyError(f"source {name!r}: cannot read the config in {path}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise SymphonyError(f"source {name!r}: cannot load the tokenizer in {path}: {e}") from e
    check_tokenizer(tokenizer, path, f"source {name!r}")
    files = _weight_files(name, path)
    shapes = expected_tensors(config)
    by_file: dict[Path, list[str]] = {}
    for k in shapes:
        if k not in files:
            raise SymphonyError(f"source {name!r}: tensor {k!r} is missing from the checkpoint in {path}")
        by_file.setdefault(files[k], []).append(k)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for k in names:
                got = tuple(f.get_slice(k).get_shape())
                if got != shapes[k]:
                    raise SymphonyError(f"source {name!r}: tensor {k!r} has shape {list(got)} in {file.name}, "
                                        f"the config says {list(shapes[k])}")
    if len(tokenizer) > config.vocab_size:
        raise SymphonyError(f"source {name!r}: the tokenizer has {len(tokenizer)} tokens but the model only "
                            f"{config.vocab_size} embedding rows")
    return Source(name, path, config, tokenizer, files)


def check_same_architecture(sources: list[Source]):
    """Raise a SymphonyError naming the first property in which a source differs from the first source."""
    if len(sources) < 2:
        raise SymphonyError("a build needs at least two sources")
    first = sources[0]
    for src in sources[1:]:
        for label, get in ARCHITECTURE_FIELDS:
            a, b = get(first.config), get(src.config)
            if a != b:
                raise SymphonyError(f"sources {first.name!r} and {src.name!r} differ in {label}: {a!r} vs {b!r}; "
                                    "Symphony-MoE needs sources of one architecture")


@dataclass
class Vocabulary:
    """The union vocabulary: `tokenizer` (the anchor's plus the added tokens), `size` rows of the fused
    embedding (at least the anchor's embedding rows), `added` (token -> the source it came from) and, per
    source in build order, `local_ids` [size] (that source's row for each union row, -1 where it lacks it)."""

    tokenizer: object
    size: int
    local_ids: list[torch.Tensor]
    added: dict[str, str] = field(default_factory=dict)


_PROBE = ("The quick brown fox jumps over the lazy dog. def f(x, y):\n    return x + y * 2\n"
          "12 + 30 = 42; Subject to section 3, the Licensee may copy the Work. \u00e9t\u00e9 \u4f60\u597d ")


def _base_vocab(tok) -> dict[str, int]:
    added = set(tok.get_added_vocab())
    return {t: i for t, i in tok.get_vocab().items() if t not in added}


def _check_tokenizers(anchor: Source, src: Source, probe_texts: list[str]):
    """Refuse tokenizers whose shared part differs: same base token with different ids, or a different cut of
    a probe text (with every added token's text removed from it)."""
    base_a, base_s = _base_vocab(anchor.tokenizer), _base_vocab(src.tokenizer)
    clash = [(t, i, base_s[t]) for t, i in base_a.items() if t in base_s and base_s[t] != i]
    if clash:
        t, i, j = clash[0]
        raise SymphonyError(f"the tokenizers of {anchor.name!r} and {src.name!r} differ in their shared part: "
                            f"{len(clash)} token(s) have other ids (e.g. {t!r}: {i} vs {j}); such sources cannot "
                            "share one vocabulary")
    specials = set(anchor.tokenizer.get_added_vocab()) | set(src.tokenizer.get_added_vocab())
    for text in [_PROBE] + [t[:4000] for t in probe_texts]:
        for s in sorted(specials, key=len, reverse=True):
            text = text.replace(s, " ")
        ids_a = anchor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids_s = src.tokenizer(text, add_special_tokens=False)["input_ids"]
        if anchor.tokenizer.convert_ids_to_tokens(ids_a) != src.tokenizer.convert_ids_to_tokens(ids_s):
            raise SymphonyError(f"the tokenizers of {anchor.name!r} and {src.name!r} cut the same text into "
                                f"different tokens (e.g. {text[:40]!r}...); such sources cannot share one vocabulary")


def build_vocabulary(sources: list[Source], anchor_index: int, probe_texts=()) -> Vocabulary:
    """The union vocabulary of `sources` around the anchor's tokenizer; sets each source's `local_ids` and
    `fallback_id`. Raises SymphonyError for tokenizers that cannot share one vocabulary."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    anchor = sources[anchor_index]
    for src in sources:
        if src is not anchor:
            _check_tokenizers(anchor, src, list(probe_texts))
    union = AutoTokenizer.from_pretrained(anchor.path)
    known = dict(union.get_vocab())
    taken = set(known.values())
    added: dict[str, str] = {}
    for src in sources:
        if src is anchor:
            continue
        decoder = src.tokenizer.added_tokens_decoder
        for token, i in sorted(src.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if token in known:
                continue
            spec = decoder.get(i)
            special = bool(spec is not None and spec.special)
            new = AddedToken(token, special=special, normalized=not special) if spec is None else spec
            union.add_tokens([new], special_tokens=special)
            got = union.convert_tokens_to_ids(token)
            if got is None or got in taken:
                raise SymphonyError(f"cannot add token {token!r} of source {src.name!r} to the union vocabulary "
                                    f"(the tokenizer gave it id {got}, which is taken)")
            known[token] = got
            taken.add(got)
            added[token] = src.name
    size = max(anchor.config.vocab_size, max(taken) + 1)
    local_ids = []
    for src in sources:
        vocab = src.tokenizer.get_vocab()
        rows = src.config.vocab_size
        ids = torch.full((size,), -1, dtype=torch.long)
        for token, u in known.items():
            i = vocab.get(token, -1)
            ids[u] = i if i < rows else -1
        # Rows past every token (embedding padding): the same row of each source that has it and uses it for
        # no token of its own.
        used = set(vocab.values())
        for u in range(min(size, rows)):
            if u not in taken and u not in used:
                ids[u] = u
        src.local_ids = ids
        unk = src.tokenizer.unk_token_id
        src.fallback_id = unk if unk is not None else (src.tokenizer.eos_token_id or 0)
        local_ids.append(ids)
    covered = torch.stack(local_ids).ge(0).any(0)
    if not bool(covered.all()):
        u = int((~covered).nonzero()[0])
        raise SymphonyError(f"union vocabulary row {u} has no source row")
    return Vocabulary(union, size, local_ids, added)
