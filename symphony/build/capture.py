"""FFN activation capture for alignment: the decoder layers of a dense model, forward hooks that catch the FFN
intermediate activations, and the calibration windows both models run over.

Calibration tokens. `calib_ids` is one 1-D stream of token ids (symphony.data.token_stream). It is cut into
non-overlapping windows of `seq_len` tokens (the shorter rest is a last window); when `max_tokens` is smaller
than the stream, whole windows evenly spaced over the stream are kept (so a mix of domains stays a mix).
Sources whose vocabularies differ get an id map (`id_maps[i]`: calibration id -> that source's id, -1 where the
source lacks the token): for each anchor/source pair, the positions that either of the two lacks are dropped
from the stream before windowing, and both models see the same filtered text.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from symphony.errors import SymphonyError


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


def vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def base_forward(model, ids: torch.Tensor):
    """One forward of the base model (no lm_head, no cache) over windows `ids` [b, s]."""
    _base_model(model)(input_ids=ids.to(model_device(model)), use_cache=False)


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
            _base_model(self._model)(input_ids=ids.to(model_device(self._model)), use_cache=False)
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


def check_stream(ids, what: str = "calibration text") -> torch.Tensor:
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
    ids = check_stream(ids)
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


def pair_streams(calib_ids: torch.Tensor, map_a, map_b) -> tuple[torch.Tensor, torch.Tensor, int]:
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


def check_id_map(m, n_calib_vocab: int, i: int):
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype.is_floating_point or m.dtype == torch.bool:
        raise TypeError(f"id_maps[{i}] must be a 1-D integer tensor (calibration id -> source id, -1 if missing)")
    if m.numel() < n_calib_vocab:
        raise ValueError(f"id_maps[{i}] maps {m.numel()} ids, but the calibration text uses ids up to "
                         f"{n_calib_vocab - 1}")
    return m.long().cpu()


def source_name(source, i: int) -> str:
    """`source.name`, else the name of its folder."""
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    path = getattr(source, "path", source)
    return Path(path).name if isinstance(path, (str, Path)) else f"source{i}"


def load_source(source, device, dtype):
    """A dense model in eval mode on `device` in `dtype`: `source.load_model(device=, dtype=)` when the
    source offers it (symphony.build.sources.Source), else transformers' from_pretrained on `source.path` (or on
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


def check_ids_fit(ids: torch.Tensor, model, name: str):
    vocab = vocab_size(model)
    top = int(ids.max())
    if top >= vocab:
        raise SymphonyError(f"calibration token id {top} is outside the vocabulary of {name!r} ({vocab} tokens); "
                            "give an id map for this source")
