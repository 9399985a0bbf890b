"""The streaming sharded safetensors writer of a build, and the tensor-by-tensor copy that replaces some tensors
of a checkpoint (what stage 2 saves in router mode).

The writer (`write_shards`) knows every tensor's name, shape and dtype up front (from the config), so each
shard's header is written first and each tensor is produced, written and dropped one at a time; the
embedding and lm_head are produced in row chunks. Shards follow transformers' naming
(model-00001-of-0000N.safetensors with model.safetensors.index.json; one shard: model.safetensor
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


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
