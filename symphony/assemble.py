"""Assembly: the target MoE config, every output tensor made from the sources one at a time, and a streaming
sharded safetensors writer. The result loads with `AutoModelForCausalLM.from_pretrained` (no remote code).

Targets: qwen2 sources -> Qwen2MoeForCausalLM, qwen3 -> Qwen3MoeForCausalLM, llama / mistral ->
MixtralForCausalLM. Every layer is an MoE layer; the top-k routing weights are renormalised to sum to 1
(`norm_topk_prob`; Mixtral always does), so an MoE made of N identical sources computes the dense model's
function whatever its routers say. Qwen2-MoE's shared expert is disabled by giving it 0 neurons (zero-size
tensors: it loads, adds 0 and costs nothing) unless `shared_expert: mean` asks for the mean of the aligned
FFNs (its gate `shared_expert_gate` then starts at 0, i.e. a factor sigmoid(0) = 0.5).

Experts: expert e of layer l is block j of the aligned FFN of source s (e = position of s among the expert
sources * per_source + j). The aligned FFN is the source's FFN with its neurons permuted by the alignment's
`perm[l]` (perm[i] = the source neuron matched to anchor neuron i): gate and up rows, down columns. Block j of
per_source = m holds neurons j*f/m .. (j+1)*f/m - 1, and its down projection is multiplied by m, so that routing
a token to all m blocks of one source with weights 1/m gives that source's FFN back. With per_source = 1 and the
stored dtype, experts are the (permuted) source FFNs bit for bit.

Routers [E, d]: "zeros"; "random" (normal, std = the config's initializer_range, seeded); "hidden": the rows
of symphony.align.router_from_centroids (every expert of source s prefers tokens whose router-input hidden
state points like source s's mean hidden state on its own calibration text). With per_source > 1 the rows of
one source get a small seeded perturbation (1e-2 of their norm) so that its experts are not tied forever.

Checkpoint layout: "per_expert" (default) writes what transformers' own `save_pretrained` writes and what the
hub's MoE checkpoints hold (`mlp.experts.{e}.gate_proj.weight`..., Mixtral `block_sparse_moe.experts.{e}.w1`
...); transformers fuses them into `gate_up_proj` [E, 2f, d] / `down_proj` [E, d, f] on load. "fused" writes
transformers' in-memory layout directly (`mlp.experts.gate_up_proj` = cat(gate, up) per expert).

The writer (`write_shards`) knows every tensor's name, shape and dtype up front (from the config), so each
shard's header is written first and each tensor is produced, written and dropped one at a time; the
embedding and lm_head are produced in row chunks. Shards follow transformers' naming
(model-00001-of-0000N.safetensors with model.safetensors.index.json; one shard: model.safetensors).
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from symphony.errors import SymphonyError

TARGETS = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "llama": "MixtralForCausalLM",
           "mistral": "MixtralForCausalLM"}
_CONFIGS = {"Qwen2MoeForCausalLM": "Qwen2MoeConfig", "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
            "MixtralForCausalLM": "MixtralConfig"}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
HIDDEN_NOISE = 1e-2


def unsupported(config) -> str | None:
    """Why a source config cannot become its family's MoE target, or None when it can."""
    family = config.model_type
    if family == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return "Llama sources with attention_bias or mlp_bias cannot become Mixtral (it has no biases)"
    if getattr(config, "mlp_bias", False):
        return f"{family} sources with FFN biases are not supported"
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types)
    if family == "qwen3" and sliding:
        return "Qwen3 sources with sliding-window layers are not supported (Qwen3-MoE has no per-layer types)"
    return None


