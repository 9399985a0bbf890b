"""Find the C++/CUDA extension (csrc/): the installed prebuilt one, else a just-in-time build, else none.

Order of attempts, once per process:
1. `symphony_kernels._C`, built by setup.py (`pip install --no-build-isolation .`, or `python setup.py build_ext
   --inplace` in a checkout); used if it imports and its API_VERSION matches this file's.
2. A JIT build of the shipped sources with `torch.utils.cpp_extension.load` (ninja) into a cache folder:
   `$SYMPHONY_EXT_CACHE`, else `$XDG_CACHE_HOME/symphony_kernels`, else `~/.cache/symphony_kernels`, one
   sub-folder per (sources, torch version, CUDA or not), so a second process reuses the build. CUDA sources are
   compiled in when torch has CUDA, a GPU is visible and nvcc is found.
3. Nothing: one warning says why, and callers use their plain-torch fallbacks (same results, slower).

`SYMPHONY_DISABLE_EXT=1` skips all of it (the fallback is forced). `info()` says what happened and which
backend serves which device; `backend_for(device)` is the choice the library makes.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import threading
import warnings
from pathlib import Path

import torch

API_VERSION = 1
DISABLE_ENV = "SYMPHONY_DISABLE_EXT"
CACHE_ENV = "SYMPHONY_EXT_CACHE"

_log = logging.getLogger("symphony_kernels")
_lock = threading.RLock()
_state: dict = {"tried": False, "module": None, "origin": None, "reason": None}


def disabled() -> bool:
    """True when SYMPHONY_DISABLE_EXT asks for the plain-torch fallback."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def sources_dir() -> Path:
    """The folder holding the C++/CUDA sources: the installed package data, else the checkout's csrc/."""
    try:
        spec = importlib.util.find_spec("symphony_kernels.csrc")
    except (ImportError, ValueError):
        spec = None
    for base in ([Path(p) for p in spec.submodule_search_locations] if spec and spec.submodule_search_locations
                 else []) + [Path(__file__).resolve().parent.parent / "csrc"]:
        if any(base.glob("*.cpp")):
            return base
    raise FileNotFoundError("the extension's sources (csrc/*.cpp) are not installed")


def cache_dir() -> Path:
    """Where JIT builds go."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "symphony_kernels"


def _want_cuda() -> bool:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def _check(module, origin: str):
    version = getattr(module, "API_VERSION", None)
    if version != API_VERSION:
        raise ImportError(f"{origin} extension has API_VERSION {version}, expected {API_VERSION} (stale build?)")
    return module


def jit_build(build_root: Path | None = None, *, with_cuda: bool | None = None, verbose: bool = False):
    """Compile the extension with ninja into `build_root` (default: cache_dir()) and import it."""
    from torch.utils import cpp_extension

    src = sources_dir()
    with_cuda = _want_cuda() if with_cuda is None else with_cuda
    files = sorted(src.glob("*.cpp")) + (sorted(src.glob("*.cu")) if with_cuda else [])
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.cpp")) + sorted(src.glob("*.cu")) + sorted(src.glob("*.h")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{with_cuda}|{API_VERSION}".encode())
    name = f"symphony_kernels_ext_{digest.hexdigest()[:16]}"
    build_dir = Path(build_root or cache_dir()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        _log.warning("symphony_kernels: compiling the C++%s extension once (a minute or more); cached in %s",
                     "/CUDA" if with_cuda else "", build_dir)
    defines = ["-DSYMPHONY_WITH_CUDA=1"] if with_cuda else []
    module = cpp_extension.load(
        name=name, sources=[str(f) for f in files], build_directory=str(build_dir),
        extra_cflags=["-O3", "-fopenmp", *defines], extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", *defines], with_cuda=with_cuda, verbose=verbose)
    return _check(module, "the JIT-built")


def load():
    """The extension module, or None (with one warning per process saying why) when none can be had."""
    if disabled():
        return None
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        reasons = []
        try:
            module = _check(importlib.import_module("symphony_kernels._C"), "the installed")
            if _want_cuda() and not module.has_cuda():
                # A CPU-only build on a GPU machine: try a JIT build with CUDA, else keep the CPU one.
                reasons.append("the installed extension has no CUDA kernels")
                try:
                    module, origin = jit_build(), "jit"
                except Exception as exc:  # noqa: BLE001 - any build failure means: keep what we have
                    warnings.warn(f"symphony_kernels: JIT build of the CUDA kernels failed ({_short(exc)}); "
                                  "the GPU uses the plain-torch fallback", RuntimeWarning, stacklevel=2)
                    origin = "prebuilt"
            else:
                origin = "prebuilt"
            _state.update(module=module, origin=origin, reason="; ".join(reasons) or None)
            return module
        except Exception as exc:  # noqa: BLE001 - ImportError, undefined symbols of another torch, ...
            reasons.append(f"no usable prebuilt extension ({_short(exc)})")
        try:
            module = jit_build()
            _state.update(module=module, origin="jit", reason="; ".join(reasons))
            return module
        except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, compile error, ...
            reasons.append(f"JIT build failed ({_short(exc)})")
        reason = "; ".join(reasons)
        _state.update(module=None, origin=None, reason=reason)
        warnings.warn(f"symphony_kernels: the C++/CUDA extension is unavailable: {reason}. Using the plain-torch "
                      f"fallback (same results, slower). Set {DISABLE_ENV}=1 to silence this.", RuntimeWarning,
                      stacklevel=2)
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def backend_for(device) -> str:
    """The backend the library uses on `device`: "cuda", "cpp" or "torch"."""
    device = torch.device(device)
    module = load()
    if module is None:
        return "torch"
    if device.type == "cuda":
        return "cuda" if module.has_cuda() else "torch"
    return "cpp" if device.type == "cpu" else "torch"


def info() -> dict:
    """{"disabled", "available", "origin" ("prebuilt" | "jit" | None), "cuda", "reason", "cpu_backend",
    "cuda_backend"}: what load() found and why."""
    module = load()
    if disabled():
        reason = f"disabled by {DISABLE_ENV}"
    else:
        reason = _state["reason"]
    return {"disabled": disabled(), "available": module is not None, "origin": _state["origin"] if module else None,
            "cuda": bool(module is not None and module.has_cuda()), "reason": reason,
            "cpu_backend": backend_for("cpu"),
            "cuda_backend": backend_for("cuda") if torch.cuda.is_available() else None}


def _reset_for_tests():
    """Forget what load() found (tests of the loader only)."""
    with _lock:
        _state.update(tried=False, module=None, origin=None, reason=None)
