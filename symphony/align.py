"""Stage 1b of a Symphony-MoE build: functional alignment of the sources' FFN neurons to an anchor, and the
hidden-state centroids that the "hidden" router initialisation starts from.

Alignment. A dense FFN computes ``down @ (act(gate @ x) * (up @ x))``; its hidden "neurons" are the rows of
`gate` and `up` and the matching columns of `down`. Every non-anchor source runs its own dense forward over
the same calibration windows as the anchor; the FFN intermediate activations of every layer (the input of
``mlp.down_proj``) stream into a correlation accumulator (symphony_kernels.correlation), never stored whole.
Per layer, C[i, j] is the Pearson correlation between anchor neuron i and source neuron j over all calibration
tokens, and a maximum-weight perfect matching (symphony_kernels.matching) gives ``perm[i]``, the source neuron
matched to anchor neuron i. The aligned source FFN is ``gate[perm], up[perm], down[:, perm]`` (`permute_ffn`):
its neuron i now plays the role of the anchor's neuron i, and, as any neuron permutation, it computes exactly
the same function as before. The score of a layer is the mean matched correlation ``mean_i C[i, perm[i]]``;
"before" is the identity matching ``mean_i C[i, i]``.

Alignment therefore cannot change an MoE whose experts are whole, unmerged source FFNs; it matters wherever
neuron i of one source meets neuron i of another: averaged/merged FFNs, a shared expert built from several
sources, experts split into finer experts. benchmarks/align_effect.py measures by how much (3 fixture Qwen2
sources, 3 seeds, held-out loss aligned minus unaligned): whole-FFN experts, max |delta logit| 3e-6 (rounding)
even after router training; a dense merge (mean FFN) of sources from independent inits -0.236 nats/token, of
sources fine-tuned from one base +0.014 (from -0.007 to +0.047: their identity order is already the weights'
own correspondence); a shared expert = mean of the FFNs -0.038 (independent) and -0.004 (one base); FFNs split
into 2 experts each, with trained routers: +0.003 and +0.001, within a seed-to-seed spread of +-0.03.

Calibration tokens. `calib_ids` is one 1-D stream of token ids (symphony.data.token_stream). It is cut into
non-overlapping windows of `seq_len` tokens (the shorter rest is a last window); when `max_tokens` is smaller
than the stream, whole windows evenly spaced over the stream are kept (so a mix of domains stays a mix).
Sources whose vocabularies differ get an id map (`id_maps[i]`: calibration id -> that source's id, -1 where the
source lacks the token): for each anchor/source pair, the positions that either of the two lacks are dropped
from the stream before windowing, and both models see the same filtered text.

Memory and speed of the correlation pass (`align_models`). Layers are handled `layers_per_pass` at a time: each
pass runs both models' forwards over the whole calibration text (cut short after the pass's last layer) and
holds, per layer of the pass, 8 * f_a * f_b bytes of float64 correlation state, then 4 * f_a * f_b of float32
correlation matrix beside it while it is finalised, plus the activations of one update: `pass_memory` says how
much in all, `auto_layers_per_pass` picks the most layers per pass that fit a memory budget (`memory_budget`:
a quarter of the free GPU memory on CUDA). Updates of the accumulator make one pass over its float64 state
whatever their size, which dominates on the GPU below ~16K tokens per update (benchmarks/RESULTS.md,
correlation section), so on CUDA consecutive calibration batches are concatenated into chunks of at least
`update_tokens` = 16384 tokens (the last chunk may be shorter) before each update. On the CPU the float64
product dominates at any size (16384 random float32 tokens of 2 layers x 2048 neurons fed to
`CorrelationAccumulator(2, 2048, 2048)`, C++ backend, OMP_NUM_THREADS=2, as updates of 512 / 2048 / 16384
tokens: 10.9 / 8.8 / 9.7 s), so each batch is its own update there and no chunk buffer is held. Chunking
changes the result only by rounding (Chan's merges of other partial sums).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from symphony.errors import SymphonyError

__all__ = ["AlignmentResult", "FFNCapture", "align_models", "align_sources", "apply_ffn_permutation",
           "auto_layers_per_pass", "calibration_windows", "capture_ffn_activations", "chunk_plan", "decoder_layers",
           "default_update_tokens", "hidden_centroids", "memory_budget", "pass_memory", "permute_ffn",
           "permute_ffn_biases", "router_from_centroids"]

# Tokens per accumulator update on CUDA (see the module docstring); 1 (each batch on its own) elsewhere.
CUDA_UPDATE_TOKENS = 16384
# The accumulator's scratch bound (CorrelationAccumulator's scratch_bytes), passed to it explicitly so that
# `pass_memory` counts what it really uses.
_SCRATCH_BYTES = {"cuda": 2 << 30, "cpu": 512 << 20}
# The memory budget of the correlation pass on the CPU: at most this much (and at most a quarter of what is free).
CPU_BUDGET_BYTES = 4 << 30


# ---------------------------------------------------------------------------------------------------------
# Model structure and activation capture
# ---------------------------------------------------------------------------------------------------------

def decoder_layers(model) -> list:
    """The decoder layers of a dense Llama/Mistral/Qwen2/Qwen3 causal LM (or of its base model), in order.

    Raises TypeError when the model has no `.layers` list, or a layer has no dense `mlp.down_proj` Linear
    (an MoE model, say)."""
    base = _base_model(model)
    layers = list(base.layers)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no decoder layers")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), torch.nn.Linear):
                raise TypeError(f"layer {i} of {type(model).__name__} has no dense FFN (mlp.{name} is not a Linear);"
                                " alignment needs a dense Llama/Mistral/Qwen2/Qwen3 model")
    return layers


def _base_model(model):
    """The module that holds `.layers` (model.model for a *ForCausalLM), so that forwards skip the lm_head."""
    if isinstance(getattr(model, "layers", None), torch.nn.ModuleList):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner
    raise TypeError(f"{type(model).__name__} is not a decoder-only transformers model with `.model.layers`")


def _vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, ids: torch.Tensor):
    """One forward of the base model (no lm_head, no cache) over windows `ids` [b, s]."""
    _base_model(model)(input_ids=ids.to(_model_device(model)), use_cache=False)


class _StopForward(Exception):
    """Raised by a capture hook once every requested layer is caught, to skip the rest of the forward."""


class FFNCapture:
    """Forward hooks that catch the FFN intermediate activations act(gate(x)) * up(x) of some or all layers.

    Made by `capture_ffn_activations`. After each forward of the model, `pop()` returns that forward's
    activations as one [len(layers), tokens, f] tensor (tokens = batch * seq_len, in row-major order of the
    input ids, in the model's dtype) and forgets them. A new forward discards whatever the previous one left,
    so at most one batch is ever held. With `stop_early`, the hook of the last requested layer ends the forward
    there (by raising an exception that `run` catches): use `run(ids)` then, not the model's own call.
    """

    def __init__(self, model, layers=None, *, stop_early: bool = False):
        all_layers = decoder_layers(model)
        if layers is None:
            layers = range(len(all_layers))
        self.indices = sorted(set(int(i) for i in layers))
        if not self.indices or self.indices[0] < 0 or self.indices[-1] >= len(all_layers):
            raise ValueError(f"layers must be a non-empty subset of 0..{len(all_layers) - 1}")
        self._model = model
        self._layers = [all_layers[i] for i in self.indices]
        self._stop_early = stop_early
        self._buffer = None
        self._seen = 0
        self._handles = []

    def _start(self, module, args, kwargs=None):
        self._buffer, self._seen = None, 0

    def _make_hook(self, slot: int):
        last = slot == len(self._layers) - 1

        def hook(module, args):
            x = args[0]
            flat = x.detach().reshape(-1, x.shape[-1])
            if slot == 0:
                self._buffer = flat.new_empty((len(self._layers), *flat.shape))
                self._seen = 0
            if self._buffer is None or self._seen != slot or self._buffer.shape[1:] != flat.shape:
                raise RuntimeError(f"FFN capture: layer {self.indices[slot]} ran out of order or with another "
                                   "shape (one forward at a time, every layer once, in order)")
            self._buffer[slot].copy_(flat)
            self._seen = slot + 1
            if last and self._stop_early:
                raise _StopForward
        return hook

    def attach(self):
        self._handles.append(_base_model(self._model).register_forward_pre_hook(self._start))
        for slot, layer in enumerate(self._layers):
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._make_hook(slot)))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._buffer = None

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        """One forward of the base model (no lm_head, no cache) over windows `ids` [b, s], then `pop()`."""
        try:
            _base_model(self._model)(input_ids=ids.to(_model_device(self._model)), use_cache=False)
        except _StopForward:
            pass
        return self.pop()

    def pop(self) -> torch.Tensor:
        """The last forward's activations [layers, tokens, f]; RuntimeError if no complete forward ran since."""
        if self._buffer is None or self._seen != len(self._layers):
            raise RuntimeError("no complete forward since the last pop(): run the model first")
        out, self._buffer, self._seen = self._buffer, None, 0
        return out


@contextlib.contextmanager
def capture_ffn_activations(model, layers=None, *, stop_early: bool = False):
    """Context manager: hooks on the `mlp.down_proj` of every layer (or of the `layers` indices) of a dense
    model; yields an `FFNCapture`.

        with capture_ffn_activations(model) as cap:
            for ids in batches:
                model(input_ids=ids)          # or acts = cap.run(ids): the base model only, no lm_head
                acts = cap.pop()              # [layers, tokens, f]

    The hooks are removed on exit, also on error.
    """
    cap = FFNCapture(model, layers, stop_early=stop_early).attach()
    try:
        yield cap
    finally:
        cap.detach()


# ---------------------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------------------

def _check_perm(perm: torch.Tensor, n: int, what: str = "perm") -> torch.Tensor:
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int64, torch.int32) or perm.dim() != 1:
        raise TypeError(f"{what} must be a 1-D int64/int32 tensor")
    if perm.numel() != n:
        raise ValueError(f"{what} has {perm.numel()} entries for {n} neurons")
    p = perm.long()
    if n and not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
        raise ValueError(f"{what} is not a permutation of 0..{n - 1}")
    return p


