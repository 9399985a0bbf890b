"""Small helpers shared by bench_generate.py and sweep_shapes.py: logging, the run's header (device, versions,
command), wall-clock timing on CPU or CUDA, atomic JSON writes, a time budget, and fresh compile caches."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Compile caches a cold measurement starts empty (more can be named on the command line, e.g. a tuner's cache).
FRESH_CACHE_ENV = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


def log(*a):
    print(*a, flush=True)


def base_parser(doc: str, tiny_help: str, quick_help: str) -> argparse.ArgumentParser:
    """The options both scripts share: --out, --device, --tiny, --quick."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (said once) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return None
    return plt


def header(device: str, argv) -> dict:
    """Device, library versions and the command line of this run."""
    import transformers
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "command": " ".join(["python", Path(sys.argv[0]).name] + [_portable(a) for a in argv])}


def _portable(arg) -> str:
    """A command-line argument as results record it: an absolute path by its last component (no machine's
    folders in the results)."""
    arg = str(arg)
    return Path(arg).name if arg.startswith("/") else arg


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def wall(fn, device: str) -> tuple[float, object]:
    """Seconds of one call of fn (device synchronised before and after) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_ms(fn, device: str, quick: bool = False) -> float:
    """Median milliseconds of fn after warm-up: triton's do_bench on CUDA, time.perf_counter on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median"))
    fn()
    return 1e3 * statistics.median(wall(fn, device)[0] for _ in range(3))


@contextlib.contextmanager
def blocking_compiles():
    """symphony_kernels compiles a missing kernel variant in the caller within this block. Its default for eager
    inference compiles in the background and computes the call on torch's grouped GEMM meanwhile, which would
    time that stand-in instead of the kernels."""
    import symphony_kernels as sk

    previous = sk.set_compile_mode("blocking")
    try:
        yield
    finally:
        sk.set_compile_mode(previous)


def compile_mode_of_new_processes() -> str:
    """The compile mode a new process starts in (symphony_kernels reads SYMPHONY_COMPILE at import)."""
    return os.environ.get("SYMPHONY_COMPILE", "background")


def write_json(path: Path, data) -> None:
    """Write JSON through a temporary file and a rename, so that a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Budget:
    """A wall-clock budget: `left()` seconds remain; `allows(s)` whether s more seconds fit."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, seconds: float, reserve: float = 0.0) -> bool:
        """Whether `seconds` more fit and still leave `reserve` seconds."""
        return self.elapsed() + seconds + reserve <= self.seconds


def fresh_cache_env(names, root: str) -> dict:
    """os.environ with each variable in names pointing at a new empty folder under root."""
    env = dict(os.environ)
    for name in names:
        env[name] = tempfile.mkdtemp(prefix=name.lower() + "-", dir=root)
    return env