def target_config(anchor_config, *, num_experts: int, top_k: int, expert_size: int, shared_expert_size: int,
                  vocab_size: int, dtype: torch.dtype, max_position_embeddings: int):
    """The MoE config for sources like `anchor_config` (all layers sparse, top-k weights renormalised)."""
    import transformers

    c = anchor_config
    family = c.model_type
    arch = TARGETS[family]
    why = unsupported(c)
    if why:
        raise SymphonyError(why)
    kw = dict(vocab_size=vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
              num_attention_heads=c.num_attention_heads,
              num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
              hidden_act=c.hidden_act, max_position_embeddings=max_position_embeddings,
              initializer_range=getattr(c, "initializer_range", 0.02), rms_norm_eps=c.rms_norm_eps,
              tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
              rope_parameters=getattr(c, "rope_parameters", None),
              attention_dropout=getattr(c, "attention_dropout", 0.0), bos_token_id=c.bos_token_id,
              eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
              num_experts_per_tok=top_k, output_router_logits=False)
    if arch == "MixtralForCausalLM":
        kw.update(num_local_experts=num_experts, intermediate_size=expert_size, router_jitter_noise=0.0,
                  head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                  sliding_window=getattr(c, "sliding_window", None) if family == "mistral" else None)
    else:
        kw.update(num_experts=num_experts, moe_intermediate_size=expert_size, intermediate_size=c.intermediate_size,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  use_sliding_window=bool(getattr(c, "use_sliding_window", False)),
                  sliding_window=getattr(c, "sliding_window", None))
        if arch == "Qwen2MoeForCausalLM":
            kw.update(shared_expert_intermediate_size=shared_expert_size, qkv_bias=True,
                      max_window_layers=getattr(c, "max_window_layers", c.num_hidden_layers),
                      layer_types=getattr(c, "layer_types", None))
        else:
            kw.update(head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                      attention_bias=bool(getattr(c, "attention_bias", False)))
    config = getattr(transformers, _CONFIGS[arch])(**kw)
    config.architectures = [arch]
    config.dtype = dtype
    return config


def model_tensors(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the target model, in transformers' in-memory (fused) layout, as the
    installed transformers builds it (on the meta device)."""
    from transformers import AutoModelForCausalLM

    from symphony.data import quiet_zero_size_init

    with torch.device("meta"), quiet_zero_size_init():  # a disabled shared expert has 0-neuron weights
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


# --------------------------------------------------------------------------------------------------------
# The streaming writer

@dataclass
class Entry:
    """One output tensor: its name, shape, dtype and a producer that returns it whole or in row chunks."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor | Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def shard_groups(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Consecutive groups of entries of at most max_shard_size bytes each (a bigger tensor gets its own)."""
    groups, size = [[]], 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return groups


def _write_tensor(f, entry: Entry):
    out = entry.produce()
    chunks = [out] if isinstance(out, torch.Tensor) else out
    rows = 0
    for chunk in chunks:
        if chunk.dtype != entry.dtype or tuple(chunk.shape[1:]) != entry.shape[1:]:
            raise RuntimeError(f"{entry.name}: produced {chunk.dtype} {tuple(chunk.shape)}, planned {entry.dtype} "
                               f"{entry.shape}")
        rows += chunk.shape[0] if chunk.dim() else 1
        data = chunk.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))
        del chunk, data
    if rows != (entry.shape[0] if entry.shape else 1):
        raise RuntimeError(f"{entry.name}: produced {rows} rows, planned {entry.shape}")