def permute_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor):
    """(gate[perm], up[perm], down[:, perm]) for a dense FFN with gate/up [f, d] and down [d, f].

    New neuron i is old neuron perm[i]. The permuted FFN computes exactly the same function (the same sums,
    in another order). Returns new contiguous tensors; the inputs are not modified."""
    if gate.dim() != 2 or up.shape != gate.shape or down.dim() != 2 or down.shape != gate.shape[::-1]:
        raise ValueError(f"permute_ffn needs gate/up [f, d] and down [d, f]; got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)}, {tuple(down.shape)}")
    p = _check_perm(perm, gate.shape[0]).to(gate.device)
    return gate.index_select(0, p), up.index_select(0, p), down.index_select(1, p)


def permute_ffn_biases(gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, perm: torch.Tensor):
    """(gate_bias[perm], up_bias[perm]) for an FFN with biases (Llama's mlp_bias); None stays None.

    The down projection's bias [d] lives on the output side and is not permuted."""
    out = []
    for name, b in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if b is None:
            out.append(None)
            continue
        if b.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(b.shape)}")
        out.append(b.index_select(0, _check_perm(perm, b.shape[0]).to(b.device)))
    return tuple(out)


@torch.no_grad()
def apply_ffn_permutation(model, perms: torch.Tensor):
    """Permute the FFN neurons of every layer of a loaded dense model in place (perms: [layers, f]).

    The model computes the same function afterwards. Returns the model."""
    layers = decoder_layers(model)
    f = layers[0].mlp.gate_proj.out_features
    if not isinstance(perms, torch.Tensor) or perms.dim() != 2 or perms.shape != (len(layers), f):
        raise ValueError(f"perms must be a [layers={len(layers)}, f={f}] tensor, got "
                         f"{tuple(perms.shape) if isinstance(perms, torch.Tensor) else type(perms).__name__}")
    for layer, perm in zip(layers, perms):
        mlp = layer.mlp
        g, u, d = permute_ffn(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, perm)
        mlp.gate_proj.weight.copy_(g)
        mlp.up_proj.weight.copy_(u)
        mlp.down_proj.weight.copy_(d)
        gb, ub = permute_ffn_biases(mlp.gate_proj.bias, mlp.up_proj.bias, perm)
        if gb is not None:
            mlp.gate_proj.bias.copy_(gb)
        if ub is not None:
            mlp.up_proj.bias.copy_(ub)
    return model


