"""Memory of a build: the peak resident memory (and CUDA memory) of each stage, sampled while it runs, and what
each stage holds.

Memory. What each stage holds at once (host RAM unless said; "checkpoint" = the MoE's weights on disk):
- checks: configs, tokenizers, safetensors headers, the calibration token ids (the baseline: Python, torch and
  transformers, 0.43 GiB RSS here).
- alignment (only where it runs; symphony.build.align): the anchor and one source, loaded whole (on the CPU in
  float32, on CUDA in bfloat16), their forwards over one batch, and one pass's correlation memory
  (symphony.build.correlate.pass_memory: per layer of the pass 12 * f^2 bytes of float64 state and float32
  correlation matrix, plus the FFN activations of one accumulator update; once, the accumulator's scratch).
  `alignment.layers_per_pass: auto` puts as many layers in a pass as fit symphony.build.correlate.memory_budget (a
  quarter of the GPU memory free before the models load; on the CPU min(4 GiB, a quarter of the available
  RAM)); each further pass reruns both models' forwards. On CUDA the batches are concatenated into updates
  of 16384 tokens (the accumulator's per-update pass over its float64 state dominates below that), on the
  CPU each batch is its own update. Loading a source on the way to the GPU holds it on the host for a moment.
- router init "hidden" (symphony.build.router_init.hidden_centroids): one dense source at a time and one batch's
  activations.
- fusion + assembly (symphony.build.fusion, symphony.build.assemble): one output tensor plus the N source tensors it is
  made of (an attention weight: N + 1 tensors of d x d; an expert tensor: f x d and its permuted copy),
  float64 chunks of 4M elements per source, and the embedding / lm_head in 8192-row chunks (with
  `expert_layout: fused`, a layer's whole gate_up_proj, E x 2f x d). So it stays under about 1 GiB above the
  baseline for any model size.
- stage 2 (symphony.train.train_router): the whole MoE, loaded by transformers (on CUDA in bfloat16, the
  routers' float32 master copies and their AdamW states beside it: a few MB), the activations of one
  8 x 256-token batch kept for the backward pass (the routers of the first layer get their gradient through
  every layer above), then the save. In "router" mode nothing is reloaded any more: the save copies the
  stage 1 checkpoint tensor by tensor with the routers replaced (symphony.build.writer.replace_tensors, one
  tensor at a time), after the model is dropped. "full" mode still reloads the model whole on the host
  for its save (train.py: from_pretrained + save_pretrained). On disk, the stage 1 checkpoint and the
  trained one exist side by side until the end (2x the checkpoint).

Measured: `symphony build` prints each stage's peak RSS (sampled from /proc every 20 ms) and, on GPU, CUDA's
peak. On the CPU, 4 fixture sources of 63M parameters (float32, d=1024, f=4096, 4 layers), an 819 MiB
Qwen2-MoE, router_init hidden, 37568 calibration tokens, stage 2 5 steps of 8 x 128 tokens, made and built by
(from an empty folder, with the project installed; the second build took 24 min on 2 cores):

    python - <<'PY'
    import pathlib, yaml
    from symphony.testing import domain_text, make_family
    root, doms = pathlib.Path("mem"), ("prose", "code", "math", "legal")
    paths = make_family(root / "src", arch="qwen2", domains=doms, steps=1, base_steps=1, n_lines=100,
                        hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4)
    for d in doms:
        (root / f"{d}.txt").write_text("\\n".join(domain_text(d, 300)))
    for m in (1, 2):
        (root / f"build{m}.yaml").write_text(yaml.safe_dump({
            "sources": [{"path": f"src/{p.name}", "calibration": [f"{d}.txt"]} for p, d in zip(paths, doms)],
            "experts": {"per_source": m}, "device": "cpu",
            "router_training": {"steps": 5, "batch_size": 8, "seq_len": 128}}))
    PY
    symphony build mem/build1.yaml --out mem/moe1 --quiet
    symphony build mem/build2.yaml --out mem/moe2 --quiet

| peak RSS | checks (baseline) | alignment | router init | fusion + assembly | stage 2 |
|---|---|---|---|---|---|
| per_source 1 (alignment skipped) | 0.43 GiB | – | 1.08 GiB | 622 MiB | 2.70 GiB |
| per_source 2 (alignment: 1 pass of 4 layers) | 0.43 GiB | 2.54 GiB | 1.07 GiB | 680 MiB | 2.52 GiB |

Stage 2 was 3.66 / 3.65 GiB when its save reloaded the model and called save_pretrained. Its peak is now
the training itself, 2.1-2.3 GiB above the baseline for the 0.82 GiB checkpoint: the model, the checkpoint
file, which transformers keeps mmapped while some parameters are views of it (clean file pages that count
in RSS and that the kernel can reclaim; RssAnon / RssFile in /proc/self/status right after
`symphony.data.load_model("mem/moe1", device="cpu")`: 1.02 / 0.90 GiB), and the CPU training step; the save
itself holds one tensor at a time. Alignment: 2.1 GiB above the baseline: the two float32 sources (0.47
GiB) and one pass, which pass_memory bounds by 1.75 GiB (4 x 201 MB of state and matrix, 4 x 134 MB of one
4096-token batch of both models' float32 activations, 512 MiB of scratch).

Expected peaks (derived from the above, not measured), router mode on one 80 GB H100 (78 GiB free: an
alignment budget of 19.5 GiB), bfloat16, default settings (alignment batches 8 x 512 tokens, stage 2
batches 8 x 256):
- 4 x Qwen2.5-0.5B (24 layers, d=896, f=4864, tied 151936-token embedding) -> a 1.43B-parameter Qwen2-MoE,
  2.9 GB. Alignment (when it runs): 2 GB of models + one pass of all 24 layers, 18.5 GB (6.8 GB of state and
  matrix, 9.6 GB of activations: a 16384-token update and a 4096-token batch of both models, 2 GiB of
  scratch): about 21 GB of GPU. Hidden init: one source (1 GB). Stage 2: 2.9 GB of weights + activations
  (the experts keep [T*k, 3f] per layer for the backward, 0.12 GB per layer at T = 2048, k = 2: 2.9 GB; the
  logits, 2048 x 151936 in bf16 and float32 with their gradient, about 3 GB; hidden states and attention,
  about 1 GB): about 10 GB of GPU. Host: the baseline + about one checkpoint while a model is loaded on the
  CPU before it moves to the GPU (1 GB for a source, 2.9 GB, plus its file pages, for the MoE).
- 4 x 7B: Llama-2-7B (32 layers, d=4096, f=11008) -> a 19.7B-parameter Mixtral, 39 GB; Mistral-7B
  (f=14336) -> 24.2B, 48 GB. Assembly: still baseline + < 1 GiB. Hidden init: one source (13.5-14.5 GB of
  GPU). Alignment: 27-29 GB of models + one pass, 2.36 GB per layer at f=11008 (1.45 GB of state and matrix)
  and 3.64 GB at f=14336, so `auto` gives 5 passes of <= 7 layers (18.6 GB) or 7 passes of <= 5 layers
  (20.8 GB): about 47-51 GB of GPU. (One pass of all 32 layers, what alignment did before
  `layers_per_pass: auto`, holds 46.5 / 78.9 GB of state and matrix alone: 74-108 GB with the models, past
  an 80 GB GPU.) Stage 2: 39-48 GB of weights + activations (experts 0.27 / 0.35 GB per layer at T = 2048,
  8.7 / 11.3 GB; hidden states and attention about 5 GB; logits under 1 GB): about 55-66 GB, which fits one
  80 GB GPU. Host: the baseline + about one checkpoint while the MoE is loaded on the CPU before it moves to
  the GPU (39-48 GB of anonymous memory for the fused experts, plus up to as much in file pages), then one
  tensor at a time for the save.
- Full post-training (`router_training.train: full`): train.py keeps every parameter in float32 (4 bytes)
  with its float32 gradient (4) and AdamW's two float32 states (8): 16 bytes per parameter plus activations.
  4 x 0.5B: 23 GB + activations, about 30 GB: one 80 GB GPU. 4 x 7B: 316 GB (19.7B) / 386 GB (24.2B)
  before activations: beyond one GPU (even a 141 GB H200); it needs the parameters and optimizer states
  sharded over 4-8 GPUs (FSDP / ZeRO-3), which train.py does not do. Its save reloads the model whole on
  the host (39-48 GB) and writes it with save_pretrained.
"""
from __future__ import annotations

import os
import resource

import torch


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryMonitor:
    """Peak resident memory (RSS, sampled every 20 ms from /proc on Linux) and peak CUDA memory allocated by
    torch, per stage. `stage(name)` starts a stage; `peaks` maps each stage to {"rss", "cuda"} bytes."""

    def __init__(self, device: torch.device):
        import threading

        self.device, self.peaks, self._stage = device, {}, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.02):
            self._note()

    def _note(self):
        now = rss()
        stage = self._stage
        if stage is not None and now is not None:
            self.peaks[stage]["rss"] = max(self.peaks[stage]["rss"], now)

    def stage(self, name: str | None):
        self._note()
        if self._stage is not None and self.device.type == "cuda":
            self.peaks[self._stage]["cuda"] = torch.cuda.max_memory_allocated(self.device)
        if name is not None:  # the entry first: the sampling thread reads self.peaks[self._stage]
            self.peaks[name] = {"rss": rss() or 0, "cuda": 0}
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        self._stage = name

    def close(self):
        self.stage(None)
        self._stop.set()
        self._thread.join()


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