def _write_one(path: Path, entries: list[Entry], done=lambda: None):
    """One safetensors file: the header (from the entries' names, shapes and dtypes), then each tensor as it is
    produced."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        start = f.tell()
        for e in entries:
            _write_tensor(f, e)
            done()
        if f.tell() - start != offset:
            raise RuntimeError(f"{path.name}: wrote {f.tell() - start} bytes of data, planned {offset}")


def write_shards(folder: Path, entries: list[Entry], max_shard_size: int, *, progress: bool = True) -> dict:
    """Write `entries` as safetensors shards (and the index json when there is more than one) into `folder`.
    Returns {"files": [...], "total_size": bytes}."""
    groups = shard_groups(entries, max_shard_size)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    bar = tqdm(total=len(entries), desc="assemble", unit="tensor", disable=not progress, dynamic_ncols=True)
    try:
        for file, group in zip(names, groups):
            weight_map.update({e.name: file for e in group})
            _write_one(folder / file, group, bar.update)
    finally:
        bar.close()
    total = sum(e.nbytes for e in entries)
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"files": names, "total_size": total}


# --------------------------------------------------------------------------------------------------------
# What each output tensor is made of

@dataclass
class MoEPlan:
    """Everything assembly needs besides the sources: see `plan_entries`."""

    sources: list                      # symphony.sources.Source, in config order
    anchor_index: int
    vocab: object                      # symphony.sources.Vocabulary
    config: object                     # the target transformers config
    expert_sources: list[int]          # indices into `sources`, one per expert source
    per_source: int
    shared_expert: str                 # "none" | "mean"
    attention: str                     # "slerp" | "linear"
    layer_weights: list[list[float]]   # per layer, the fusion weight of every source
    embeddings: str                    # "selective" | "anchor"
    norms: str                         # "linear" | "anchor"
    routers: Callable[[int], torch.Tensor]  # layer -> [E, d] router weight (float32)
    perms: dict[int, torch.Tensor]     # source index -> [layers, f] permutation (absent: identity)
    layout: str = "per_expert"

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def expert_names(self) -> list[str]:
        """The source name of every expert, in expert order."""
        return [self.sources[s].name for s in self.expert_sources for _ in range(self.per_source)]


def permuted_ffn_part(source, layer: int, part: str, perm: torch.Tensor | None, block: int, blocks: int):
    """Block `block` of `blocks` of one permuted FFN weight: part "gate" / "up" ([f/m, d] rows) or "down"
    ([d, f/m] columns, times `blocks`), in the stored dtype."""
    gate, up, down = source.ffn_names(layer)
    w = source.tensor({"gate": gate, "up": up, "down": down}[part])
    f = w.shape[1] if part == "down" else w.shape[0]
    size = f // blocks
    if perm is not None:
        idx = perm[block * size:(block + 1) * size]
        out = w[:, idx] if part == "down" else w[idx]
    elif blocks > 1:
        out = w[:, block * size:(block + 1) * size] if part == "down" else w[block * size:(block + 1) * size]
    else:
        out = w
    if part == "down" and blocks > 1:
        out = out * blocks
    return out.contiguous()


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _backbone_producer(plan: MoEPlan, name: str):
    """The producer of one non-FFN tensor (embeddings, lm_head, attention, norms) of the target."""
    from symphony.fusion import fuse, linear_mean, merge_rows

    sources, dtype = plan.sources, plan.dtype
    if not all(s.has(name) for s in sources):
        raise SymphonyError(f"no source tensor for {name!r} of the target model")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        def rows():
            return merge_rows(lambda s, lo, hi: sources[s].rows(name, lo, hi), plan.vocab.local_ids,
                              plan.anchor_index, plan.embeddings, dtype)
        return rows
    layer = _layer_of(name)
    if name.endswith("norm.weight"):
        def norm():
            if plan.norms == "anchor":
                return sources[plan.anchor_index].tensor(name).to(dtype)
            return linear_mean([s.tensor(name) for s in sources], None, dtype)
        return norm
    if layer is not None and ".self_attn." in name:
        def attention():
            return fuse([s.tensor(name) for s in sources], plan.layer_weights[layer], plan.attention, dtype)
        return attention
    raise SymphonyError(f"do not know how to fuse tensor {name!r}")


def _aligned(plan: MoEPlan, s: int, layer: int, part: str, block: int = 0, blocks: int = 1) -> torch.Tensor:
    perm = plan.perms.get(s)
    return permuted_ffn_part(plan.sources[s], layer, part, None if perm is None else perm[layer], block, blocks)


def _expert_producer(plan: MoEPlan, layer: int, expert: int, part: str):
    s, block = plan.expert_sources[expert // plan.per_source], expert % plan.per_source
    return lambda: _aligned(plan, s, layer, part, block, plan.per_source).to(plan.dtype)


def _fused_producer(plan: MoEPlan, layer: int, which: str):
    def produce():
        experts = []
        for e in range(len(plan.expert_sources) * plan.per_source):
            s, block = plan.expert_sources[e // plan.per_source], e % plan.per_source
            if which == "gate_up":
                parts = [_aligned(plan, s, layer, p, block, plan.per_source) for p in ("gate", "up")]
                experts.append(torch.cat(parts).to(plan.dtype))
            else:
                experts.append(_aligned(plan, s, layer, "down", block, plan.per_source).to(plan.dtype))
        return torch.stack(experts)
    return produce


def _shared_producer(plan: MoEPlan, layer: int, part: str, shape):
    if plan.shared_expert != "mean":
        return lambda: torch.zeros(shape, dtype=plan.dtype)

    def produce():
        from symphony.fusion import linear_mean

        return linear_mean([_aligned(plan, s, layer, part) for s in plan.expert_sources], None, plan.dtype)
    return produce


def _mlp_names(config, layer: int, num_experts: int, layout: str) -> list[tuple[str, str, int | None, str]]:
    """(saved name, kind, expert, part) of every MoE tensor of one layer. kind: router, expert, fused,
    shared, shared_gate."""
    fam = "mixtral" if config.model_type == "mixtral" else "qwen"
    p = f"model.layers.{layer}."
    out = []
    if layout == "fused":
        out += [(p + "mlp.gate.weight", "router", None, ""), (p + "mlp.experts.gate_up_proj", "fused", None, "gate_up"),
                (p + "mlp.experts.down_proj", "fused", None, "down")]
    else:
        block = p + ("block_sparse_moe." if fam == "mixtral" else "mlp.")
        out.append((block + "gate.weight", "router", None, ""))
        files = {"gate": "w1", "up": "w3", "down": "w2"} if fam == "mixtral" else \
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        for e in range(num_experts):
            out += [(f"{block}experts.{e}.{files[part]}.weight", "expert", e, part) for part in ("gate", "up", "down")]
    if config.model_type == "qwen2_moe":
        out += [(f"{p}mlp.shared_expert.{part}_proj.weight", "shared", None, part) for part in ("gate", "up", "down")]
        out.append((p + "mlp.shared_expert_gate.weight", "shared_gate", None, ""))
    return out


def plan_entries(plan: MoEPlan) -> list[Entry]:
    """Every tensor of the output checkpoint, in order, checked against the tensors transformers expects."""
    config = plan.config
    expected = model_tensors(config)
    E = len(plan.expert_sources) * plan.per_source
    d, f = config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    fused_of = {}  # saved per-expert name -> the fused tensor it is part of (for the check)
    entries, seen = [], set()
    for name, shape in expected.items():
        layer = _layer_of(name)
        if layer is None or ".mlp." not in name:
            entries.append(Entry(name, shape, plan.dtype, _backbone_producer(plan, name)))
            seen.add(name)
            continue
        if name.endswith("mlp.gate.weight"):  # first MoE tensor of the layer: emit the layer's whole MLP
            for saved, kind, expert, part in _mlp_names(config, layer, E, plan.layout):
                if kind == "router":
                    entries.append(Entry(saved, (E, d), plan.dtype, lambda l=layer: plan.routers(l).to(plan.dtype)))
                    seen.add(name)
                elif kind == "expert":
                    shp = (d, f) if part == "down" else (f, d)
                    entries.append(Entry(saved, shp, plan.dtype, _expert_producer(plan, layer, expert, part)))
                    fused_of[saved] = f"model.layers.{layer}.mlp.experts." + \
                        ("down_proj" if part == "down" else "gate_up_proj")
                elif kind == "fused":
                    shp = (E, d, f) if part == "down" else (E, 2 * f, d)
                    entries.append(Entry(saved, shp, plan.dtype, _fused_producer(plan, layer, part)))
                    seen.add(saved)
                elif kind == "shared":
                    shp = expected[saved]
                    entries.append(Entry(saved, shp, plan.dtype, _shared_producer(plan, layer, part, shp)))
                    seen.add(saved)
                else:
                    shp = expected[saved]
                    entries.append(Entry(saved, shp, plan.dtype, lambda s=shp: torch.zeros(s, dtype=plan.dtype)))
                    seen.add(saved)
    seen |= set(fused_of.values())
    missing = [k for k in expected if k not in seen]
    if missing:
        raise SymphonyError(f"internal: no output tensor planned for {missing[0]!r} of {config.architectures[0]}")
    for e in entries:
        if e.name in expected and tuple(expected[e.name]) != e.shape:
            raise SymphonyError(f"internal: {e.name} planned as {e.shape}, transformers expects {expected[e.name]}")
    return entries


def router_weights(kind: str, *, num_layers: int, num_experts: int, hidden_size: int, per_source: int,
                   seed: int, std: float = 0.02, hidden_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the [E, d] float32 router weight for init `kind` (see the module docstring); for "hidden",
    `hidden_rows` [layers, E, d] from symphony.align.router_from_centroids."""
    out = []
    for layer in range(num_layers):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        if kind == "zeros":
            w = torch.zeros(num_experts, hidden_size)
        elif kind == "random":
            w = torch.randn(num_experts, hidden_size, generator=gen) * std
        elif kind == "hidden":
            w = hidden_rows[layer].float().cpu().clone()
            if per_source > 1:  # break the ties between the experts of one source
                scale = w.norm(dim=1, keepdim=True) / math.sqrt(hidden_size)
                w = w + HIDDEN_NOISE * scale * torch.randn(w.shape, generator=gen)
        else:
            raise ValueError(f"unknown router init {kind!r}")
        out.append(w)
    return out