# ---------------------------------------------------------------------------------------------------------
# Calibration windows
# ---------------------------------------------------------------------------------------------------------

def _check_stream(ids, what: str = "calibration text") -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what}: token ids must be a 1-D integer tensor, not {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
        raise TypeError(f"{what}: token ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise SymphonyError(f"{what} is empty: no tokens to calibrate on")
    return ids.long().cpu()


def calibration_windows(ids: torch.Tensor, *, seq_len: int, batch_size: int,
                        max_tokens: int | None = None) -> list[torch.Tensor]:
    """[b, s] batches of calibration windows from a 1-D token stream (see the module docstring).

    Full windows of `seq_len` tokens, the shorter rest as one last [1, r] batch; with `max_tokens`, at most
    that many tokens, taken as whole windows spread evenly over the stream (a stream shorter than one window
    is cut to `max_tokens` tokens)."""
    ids = _check_stream(ids)
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, not {v!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, not {max_tokens!r}")
    n_full = ids.numel() // seq_len
    full = ids[:n_full * seq_len].view(n_full, seq_len)
    rest = ids[n_full * seq_len:]
    if max_tokens is not None and max_tokens < ids.numel():
        keep = max_tokens // seq_len
        if keep == 0:
            return [ids[:max_tokens][None]]
        if keep < n_full:  # evenly spaced whole windows, first and last included
            full = full[torch.linspace(0, n_full - 1, keep).round().long()]
        rest = rest[:0]
    out = list(full.split(batch_size)) if full.shape[0] else []
    if rest.numel():
        out.append(rest[None])
    return out


def _pair_streams(calib_ids: torch.Tensor, map_a, map_b) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(anchor ids, source ids, dropped tokens): the calibration stream in both vocabularies, without the
    positions that either vocabulary lacks."""
    a, b = calib_ids, calib_ids
    keep = torch.ones_like(calib_ids, dtype=torch.bool)
    if map_a is not None:
        a = map_a[calib_ids]
        keep &= a >= 0
    if map_b is not None:
        b = map_b[calib_ids]
        keep &= b >= 0
    dropped = int((~keep).sum())
    return a[keep], b[keep], dropped


def _check_id_map(m, n_calib_vocab: int, i: int):
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype.is_floating_point or m.dtype == torch.bool:
        raise TypeError(f"id_maps[{i}] must be a 1-D integer tensor (calibration id -> source id, -1 if missing)")
    if m.numel() < n_calib_vocab:
        raise ValueError(f"id_maps[{i}] maps {m.numel()} ids, but the calibration text uses ids up to "
                         f"{n_calib_vocab - 1}")
    return m.long().cpu()


# ---------------------------------------------------------------------------------------------------------
# Memory of the correlation pass: chunked updates, bytes per pass, layers per pass
# ---------------------------------------------------------------------------------------------------------

def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def default_update_tokens(device) -> int:
    """Tokens per accumulator update: CUDA_UPDATE_TOKENS on CUDA, 1 (each batch its own update) elsewhere."""
    return CUDA_UPDATE_TOKENS if torch.device(device).type == "cuda" else 1


def chunk_plan(batch_tokens, update_tokens: int) -> list[list[int]]:
    """Batch indices grouped into accumulator updates, in order: each group takes consecutive batches until it
    holds at least `update_tokens` tokens; the last group takes what is left. update_tokens=1: one batch each."""
    _positive_int(update_tokens, "update_tokens")
    plan, group, tokens = [], [], 0
    for i, n in enumerate(batch_tokens):
        group.append(i)
        tokens += int(n)
        if tokens >= update_tokens:
            plan.append(group)
            group, tokens = [], 0
    if group:
        plan.append(group)
    return plan


def _scratch_bytes(device: torch.device) -> int:
    return _SCRATCH_BYTES["cuda" if device.type == "cuda" else "cpu"]


def pass_memory(layers: int, f_a: int, f_b: int | None = None, *, batch_tokens: int, update_tokens: int = 1,
                itemsize: int = 4, device="cpu") -> int:
    """Bytes that one pass of `align_models` over `layers` layers holds at once on the accumulator's device,
    besides the two models and their forwards (activations of width f_a and f_b, `itemsize` bytes each).

    Per layer: 12 * f_a * f_b (the float64 state, and the float32 correlation matrix finalised beside it), and
    the activations of one update at (f_a + f_b) * itemsize bytes per token: one batch (`batch_tokens`, what
    a forward captures) and, when batches are concatenated (update_tokens > batch_tokens), the chunk they are
    copied into (ceil(update_tokens / batch_tokens) batches). Once: the accumulator's scratch, its scratch
    bound (2 GiB on CUDA, 512 MiB elsewhere) or what one layer needs when that is more (the block
    accumulators, 2 * f_a * f_b * 8 bytes on the CPU and 4 on CUDA, and copies of a block of up to 16384
    tokens widened to the product's dtype)."""
    f_b = f_a if f_b is None else f_b
    for name, v in (("layers", layers), ("f_a", f_a), ("f_b", f_b), ("batch_tokens", batch_tokens),
                    ("update_tokens", update_tokens), ("itemsize", itemsize)):
        _positive_int(v, name)
    device = torch.device(device)
    cuda = device.type == "cuda"
    chunk = 0 if update_tokens <= batch_tokens else math.ceil(update_tokens / batch_tokens) * batch_tokens
    per_layer = 12 * f_a * f_b + (batch_tokens + chunk) * (f_a + f_b) * itemsize
    product = 8 if not cuda or itemsize == 4 else itemsize  # float64 products on the CPU and for fp32 inputs
    block = min(max(batch_tokens, chunk), 16384)
    one_layer = 2 * (4 if cuda and product != 8 else 8) * f_a * f_b + block * (f_a + f_b) * product
    return layers * per_layer + max(_scratch_bytes(device), one_layer)


def memory_budget(device) -> int:
    """The bytes a correlation pass may hold (what `auto_layers_per_pass` fits into).

    CUDA: a quarter of the device's free memory (torch.cuda.mem_get_info), taken before the models are loaded,
    so that the anchor and one source (two 7B models in bf16: 27 GB), their forwards and the matching keep
    the other three quarters. Elsewhere: min(CPU_BUDGET_BYTES = 4 GiB, a quarter of MemAvailable in
    /proc/meminfo), 4 GiB where that cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 4
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return CPU_BUDGET_BYTES if available is None else min(CPU_BUDGET_BYTES, available // 4)


def auto_layers_per_pass(layers: int, f_a: int, f_b: int | None = None, *, budget_bytes: int, batch_tokens: int,
                         update_tokens: int = 1, itemsize: int = 4, device="cpu") -> int:
    """Layers per pass of `align_models` for a memory budget: the most layers k whose `pass_memory` fits
    `budget_bytes` (at least 1 even when one layer does not fit, at most `layers`), then spread evenly over the
    ceil(layers / k) passes this takes (as many passes, less memory: 32 layers with k = 12 give 3 passes of
    11 layers, not 12 + 12 + 8)."""
    _positive_int(layers, "layers")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative integer, not {budget_bytes!r}")
    kw = dict(batch_tokens=batch_tokens, update_tokens=update_tokens, itemsize=itemsize, device=device)
    k = 1
    while k < layers and pass_memory(k + 1, f_a, f_b, **kw) <= budget_bytes:
        k += 1
    passes = math.ceil(layers / k)
    return math.ceil(layers / passes)


# ---------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PairAlignment:
    """One source aligned to the anchor: perm [layers, f] and the per-layer mean matched correlation."""

    perm: torch.Tensor
    before: list[float]
    after: list[float]
    tokens: int
    moved: list[float] = field(default_factory=list)  # per layer, the fraction of neurons with perm[i] != i


@torch.inference_mode()
def align_models(anchor_model, source_model, batches, *, solver: str = "auto", progress: bool = False,
                 source_batches=None, anchor_name: str = "anchor", source_name: str = "source",
                 layers_per_pass: int | None = None, update_tokens: int | None = None) -> PairAlignment:
    """Align one loaded dense model's FFN neurons to an anchor's over calibration `batches` ([b, s] ids).

    `source_batches` (same shapes) are the same windows in the source's vocabulary when it differs.
    Activations of both models stream into a CorrelationAccumulator (on the anchor's device); per layer a
    linear assignment maximises the summed correlation. `layers_per_pass` (default: all layers in one pass)
    bounds memory: each pass over the calibration text handles that many layers (forwards stop after the
    last of them), holding 12 * layers_per_pass * f^2 bytes of correlation state and result at once,
    against 12 * layers * f^2 in one pass (31 GB of float64 state for 32 layers at f = 11008); see
    `pass_memory` and `auto_layers_per_pass`. `update_tokens` (default: `default_update_tokens(device)`,
    16384 on CUDA, 1 elsewhere): consecutive batches' activations are concatenated until a chunk holds at
    least that many tokens (the last chunk: what is left) before each accumulator update (`chunk_plan`); the
    result is the same up to rounding.
    Raises SymphonyError for no calibration tokens or non-finite activations, ValueError for models of
    different shapes."""
    from symphony_kernels.correlation import CorrelationAccumulator
    from symphony_kernels.matching import linear_assignment

    layers_a, layers_b = decoder_layers(anchor_model), decoder_layers(source_model)
    f_a = layers_a[0].mlp.down_proj.in_features
    f_b = layers_b[0].mlp.down_proj.in_features
    if len(layers_a) != len(layers_b) or f_a != f_b:
        raise ValueError(f"the models differ: {len(layers_a)} layers x {f_a} neurons against "
                         f"{len(layers_b)} layers x {f_b}")
    n_layers = len(layers_a)
    layers_per_pass = _positive_int(n_layers if layers_per_pass is None else layers_per_pass, "layers_per_pass")
    batches = list(batches)
    source_batches = batches if source_batches is None else list(source_batches)
    if len(source_batches) != len(batches) or any(x.shape != y.shape for x, y in zip(batches, source_batches)):
        raise ValueError("source_batches must hold the same windows as batches")
    if sum(x.numel() for x in batches) == 0:
        raise SymphonyError("no calibration tokens")
    device = _model_device(anchor_model)
    if update_tokens is None:
        update_tokens = default_update_tokens(device)
    plan = chunk_plan([x.numel() for x in batches], update_tokens)
    names = (anchor_name, source_name)
    perms, before, after, tokens = [], [], [], 0
    groups = [list(range(a, min(a + layers_per_pass, n_layers))) for a in range(0, n_layers, layers_per_pass)]
    for group in groups:
        acc = CorrelationAccumulator(len(group), f_a, f_b, device=device, scratch_bytes=_scratch_bytes(device))
        desc = f"align {source_name}" + (f" (layers {group[0]}-{group[-1]})" if len(groups) > 1 else "")
        stop = group[-1] < n_layers - 1
        with capture_ffn_activations(anchor_model, group, stop_early=stop) as cap_a, \
                capture_ffn_activations(source_model, group, stop_early=stop) as cap_b, \
                tqdm(total=len(batches), desc=desc, unit="batch", disable=not progress, leave=False) as bar:
            for chunk in plan:
                xa, xb = _chunk_activations((cap_a, cap_b), [batches[j] for j in chunk],
                                            [source_batches[j] for j in chunk], device, names, group)
                acc.update(xa, xb)
                del xa, xb
                bar.update(len(chunk))
        corr = acc.correlation()  # [group, f_a, f_b] fp32
        tokens = int(acc.count)
        del acc  # its float64 state is not needed during matching
        if not torch.isfinite(corr).all():  # the accumulator defines constant neurons as 0: anything else is a bug
            raise RuntimeError("the correlation matrix holds non-finite values")
        perm = linear_assignment(corr, maximize=True, solver=solver).long()
        before.append(torch.diagonal(corr, dim1=1, dim2=2).double().mean(dim=1).cpu())
        after.append(corr.gather(2, perm.to(corr.device)[:, :, None]).squeeze(2).double().mean(dim=1).cpu())
        perms.append(perm.cpu())
        del corr
    perm = torch.cat(perms)
    moved = (perm != torch.arange(f_a)).double().mean(dim=1)
    return PairAlignment(perm=perm, before=torch.cat(before).tolist(), after=torch.cat(after).tolist(),
                         tokens=tokens, moved=moved.tolist())


def _chunk_activations(caps, ids_a: list, ids_b: list, device, names, group):
    """The FFN activations ([layers, tokens, f] of the anchor, then of the source) of the forwards over the
    batches of one update, concatenated along tokens in batch order; each batch is checked finite first.
    One batch: the captures' own tensors. Several: a chunk buffer per model, filled batch by batch, so at
    most the two chunks and one batch's capture are held."""
    out = []
    for cap, ids, name in zip(caps, (ids_a, ids_b), names):
        if len(ids) == 1:
            x = cap.run(ids[0]).to(device)
            _check_finite(x, name, group)
            out.append(x)
            continue
        total, at, buf = sum(b.numel() for b in ids), 0, None
        for batch in ids:
            x = cap.run(batch).to(device)
            _check_finite(x, name, group)
            if buf is None:
                buf = x.new_empty((x.shape[0], total, x.shape[2]))
            buf[:, at:at + x.shape[1]].copy_(x)
            at += x.shape[1]
            del x
        out.append(buf)
    return out[0], out[1]


def _check_finite(x: torch.Tensor, name: str, layers: list[int]):
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1)
    if bool(bad.any()):
        layer = layers[int(bad.nonzero()[0, 0])]
        raise SymphonyError(f"{name!r} gives non-finite FFN activations in layer {layer} on the calibration text "
                            "(NaN/inf weights, or a dtype that overflows?)")


@dataclass
class AlignmentResult:
    """The outcome of `align_sources`: `perms[i]` [layers, f] per source (the identity for the anchor) and a
    JSON-ready `report`."""

    perms: list[torch.Tensor]
    report: dict = field(default_factory=dict)

    def table(self) -> str:
        """A printable table: per layer, the mean matched correlation of each source before -> after."""
        sources = [s for s in self.report["sources"] if not s["anchor"]]
        if not sources:
            return "alignment: no source besides the anchor"
        heads = [s["name"] for s in sources]
        width = max(15, *map(len, heads))
        lines = [f"FFN alignment to anchor {self.report['anchor']!r}: mean matched neuron correlation, "
                 "before -> after",
                 "layer  " + "  ".join(f"{h:>{width}}" for h in heads)]
        n_layers = len(sources[0]["layers"])
        for l in range(n_layers):
            cells = [f"{s['layers'][l]['before']:+.3f} -> {s['layers'][l]['after']:+.3f}" for s in sources]
            lines.append(f"{l:>5}  " + "  ".join(f"{c:>{width}}" for c in cells))
        cells = [f"{s['mean_before']:+.3f} -> {s['mean_after']:+.3f}" for s in sources]
        lines.append(f"{'mean':>5}  " + "  ".join(f"{c:>{width}}" for c in cells))
        moved = [_mean([layer["moved"] for layer in s["layers"]]) for s in sources]
        lines.append("moved  " + "  ".join(f"{100 * m:>{width - 1}.1f}%" for m in moved))
        lines.append("tokens " + "  ".join(f"{s['tokens']:>{width}}" for s in sources)
                     + f"   (solver {self.report['solver']})")
        return "\n".join(lines)


def _source_name(source, i: int) -> str:
    """`source.name`, else the name of its folder."""
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    path = getattr(source, "path", source)
    return Path(path).name if isinstance(path, (str, Path)) else f"source{i}"


def _load_source(source, device, dtype):
    """A dense model in eval mode on `device` in `dtype`: `source.load_model(device=, dtype=)` when the
    source offers it (symphony.sources.Source), else transformers' from_pretrained on `source.path` (or on
    `source` itself, a folder)."""
    from symphony.data import quiet_zero_size_init

    if hasattr(source, "load_model"):
        with quiet_zero_size_init():
            model = source.load_model(device=device, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        path = getattr(source, "path", source)
        try:
            with quiet_zero_size_init():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - a bad checkpoint, said in one line
            raise SymphonyError(f"cannot load the model in {path}: {e}") from e
        model = model.to(device)
    return model.eval()


def align_sources(sources, anchor_index: int, calib_ids: torch.Tensor, *, device="cpu", dtype=torch.float32,
                  batch_size: int = 8, seq_len: int = 512, max_tokens: int | None = None, solver: str = "auto",
                  id_maps=None, layers_per_pass: int | None = None, update_tokens: int | None = None,
                  progress: bool = True) -> AlignmentResult:
    """Align every non-anchor source's FFN neurons to the anchor's (see the module docstring).

    sources: objects with `.name` and `.path` (symphony.sources.Source, which may also offer
    `load_model(device=, dtype=)`), or model folders. calib_ids: a 1-D stream of token ids in the calibration
    vocabulary (the anchor's unless `id_maps` says otherwise). id_maps: None, or one entry per source (None =
    the calibration ids are that source's ids; else a 1-D tensor calibration id -> source id, -1 if missing).
    At most two models are in memory at once: the anchor, loaded once, and one source at a time (the
    anchor's forwards are repeated for every source). `layers_per_pass` bounds the correlation memory and
    `update_tokens` sets the tokens per accumulator update (see `align_models`; `auto_layers_per_pass` picks
    layers_per_pass for a memory budget); solver: symphony_kernels.matching's ("auto", "scipy", "auction").

    Returns an AlignmentResult: perms[i] [layers, f] int64 on the CPU (identity for the anchor); report =
    {"anchor", "solver", "seq_len", "batch_size", "max_tokens", "layers_per_pass", "update_tokens", "dtype",
    "device",
    "sources": [{"name", "anchor", "tokens",
    "dropped_tokens", "seconds", "mean_before", "mean_after", "layers": [{"layer", "before", "after",
    "moved"}]}]} where "moved" is the fraction of the layer's neurons that the permutation moves.
    """
    sources = list(sources)
    if len(sources) < 1:
        raise ValueError("align_sources needs at least one source")
    if isinstance(anchor_index, bool) or not isinstance(anchor_index, int) or not 0 <= anchor_index < len(sources):
        raise ValueError(f"anchor_index must be in [0, {len(sources)}), not {anchor_index!r}")
    calib_ids = _check_stream(calib_ids)
    if int(calib_ids.min()) < 0:
        raise ValueError("calibration token ids must be non-negative")
    calib_windows_kw = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    calibration_windows(calib_ids[:1], **calib_windows_kw)  # checks the numbers before any heavy work
    if layers_per_pass is not None:
        _positive_int(layers_per_pass, "layers_per_pass")
    device = torch.device(device)
    update_tokens = _positive_int(default_update_tokens(device) if update_tokens is None else update_tokens,
                                  "update_tokens")
    from symphony_kernels.matching import SOLVERS

    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    if id_maps is None:
        id_maps = [None] * len(sources)
    if len(id_maps) != len(sources):
        raise ValueError(f"id_maps has {len(id_maps)} entries for {len(sources)} sources")
    n_calib_vocab = int(calib_ids.max()) + 1
    id_maps = [_check_id_map(m, n_calib_vocab, i) for i, m in enumerate(id_maps)]
    names = [_source_name(s, i) for i, s in enumerate(sources)]
    for i, source in enumerate(sources):  # cheap vocabulary check from the configs, before loading any model
        vocab = getattr(getattr(source, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and id_maps[i] is None and n_calib_vocab > vocab:
            raise SymphonyError(f"calibration token id {n_calib_vocab - 1} is outside the vocabulary of "
                                f"{names[i]!r} ({vocab} tokens); give an id map for this source")

    anchor = _load_source(sources[anchor_index], device, dtype)
    layers = decoder_layers(anchor)
    f = layers[0].mlp.down_proj.in_features
    identity = torch.arange(f).expand(len(layers), f).clone()
    perms: list[torch.Tensor | None] = [None] * len(sources)
    perms[anchor_index] = identity
    entries: list[dict | None] = [None] * len(sources)
    entries[anchor_index] = {"name": names[anchor_index], "anchor": True, "tokens": 0, "dropped_tokens": 0,
                             "seconds": 0.0, "mean_before": 1.0, "mean_after": 1.0,
                             "layers": [{"layer": l, "before": 1.0, "after": 1.0, "moved": 0.0}
                                        for l in range(len(layers))]}
    try:
        for i, source in enumerate(sources):
            if i == anchor_index:
                continue
            start = time.perf_counter()
            ids_a, ids_b, dropped = _pair_streams(calib_ids, id_maps[anchor_index], id_maps[i])
            if ids_a.numel() == 0:
                raise SymphonyError(f"no calibration token is known to both {names[anchor_index]!r} and {names[i]!r}")
            _check_ids_fit(ids_a, anchor, names[anchor_index])
            model = _load_source(source, device, dtype)
            try:
                _check_ids_fit(ids_b, model, names[i])
                batches_a = calibration_windows(ids_a, **calib_windows_kw)
                batches_b = calibration_windows(ids_b, **calib_windows_kw)
                try:
                    pair = align_models(anchor, model, batches_a, source_batches=batches_b, solver=solver,
                                        progress=progress, anchor_name=names[anchor_index], source_name=names[i],
                                        layers_per_pass=layers_per_pass, update_tokens=update_tokens)
                except ValueError as e:
                    raise SymphonyError(f"cannot align {names[i]!r} to {names[anchor_index]!r}: {e}") from e
            finally:
                del model
            perms[i] = pair.perm
            entries[i] = {"name": names[i], "anchor": False, "tokens": pair.tokens, "dropped_tokens": dropped,
                          "seconds": round(time.perf_counter() - start, 3),
                          "mean_before": _mean(pair.before), "mean_after": _mean(pair.after),
                          "layers": [{"layer": l, "before": b, "after": a, "moved": m}
                                     for l, (b, a, m) in enumerate(zip(pair.before, pair.after, pair.moved))]}
    finally:
        del anchor
    report = {"anchor": names[anchor_index], "solver": solver, "seq_len": seq_len, "batch_size": batch_size,
              "max_tokens": max_tokens, "layers_per_pass": layers_per_pass, "update_tokens": update_tokens,
              "dtype": str(dtype).replace("torch.", ""), "device": str(device),
              "sources": entries}
    return AlignmentResult(perms=perms, report=report)


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _check_ids_fit(ids: torch.Tensor, model, name: str):
    vocab = _vocab_size(model)
    top = int(ids.max())
    if top >= vocab:
        raise SymphonyError(f"calibration token id {top} is outside the vocabulary of {name!r} ({vocab} tokens); "
                            "give an id map for this source")


# ---------------------------------------------------------------------------------------------------------
# Hidden-state centroids and the "hidden" router initialisation
# ---------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def _model_centroids(model, stream: torch.Tensor, *, seq_len, batch_size, max_tokens, progress, desc):
    """([layers, d] mean of unit-normalised FFN inputs, [layers] mean FFN-input norm) of one model on a stream."""
    layers = decoder_layers(model)
    sums, norm_sums, count = None, None, 0

    def make_hook(index):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            n = x.norm(dim=1, keepdim=True)
            sums[index] += (x / n.clamp_min(1e-12)).sum(0, dtype=torch.float64)
            norm_sums[index] += n.sum(dtype=torch.float64)
        return hook

    d = layers[0].mlp.gate_proj.in_features
    device = _model_device(model)
    sums = torch.zeros(len(layers), d, dtype=torch.float64, device=device)
    norm_sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    handles = [layer.mlp.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in tqdm(calibration_windows(stream, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens),
                        desc=desc, unit="batch", disable=not progress, leave=False):
            _forward(model, ids)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    cent, norm = (sums / count).float().cpu(), (norm_sums / count).float().cpu()
    if not (torch.isfinite(cent).all() and torch.isfinite(norm).all()):
        layer = int((~torch.isfinite(cent).all(dim=1) | ~torch.isfinite(norm)).nonzero()[0, 0])
        raise SymphonyError(f"{desc}: non-finite hidden states in layer {layer} (NaN/inf weights?)")
    return cent, norm


def hidden_centroids(sources, texts_ids_per_source, *, device="cpu", dtype=torch.float32, batch_size: int = 8,
                     seq_len: int = 512, max_tokens: int | None = None, runner=None,
                     return_norms: bool = False, progress: bool = True):
    """Per layer, the mean unit-normalised hidden state at the FFN input of each source on its own text.

    The FFN input is the output of the layer's post_attention_layernorm (what a router sees). Each token's
    vector is scaled to unit L2 norm before averaging, so every token counts the same; the centroid of
    source s at layer l is the mean over the tokens of texts_ids_per_source[s] (a 1-D stream in the
    vocabulary of the model that runs it). With runner=None, each source's own model runs its own text (one
    model in memory at a time); with runner=r (an index into `sources`, or another source such as the anchor
    when it gives no expert), that one model runs every text, which places all centroids in one hidden space.
    On the fixture family the anchor as runner gave the better router (benchmarks/align_effect.py, second
    table: held-out loss 2.825 against 2.855 with each source's own model, 3 seeds).

    Returns a float32 CPU tensor [layers, n_sources, d]; with return_norms, also [layers, n_sources], the mean
    L2 norm of the FFN inputs (for `router_from_centroids`). Deterministic for the same inputs.
    """
    sources = list(sources)
    texts = list(texts_ids_per_source)
    if len(sources) < 1 or len(texts) != len(sources):
        raise ValueError(f"need one token stream per source: {len(texts)} streams for {len(sources)} sources")
    names = [_source_name(s, i) for i, s in enumerate(sources)]
    texts = [_check_stream(t, f"text of {names[i]!r}") for i, t in enumerate(texts)]
    if isinstance(runner, bool) or (isinstance(runner, int) and not 0 <= runner < len(sources)):
        raise ValueError(f"runner must be None, an index in [0, {len(sources)}) or a source, not {runner!r}")
    if isinstance(runner, int):
        runner = sources[runner]
    for t in texts:
        calibration_windows(t[:1], seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)  # arg checks
    device = torch.device(device)
    cents, norms = [], []
    runner_name = None if runner is None else _source_name(runner, -1)
    runner = None if runner is None else _load_source(runner, device, dtype)
    try:
        for i, source in enumerate(sources):
            model = runner if runner is not None else _load_source(source, device, dtype)
            model_name = runner_name if runner is not None else names[i]
            _check_ids_fit(texts[i], model, model_name)
            c, n = _model_centroids(model, texts[i], seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                                    progress=progress, desc=f"centroids {names[i]}")
            cents.append(c)
            norms.append(n)
            del model
    finally:
        del runner
    if len({c.shape for c in cents}) != 1:
        raise SymphonyError("the sources differ in layers or hidden size")
    out = torch.stack(cents, dim=1)
    return (out, torch.stack(norms, dim=1)) if return_norms else out


def router_from_centroids(centroids: torch.Tensor, *, experts_per_source=1, norms: torch.Tensor | None = None,
                          scale: float = 8.0, center: bool = True) -> torch.Tensor:
    """Router weights [layers, E, d] (float32) from hidden-state centroids [layers, n_sources, d].

    Per layer: each source's centroid is scaled to unit norm (a zero centroid stays zero); with `center`, the
    mean of these unit rows is subtracted from every row; the rows are multiplied by `scale` and divided by
    the layer's mean FFN-input norm R (`norms` [layers, n_sources] from hidden_centroids(return_norms=True),
    averaged over sources; R = 1 when not given). Source s's row is repeated for each of its
    `experts_per_source[s]` experts (an int: the same for all), in source order; equal rows give equal scores
    and ties go to the lower expert id.

    So for a token x of the typical norm R, logit_e - logit_f = scale * (cos(x, c_e) - cos(x, c_f)): the
    router prefers the source whose centroid direction is closest to x. Centring subtracts the same number
    from every expert's logit, so it leaves softmax routing unchanged; it removes the direction all sources
    share, so that logits are centred on 0 (what sigmoid scoring needs) and show only the differences. With
    a single source centring leaves a zero row.

    Measured (benchmarks/align_effect.py, second table: 3 fixture Qwen2 sources, whole-FFN experts top-2 of 3,
    no router training, 3 seeds): these rows give a held-out loss of 2.855 (2.825 with the anchor as the
    centroids' runner) against 2.948 for centroids centred before the unit norm, 2.928 for raw centroids,
    2.919 for zero routers and 2.986 for random ones; 61% of layer-1 tokens go to their own domain's source
    first, against 51% and 49%. Stage 2 then trains the routers from there.
    """
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 3:
        raise ValueError("centroids must be a [layers, n_sources, d] tensor")
    L, N, d = centroids.shape
    counts = [experts_per_source] * N if isinstance(experts_per_source, int) else list(experts_per_source)
    if len(counts) != N or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(f"experts_per_source must be a positive int or {N} positive ints, not {experts_per_source!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, not {scale!r}")
    c = centroids.float()
    n = c.norm(dim=2, keepdim=True)
    u = torch.where(n > 1e-12, c / n.clamp_min(1e-12), torch.zeros_like(c))
    if center:
        u = u - u.mean(dim=1, keepdim=True)
    if norms is None:
        r = torch.ones(L, 1, 1)
    else:
        if not isinstance(norms, torch.Tensor) or norms.shape != (L, N):
            raise ValueError(f"norms must be a [layers={L}, n_sources={N}] tensor")
        r = norms.float().mean(dim=1).clamp_min(1e-12)[:, None, None]
    rows = u * (scale / r)
    index = torch.repeat_interleave(torch.arange(N), torch.tensor(counts))
    return rows[:, index].contiguous()
