"""The correlation pass of alignment: anchor and source activations streamed into a correlation accumulator,
layers_per_pass layers at a time, then a linear assignment per layer (`align_models`); and the memory that pass
holds (`pass_memory`, `auto_layers_per_pass`, `memory_budget`).

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

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from symphony.build.capture import capture_ffn_activations, decoder_layers, model_device
from symphony.errors import SymphonyError

# Tokens per accumulator update on CUDA (see the module docstring); 1 (each batch on its own) elsewhere.
CUDA_UPDATE_TOKENS = 16384
# The accumulator's scratch bound (CorrelationAccumulator's scratch_bytes), passed to it explicitly so that
# `pass_memory` counts what it really uses.
_SCRATCH_BYTES = {"cuda": 2 << 30, "cpu": 512 << 20}
# The memory budget of the correlation pass on the CPU: at most this much (and at most a quarter of what is free).
CPU_BUDGET_BYTES = 4 << 30


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def default_update_tokens(device) -> int:
    """Tokens per accumulator update: CUDA_UPDATE_TOKENS on CUDA, 1 (each batch its own update) elsewhere."""
    return CUDA_UPDATE_TOKENS if torch.device(device).type == "cuda" else 1


def chunk_plan(batch_tokens, update_tokens: int) -> list[list[int]]:
    """Batch indices grouped into accumulator updates, in order: each group takes consecutive batches until it
    holds at least `update_tokens` tokens; the last group takes what is left. update_tokens=1: one batch each."""
    positive_int(update_tokens, "update_tokens")
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
        positive_int(v, name)
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
    positive_int(layers, "layers")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative integer, not {budget_bytes!r}")
    kw = dict(batch_tokens=batch_tokens, update_tokens=update_tokens, itemsize=itemsize, device=device)
    k = 1
    while k < layers and pass_memory(k + 1, f_a, f_b, **kw) <= budget_bytes:
        k += 1
    passes = math.ceil(layers / k)
    return math.ceil(layers / passes)


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
    layers_per_pass = positive_int(n_layers if layers_per_pass is None else layers_per_pass, "layers_per_pass")
    batches = list(batches)
    source_batches = batches if source_batches is None else list(source_batches)
    if len(source_batches) != len(batches) or any(x.shape != y.shape for x, y in zip(batches, source_batches)):
        raise ValueError("source_batches must hold the same windows as batches")
    if sum(x.numel() for x in batches) == 0:
        raise SymphonyError("no calibration tokens")
    device = model_device(anchor_model)
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