def write_model(plan: MoEPlan, folder: Path, *, max_shard_size: int, report: dict, progress: bool = True) -> dict:
    """Write the MoE checkpoint into the existing empty `folder`: safetensors shards (+ index), config.json,
    generation_config.json, the union tokenizer and alignment_report.json. Returns the writer's summary."""
    from transformers import GenerationConfig

    from symphony.data import write_json
    from symphony.inspect_cmd import REPORT

    entries = plan_entries(plan)
    written = write_shards(folder, entries, max_shard_size, progress=progress)
    plan.config.save_pretrained(folder)
    anchor = plan.sources[plan.anchor_index]
    try:
        gen = GenerationConfig.from_pretrained(anchor.path)
    except OSError:
        gen = GenerationConfig.from_model_config(plan.config)
    gen.save_pretrained(folder)
    plan.vocab.tokenizer.save_pretrained(folder)
    write_json(folder / REPORT, report)
    return written


def _checkpoint_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def replace_tensors(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy the safetensors checkpoint in folder `src` to the existing folder `dst`, shard by shard and tensor by
    tensor, with the tensors named in `tensors` replaced (cast to the stored dtype; shapes must agree). Names
    may be the model's in-memory names: Mixtral's `mlp.gate` is found as the saved `block_sparse_moe.gate`.
    Only safetensors shards and their index are written; returns the saved names that were replaced. Memory:
    one tensor at a time (what stage 2 needs to save a router-trained MoE without loading it whole)."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    files = _checkpoint_files(src)
    headers = {}
    for file in files:
        with safe_open(str(src / file), framework="pt") as f:
            headers[file] = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    saved = {k: file for file, names in headers.items() for k in names}
    mapping = {}
    for name in tensors:
        for candidate in (name, name.replace(".mlp.gate.", ".block_sparse_moe.gate.")):
            if candidate in saved:
                mapping[candidate] = name
                break
        else:
            raise ValueError(f"{name!r} is not a tensor of the checkpoint in {src}")
    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    for file in files:
        entries = []
        for name, (shape, st_dtype) in headers[file].items():
            dtype = dtypes[st_dtype]
            if name in mapping:
                value = tensors[mapping[name]]
                if tuple(value.shape) != shape:
                    raise ValueError(f"{mapping[name]!r}: shape {tuple(value.shape)}, the checkpoint has {shape}")
                produce = (lambda v=value, dt=dtype: v.detach().to("cpu", dt))
            else:
                produce = (lambda n=name, fl=file: _read(src / fl, n))
            entries.append(Entry(name, shape, dtype, produce))
        _write_one(dst / file, entries)
    if (src / "model.safetensors.index.json").is_file():
        (dst / "model.safetensors.index.json").write_bytes((src / "model.safetensors.index.json").read_bytes())
    return sorted(mapping)


def _read(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)
