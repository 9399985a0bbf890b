"""The peer of bench_peer.py: vLLM's fused-MoE Triton kernel with its tuned tables, driven as vLLM's
`fused_experts` drives it for unquantized weights, by a launcher written here.

The kernel itself is not in this project: `tools/make_peer.py` copies it (and vLLM's tuned tables) into a
git-ignored folder, and `Peer(folder)` imports it from there. What vLLM runs as CUDA ops around the kernel is
done here in its place, with the same results:
- routing: softmax in float32, top-k, renormalise (vLLM's fused top-k op) -> `route`;
- `moe_align_block_size` (a CUDA op in vLLM) -> `align`, the same outputs in plain torch ops (no host sync, so
  it can be captured in a CUDA graph): the (token, slot) pairs t*k+j grouped by expert, each expert's run
  padded with the sentinel T*k to a multiple of BLOCK_SIZE_M (empty experts take no block), the expert of
  every block, and the padded total; its buffers have vLLM's sizes (the kernel's grid follows them);
- vLLM's rule for few pairs over many experts (T*k*4 <= E): no alignment, one block per pair -> `assignment`;
- `silu_and_mul` (a CUDA op): silu(first half) * second half of each row -> a small Triton kernel here;
- `moe_sum` (a CUDA op): the sum over the k slots -> torch.sum.
Weights are vLLM's layout, which is transformers' and ours: w1 [E, 2f, d] (gate rows, then up rows),
w2 [E, d, f]. The tuned table is chosen as vLLM does: file E=..,N=f,device_name=..json, the entry whose batch
key is nearest to T (the first such in the file on a tie); the same entry serves both GEMMs.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

KERNEL_FILE = "vllm_fused_moe_kernel.py"
# The kernel's keyword arguments this launcher passes (the extracted kernel must take exactly these).
PARAMS = ("a_ptr", "b_ptr", "c_ptr", "b_bias_ptr", "a_scale_ptr", "b_scale_ptr", "topk_weights_ptr",
          "sorted_token_ids_ptr", "expert_ids_ptr", "num_tokens_post_padded_ptr", "N", "K", "EM",
          "num_valid_tokens", "stride_am", "stride_ak", "stride_be", "stride_bk", "stride_bn", "stride_cm",
          "stride_cn", "stride_asm", "stride_ask", "stride_bse", "stride_bsk", "stride_bsn", "stride_bbe",
          "stride_bbn", "group_n", "group_k", "naive_block_assignment", "BLOCK_SIZE_M", "BLOCK_SIZE_N",
          "BLOCK_SIZE_K", "GROUP_SIZE_M", "SPLIT_K", "MUL_ROUTED_WEIGHT", "top_k", "compute_type",
          "use_fp8_w8a8", "use_int8_w8a8", "use_int8_w8a16", "per_channel_quant", "HAS_BIAS", "SWAP_AB", "USE_TD")
TILE_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")
COMPUTE_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class PeerError(Exception):
    """The peer folder is missing, incomplete, or of a kernel this launcher does not drive."""


class Peer:
    """The extracted kernel and tuned tables of a folder written by tools/make_peer.py."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        manifest = folder / "manifest.json"
        if not manifest.is_file() or not (folder / KERNEL_FILE).is_file():
            raise PeerError(f"{folder} is not a peer folder (no manifest.json / {KERNEL_FILE}): "
                            "make it with `python tools/make_peer.py VLLM_SOURCE --out FOLDER`")
        self.folder = folder
        self.manifest = json.loads(manifest.read_text())
        params = tuple(self.manifest.get("kernel_params", ()))
        if params != PARAMS:
            raise PeerError(f"the kernel in {folder} takes parameters {', '.join(sorted(set(params) ^ set(PARAMS)))} "
                            "other than the launcher passes: this vLLM version's kernel is not supported")
        spec = importlib.util.spec_from_file_location("symphony_peer_kernel", folder / KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.kernel = module.fused_moe_kernel

    def about(self) -> dict:
        return {k: self.manifest.get(k) for k in ("vllm_version", "commit", "kernel_file", "kernel_file_sha256")}

    def table(self, E: int, N: int, device_name: str) -> dict[int, dict]:
        return read_table(self.folder / "configs" / table_name(E, N, device_name))


# ------------------------------------------------------------------------------------------- tuned tables
def device_file_name(name: str) -> str:
    """A CUDA device name as vLLM's table files spell it (every H200 variant reads the H200 tables)."""
    name = re.sub(r"[\s/]+", "_", name)
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def table_name(E: int, N: int, device_name: str) -> str:
    return f"E={E},N={N},device_name={device_file_name(device_name)}.json"


@functools.lru_cache(maxsize=None)
def read_table(path: Path) -> dict[int, dict]:
    """{batch size: tile config} of a tuned table, in the file's order (non-numeric keys dropped)."""
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise PeerError(f"no tuned table {path.name} in {path.parent} (it has {len(have)}: "
                        f"{', '.join(have[:6])}{' ...' if len(have) > 6 else ''})")
    table = {int(k): v for k, v in json.loads(path.read_text()).items() if k.isdigit()}
    for key, config in table.items():
        if not set(TILE_KEYS) <= set(config):
            raise PeerError(f"{path.name}: entry {key} lacks {', '.join(sorted(set(TILE_KEYS) - set(config)))}")
    if not table:
        raise PeerError(f"{path.name} has no batch-size entries")
    return table


def nearest(table: dict[int, dict], M: int) -> tuple[int, dict]:
    """The entry whose batch key is nearest to M (the first in the file's order on a tie)."""
    key = min(table, key=lambda b: abs(b - M))
    return key, table[key]


# ----------------------------------------------------------------------------------- routing and alignment
def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int32): softmax in float32, top-k, renormalised."""
    w, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def align_sizes(pairs: int, block: int, E: int) -> tuple[int, int]:
    """(length of sorted_ids, length of expert_ids) as vLLM allocates them."""
    size = pairs + E * (block - 1)
    if pairs < E:
        size = min(pairs * block, size)
    return size, triton.cdiv(size, block)


def align(topk_ids: torch.Tensor, block: int, E: int):
    """(sorted_ids int32, expert_ids int32, num_tokens_post_padded int32 [1]): see the module docstring.
    Within an expert the pairs keep their order."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    size, blocks = align_sizes(n, block, E)
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat.long(), torch.ones(n, dtype=torch.int64, device=flat.device))
    padded = (counts + block - 1) // block * block
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert = flat.long()[order]
    rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert]
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[expert] + rank] = order.to(torch.int32)
    starts = torch.arange(blocks, device=flat.device) * block
    expert_ids = torch.searchsorted(ends, starts, right=True).clamp_(max=E - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def assignment(topk_ids: torch.Tensor, block: int, E: int):
    """What the kernel reads to find its rows: `align`'s outputs, or for few pairs over many experts
    (pairs * 4 <= E) no sorted ids and one block per pair."""
    n = topk_ids.numel()
    if n * 4 <= E:
        return None, topk_ids.reshape(-1), torch.full((1,), n * block, dtype=torch.int32, device=topk_ids.device)
    return align(topk_ids, block, E)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, f, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + f + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[:, :f]) * x[:, f:] for x [S, 2f] (float32 inside, x's dtype out)."""
    S, f2 = x.shape
    f = f2 // 2
    out = torch.empty(S, f, dtype=x.dtype, device=x.device) if out is None else out
    if S:
        block = min(1024, triton.next_power_of_2(f))
        _silu_and_mul_kernel[(S, triton.cdiv(f, block))](x, out, f, x.stride(0), out.stride(0), BLOCK=block)
    return out


def gemm(peer: Peer, A, B, C, weights, assign, mul_weight: bool, top_k: int, config: dict):
    """C[pair] = A[pair // top_k] @ B[expert].T (times the pair's weight if mul_weight), as vLLM launches it."""
    sorted_ids, expert_ids, num_post = assign
    M = A.shape[0]
    BM = config["BLOCK_SIZE_M"]
    if sorted_ids is not None:
        EM = sorted_ids.numel()
        if M < BM:
            EM = min(EM, M * top_k * BM)
    else:
        EM = M * top_k * BM
    N, K = B.shape[1], B.shape[2]
    grid = (triton.cdiv(EM, BM) * triton.cdiv(N, config["BLOCK_SIZE_N"]),)
    peer.kernel[grid](
        a_ptr=A, b_ptr=B, c_ptr=C, b_bias_ptr=None, a_scale_ptr=None, b_scale_ptr=None, topk_weights_ptr=weights,
        sorted_token_ids_ptr=sorted_ids, expert_ids_ptr=expert_ids, num_tokens_post_padded_ptr=num_post, N=N, K=K,
        EM=EM, num_valid_tokens=M * top_k, stride_am=A.stride(0), stride_ak=A.stride(1), stride_be=B.stride(0),
        stride_bk=B.stride(2), stride_bn=B.stride(1), stride_cm=C.stride(1), stride_cn=C.stride(2), stride_asm=0,
        stride_ask=0, stride_bse=0, stride_bsk=0, stride_bsn=0, stride_bbe=0, stride_bbn=0, group_n=0, group_k=0,
        naive_block_assignment=sorted_ids is None, SPLIT_K=1, MUL_ROUTED_WEIGHT=mul_weight, top_k=top_k,
        compute_type=COMPUTE_TYPES[A.dtype], use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
        per_channel_quant=False, HAS_BIAS=False, SWAP_AB=False, USE_TD=False, **config)


def experts(peer: Peer, x, w1, w2, weights, ids, config: dict, assign=None) -> torch.Tensor:
    """The routed SwiGLU experts of x [T, d] (w1 [E, 2f, d], w2 [E, d, f]; weights float32 [T, k], ids [T, k]):
    up GEMM, silu_and_mul, down GEMM with the routing weight, sum over the k slots. `assign`: a precomputed
    `assignment(ids, config["BLOCK_SIZE_M"], E)`."""
    T, k = ids.shape
    E, f2, d = w1.shape
    config = {key: v for key, v in config.items() if key != "SPLIT_K"}
    if assign is None:
        assign = assignment(ids, config["BLOCK_SIZE_M"], E)
    cache13 = torch.empty(T * k * max(f2, d), dtype=x.dtype, device=x.device)
    up = cache13[:T * k * f2].view(T, k, f2)
    gemm(peer, x, w1, up, weights, assign, False, k, config)
    inter = silu_and_mul(up.view(T * k, f2))
    down = cache13[:T * k * d].view(T, k, d)
    gemm(peer, inter, w2, down, weights, assign, True, 1, config)
    return down.sum(dim=1)


def moe(peer: Peer, x, logits, w1, w2, k: int, table: dict[int, dict]) -> torch.Tensor:
    """Routing, alignment and experts from the router logits, with the tuned entry for T = x.shape[0]."""
    weights, ids = route(logits, k)
    return experts(peer, x, w1, w2, weights, ids, nearest(table, x.shape[0])[1])
