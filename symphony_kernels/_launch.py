"""How the Triton kernels are launched: a cache of compiled variants with a short launch path, and compilation in
the background for eager inference.

Launch path. `Kernel(jit_fn)` wraps a @triton.jit function whose per-call integers (token and tile counts)
are `do_not_specialize` (the kernels' `*_DNS` lists), so a compiled variant depends on the constexprs, the
launch options (num_warps, num_stages), the dtypes of the pointer arguments and their 16-byte alignment, the
integer width, the device, and, for every other integer (strides and sizes, fixed per model), what Triton
specialises it on: being 1 (then a constant) or a multiple of 16. When every pointer is 16-byte aligned and
every integer fits in int32, `Kernel.launch` keys its cache on exactly these and calls the compiled kernel's
launcher directly: a few microseconds instead of Triton's full argument binding and specialisation per
launch. Anything else (the interpreter, unaligned views, huge sizes, a launch hook set by a profiler) takes
Triton's own `fn[grid](...)`, which is always correct.

Replays. An eager inference call whose shapes were seen before replays the earlier call's launches
(`Replay`): no configuration, key or check work. A call's int32 buffers lie in one allocation (`Workspace`):
one allocator call per call instead of one per buffer, and a replay hands the pieces to the kernels as raw
addresses (no per-pointer query in Triton's launcher); only the pieces the caller reads become tensors.

Background compilation. The first call of a variant compiles it: 0.5-3 s per kernel with ptxas, several
kernels per shape class, so the first `generate()` of a process would stall for seconds. In eager inference
(no gradient needed, no CUDA-graph capture under way) `Call.ready()` says whether every variant the call needs
is compiled; if not, `Call.compile_in_background()` hands the missing ones to a worker thread (Triton's own
`warmup`, on 16-byte dummy tensors of the same dtypes) and the caller computes this call another way (see
`experts.moe_experts`); later calls take the kernels once they are ready. `set_compile_mode("blocking")` (or
the environment variable SYMPHONY_COMPILE=blocking) compiles in the caller instead, as training and
`torch.compile` always do; `symphony_kernels.warmup(...)` compiles a model's variants ahead of time.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_MODES = ("background", "blocking")
_mode = os.environ.get("SYMPHONY_COMPILE", "background")
if _mode not in _MODES:
    raise ValueError(f"SYMPHONY_COMPILE must be one of {', '.join(_MODES)}, not {_mode!r}")
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
INT32_MAX = 2**31 - 1


def set_compile_mode(mode: str) -> str:
    """"background" (the default: eager inference never waits for a compile) or "blocking" (every call runs
    the kernels, compiling them first if needed). Returns the previous mode."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"compile mode must be one of {', '.join(_MODES)}, not {mode!r}")
    previous, _mode = _mode, mode
    return previous


def compile_mode() -> str:
    return _mode


def _pool() -> ThreadPoolExecutor:
    """The compile workers (created on first use; the caller holds _lock)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="symphony-compile")
    return _executor


class Kernel:
    """A @triton.jit function with a cache of its compiled variants (see the module docstring). Its
    constexpr parameters must come after all the others."""

    def __init__(self, fn):
        self.fn = fn
        params = list(getattr(fn, "params", []))
        flags = [p.is_constexpr for p in params]
        if flags and flags != sorted(flags):
            raise TypeError(f"{fn}: constexpr parameters must come last")
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        # per positional (non-constexpr) argument: does Triton specialise it (an int: on == 1 and % 16 == 0)?
        self.specialised = tuple(not p.do_not_specialize for p in params if not p.is_constexpr)
        self.variants: dict = {}   # key -> (CompiledKernel, constexpr values in parameter order)
        self.pending: dict = {}    # key -> Future of a background compile
        self.failed: set = set()   # keys whose background compile raised: compiled in the caller (who sees why)

    def key(self, args: tuple, meta: tuple, device: int):
        """The variant of a launch (what Triton would specialise it on, see the module docstring), or None when
        the short path does not apply (an unaligned pointer, an integer beyond int32): then Triton's own launch
        specialises it."""
        sig = []
        specialised = self.specialised or (True,) * len(args)
        for a, spec in zip(args, specialised):
            if type(a) is int:
                if not -INT32_MAX <= a <= INT32_MAX:
                    return None
                if spec:
                    sig.append(1 if a == 1 else 16 if a % 16 == 0 else 0)
            elif a.data_ptr() & 15:
                return None
            else:
                sig.append(a.dtype)
        return meta, tuple(sig), device

    def launch(self, grid: tuple, args: tuple, meta: tuple, device: int):
        """Launch on `grid` with positional `args` (every non-constexpr parameter) and `meta` (a tuple of
        (name, value) pairs: the constexprs and num_warps / num_stages); `device` is the CUDA device index
        (-1: not CUDA, Triton's own launch)."""
        key = self.key(args, meta, device) if device >= 0 and _no_launch_hook() else None
        if key is None:
            self.fn[grid](*args, **dict(meta))
            return
        entry = self.variants.get(key)
        if entry is None:
            future = self.pending.get(key)
            if future is not None:
                future.exception()  # being compiled in the background: wait for it (a failure: compiled below)
                entry = self.variants.get(key)
        if entry is None:
            self._store(key, self.fn[grid](*args, **dict(meta)), meta)
            return
        compiled, tail = entry
        g = grid + (1,) * (3 - len(grid))
        compiled.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)

    def _store(self, key, compiled, meta):
        if compiled is not None:
            values = dict(meta)
            self.variants[key] = (compiled, tuple(values[name] for name in self.constexpr_names))

    def ready(self, args: tuple, meta: tuple, device: int) -> bool:
        key = self.key(args, meta, device)
        return key is None or key in self.variants or key in self.failed

    def compile_async(self, args: tuple, meta: tuple, device: int):
        """Compile the variant of (args, meta) for CUDA device `device` in a worker thread, on dummy tensors of
        the same dtypes (`args` may be meta tensors). Returns the Future of that compile, or None when the
        variant is compiled already (or is not one the short path serves)."""
        key = self.key(args, meta, device)
        with _lock:
            if key is None or key in self.variants or key in self.failed:
                return None
            if key in self.pending:
                return self.pending[key]
            dev = torch.device("cuda", device)
            dummies = tuple(torch.empty(16, dtype=a.dtype, device=dev) if isinstance(a, torch.Tensor) else a
                            for a in args)
            future = self.pending[key] = _pool().submit(self._compile, key, dummies, meta, device)
            return future

    def _compile(self, key, args, meta, device):
        try:
            with torch.cuda.device(device):
                compiled = self.fn.warmup(*args, grid=(1,), **dict(meta))
                compiled._init_handles()  # load the module here, not in the caller's first launch
            self._store(key, compiled, meta)
        except Exception:
            self.failed.add(key)  # the next call compiles in place and raises the error there
            raise
        finally:
            with _lock:
                self.pending.pop(key, None)


