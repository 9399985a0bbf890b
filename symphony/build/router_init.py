"""Router initialisation: hidden-state centroids of the sources (the "hidden" init) and the router weights of
every init kind.

Routers [E, d]: "zeros"; "random" (normal, std = the config's initializer_range, seeded); "hidden": the rows
of `router_from_centroids` (every expert of source s prefers tokens whose router-input hidden state points
like source s's mean hidden state on its own calibration text). With per_source > 1 the rows of one source get
a small seeded perturbation (HIDDEN_NOISE of their norm) so that its experts are not tied forever.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from symphony.build.capture import (check_ids_fit, check_stream, base_forward, load_source, model_device, source_name,
                                     calibration_windows, decoder_layers)
from symphony.errors import SymphonyError

# With per_source > 1, the router rows of one source get this much seeded noise (relative to their norm), so
# that its experts are not tied forever.
HIDDEN_NOISE = 1e-2


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
    device = model_device(model)
    sums = torch.zeros(len(layers), d, dtype=torch.float64, device=device)
    norm_sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    handles = [layer.mlp.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in tqdm(calibration_windows(stream, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens),
                        desc=desc, unit="batch", disable=not progress, leave=False):
            base_forward(model, ids)
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
    names = [source_name(s, i) for i, s in enumerate(sources)]
    texts = [check_stream(t, f"text of {names[i]!r}") for i, t in enumerate(texts)]
    if isinstance(runner, bool) or (isinstance(runner, int) and not 0 <= runner < len(sources)):
        raise ValueError(f"runner must be None, an index in [0, {len(sources)}) or a source, not {runner!r}")
    if isinstance(runner, int):
        runner = sources[runner]
    for t in texts:
        calibration_windows(t[:1], seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)  # arg checks
    device = torch.device(device)
    cents, norms = [], []
    runner_name = None if runner is None else source_name(runner, -1)
    runner = None if runner is None else load_source(runner, device, dtype)
    try:
        for i, source in enumerate(sources):
            model = runner if runner is not None else load_source(source, device, dtype)
            model_name = runner_name if runner is not None else names[i]
            check_ids_fit(texts[i], model, model_name)
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


def router_weights(kind: str, *, num_layers: int, num_experts: int, hidden_size: int, per_source: int,
                   seed: int, std: float = 0.02, hidden_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the [E, d] float32 router weight for init `kind` (see the module docstring); for "hidden",
    `hidden_rows` [layers, E, d] router_from_centroids."""
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