class Call:
    """The launches of one public call, collected before any of them runs, so that the caller can ask whether
    they are all compiled (`ready`) and otherwise have them compiled in the background."""

    __slots__ = ("device", "torch_device", "launches", "buffers", "workspace")

    def __init__(self, device: torch.device):
        self.device = device.index if device.type == "cuda" else -1
        self.torch_device = device
        self.launches = []
        self.buffers = {}       # name -> the buffers the launches write (for a Replay)
        self.workspace = None   # (Workspace, its allocation) when some of the buffers are views of one allocation

    def add(self, kernel: Kernel, grid: tuple, args: tuple, meta: tuple):
        self.launches.append((kernel, grid, args, meta))

    def run(self):
        for kernel, grid, args, meta in self.launches:
            kernel.launch(grid, args, meta, self.device)

    def flush(self):
        """Run the launches collected so far and forget them (before work queued outside the call reads
        what they write)."""
        self.run()
        self.launches.clear()

    def ready(self) -> bool:
        return self.device < 0 or all(k.ready(args, meta, self.device) for k, _, args, meta in self.launches)

    def compile_in_background(self):
        for kernel, _, args, meta in self.launches:
            kernel.compile_async(args, meta, self.device)


def _round4(n: int) -> int:
    return -(-n // 4) * 4


class Workspace:
    """Where the int32 buffers of one call lie in one allocation: one allocator call (and at most one zero fill)
    instead of one per buffer. Built from (name, shape, zeroed) pieces; every piece starts on a 16-byte boundary
    (what the short launch path needs); the zeroed ones are filled in one go, so keep them adjacent. The
    launchers build one per size and keep it."""

    __slots__ = ("numel", "pieces", "split", "zero")

    def __init__(self, pieces):
        self.pieces, self.split, at, zero = [], [], 0, []
        for name, shape, zeroed in pieces:
            start, n = _round4(at), math.prod(shape)
            if start > at:
                self.split.append(start - at)
            self.pieces.append((name, tuple(shape), len(self.split), start, n, zeroed))
            self.split.append(n)
            if zeroed:
                zero += [start, start + n]
            at = start + n
        self.numel = max(4, _round4(at))
        if self.numel > at:
            self.split.append(self.numel - at)
        self.zero = (min(zero), max(zero)) if zero else None

    def alloc(self, call: Call, device: torch.device, separate: bool = False) -> dict:
        """name -> buffer: views of one new allocation, recorded in `call` (its buffers and workspace) for a
        Replay; or with `separate` one allocation each (what a custom op must return: outputs that alias
        nothing), not recorded (such a call is never replayed)."""
        if separate:
            return {name: (torch.zeros if zeroed else torch.empty)(shape, dtype=torch.int32, device=device)
                    for name, shape, _, _, _, zeroed in self.pieces}
        ws = torch.empty(self.numel, dtype=torch.int32, device=device)
        if self.zero is not None:
            ws[self.zero[0]:self.zero[1]].zero_()
        parts = ws.split_with_sizes(self.split)
        bufs = {name: parts[i] if len(shape) == 1 else parts[i].view(shape) for name, shape, i, _, _, _ in self.pieces}
        call.workspace = (self, ws)
        call.buffers.update(bufs)
        return bufs


class Replay:
    """The launches of one call, recorded with the role of every tensor argument, replayed for a later call of
    the same shapes, dtypes and strides with that call's tensors: no configuration, key, check or argument work
    per call (the eager decode path). Each replay allocates the call's buffers afresh: the workspace in one go
    (its pieces reach the kernels as raw addresses; the `keep` ones also come back as tensors), the others one
    by one. Recorded only from calls whose every variant is compiled and served by the short path."""

    __slots__ = ("steps", "fresh", "device", "torch_device", "workspace")

    def __init__(self, calls: list, inputs: dict, keep: tuple):
        self.device, self.torch_device = calls[0].device, calls[0].torch_device
        spaces = [c.workspace for c in calls if c.workspace is not None]
        if len(spaces) > 1:
            raise ValueError("a replay takes one workspace at most")
        at = {}  # workspace piece -> (byte offset, its entry)
        self.workspace = None
        if spaces:
            space = spaces[0][0]
            at = {p[0]: (4 * p[3], p) for p in space.pieces}
            views, split, end = [], [], 0
            for name, shape, _, start, n, _ in sorted((p for p in space.pieces if p[0] in keep), key=lambda p: p[3]):
                if start > end:
                    split.append(start - end)
                views.append((name, len(split), shape if len(shape) != 1 else None))
                split.append(n)
                end = start + n
            if space.numel > end:
                split.append(space.numel - end)
            self.workspace = (space.numel, space.zero, tuple(split), tuple(views))
        buffers = {name: t for c in calls for name, t in c.buffers.items()}
        self.fresh = [(name, tuple(t.shape), t.dtype) for name, t in buffers.items() if name not in at]
        by_id = {id(t): name for name, t in {**inputs, **buffers}.items()}
        self.steps = []
        for kernel, grid, args, meta in (launch for c in calls for launch in c.launches):
            compiled, tail = kernel.variants[kernel.key(args, meta, self.device)]
            fixed, slots = [], []  # the arguments that stay (the constexprs' values appended) and the others
            for i, a in enumerate(args):
                fixed.append(None if isinstance(a, torch.Tensor) else a)
                if not isinstance(a, torch.Tensor):
                    continue
                if id(a) not in by_id:
                    raise ValueError("every tensor argument of a replayed launch needs a role")
                role = by_id[id(a)]
                slots.append((i, False, at[role][0]) if role in at else (i, True, role))
            g = grid + (1,) * (3 - len(grid))
            self.steps.append((compiled, g, fixed + list(tail), tuple(slots)))

    @classmethod
    def record(cls, calls: list, inputs: dict, keep: tuple = ()):
        """A Replay of `calls` (run in this order; `inputs`: role -> the caller's tensors; `keep`: the workspace
        pieces the caller reads afterwards), or None when some launch does not take the short path or is not
        compiled."""
        if calls[0].device < 0 or not _no_launch_hook():
            return None
        for kernel, _, args, meta in (launch for c in calls for launch in c.launches):
            key = kernel.key(args, meta, calls[0].device)
            if key is None or key not in kernel.variants:
                return None
        return cls(calls, inputs, keep)

    def run(self, tensors: dict) -> dict:
        """Allocate the buffers and launch every step; `tensors`: role -> the caller's tensors. Returns `tensors`
        with the fresh buffers and the kept workspace views added."""
        dev = self.torch_device
        for name, shape, dtype in self.fresh:
            tensors[name] = torch.empty(shape, dtype=dtype, device=dev)
        ws, base = None, 0
        if self.workspace is not None:
            numel, zero, split, views = self.workspace
            ws = torch.empty(numel, dtype=torch.int32, device=dev)  # (freed after the launches are queued: the
            base = ws.data_ptr()                                     # allocator reuses it in stream order)
            if zero is not None:
                ws[zero[0]:zero[1]].zero_()
            if views:
                parts = ws.split_with_sizes(split)
                for name, i, shape in views:
                    tensors[name] = parts[i] if shape is None else parts[i].view(shape)
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        for compiled, g, fixed, slots in self.steps:
            args = fixed.copy()
            for i, tensor, v in slots:  # a tensor by its role, or a workspace piece by its byte offset
                args[i] = tensors[v] if tensor else base + v
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
        return tensors


try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - no triton: no kernels
    _knobs = None


def _no_launch_hook() -> bool:
    """No launch hook is set (a profiler's, say): Triton 3.6 keeps them in chains that are never None."""
    rt = _knobs.runtime
    return not (getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
                or getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))


def may_defer(needs_grad: bool) -> bool:
    """True when a call may run without its kernels while they compile: background mode, eager inference
    (no gradient), no CUDA-graph capture under way, not inside torch.compile's tracing."""
    return (_mode == "background" and not needs_grad and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())
