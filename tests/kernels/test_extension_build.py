"""The extension loader: prebuilt, JIT build into a cache, or a warned plain-torch fallback; the env switch."""
import importlib
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from symphony_kernels import _ext
from symphony_kernels.correlation import CorrelationAccumulator, TorchOps

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_loader():
    """Forget what the loader found before and after the test, so other tests see the real state again."""
    _ext._reset_for_tests()
    yield
    _ext._reset_for_tests()


def test_disable_switch_forces_the_torch_fallback(fresh_loader, monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    assert _ext.load() is None
    info = _ext.info()
    assert info["disabled"] and not info["available"] and _ext.DISABLE_ENV in info["reason"]
    assert _ext.backend_for("cpu") == "torch"
    assert CorrelationAccumulator(2, 3).backend == "torch"
    with pytest.raises(ValueError, match="extension"):
        CorrelationAccumulator(2, 3, backend="cpp")


def test_failed_prebuilt_and_failed_jit_warn_once_and_fall_back(fresh_loader, monkeypatch):
    monkeypatch.delenv(_ext.DISABLE_ENV, raising=False)
    real_import = importlib.import_module

    def no_prebuilt(name, *args, **kwargs):
        if name == "symphony_kernels._C":
            raise ImportError("undefined symbol: _ZN3c10 (built against another torch)")
        return real_import(name, *args, **kwargs)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(_ext.importlib, "import_module", no_prebuilt)
    monkeypatch.setattr(_ext, "jit_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="plain-torch fallback"):
        assert _ext.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per process
        assert _ext.load() is None
    reason = _ext.info()["reason"]
    assert "undefined symbol" in reason and "command not found" in reason
    acc = CorrelationAccumulator(1, 4, 3)
    assert acc.backend == "torch"
    x, y = torch.randn(1, 50, 4), torch.randn(1, 50, 3)
    assert torch.isfinite(acc.update(x, y).correlation()).all()


def test_stale_prebuilt_is_refused():
    class Stale:
        API_VERSION = _ext.API_VERSION - 1

    with pytest.raises(ImportError, match="stale"):
        _ext._check(Stale(), "the installed")


def test_sources_are_found_and_shipped():
    src = _ext.sources_dir()
    names = {p.name for p in src.iterdir()}
    assert {"bindings.cpp", "correlation_cpu.cpp", "correlation.h", "correlation_cuda.cu", "auction_cuda.cu"} <= names
    setup = (ROOT / "setup.py").read_text()
    for pattern in ('"*.cpp"', '"*.cu"', '"*.h"'):
        assert pattern in setup  # csrc/ ships as package data, so a JIT build works from any install


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(_ext.CACHE_ENV, str(tmp_path / "c"))
    assert _ext.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(_ext.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _ext.cache_dir() == tmp_path / "symphony_kernels"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SYMPHONY_TEST_JIT") != "1",
                    reason="compiles the extension from scratch (1-4 min on 2 cores); SYMPHONY_TEST_JIT=1 runs it")
def test_jit_build_from_scratch(tmp_path):
    if shutil.which("ninja") is None or (shutil.which("c++") is None and shutil.which("g++") is None):
        pytest.skip("no C++ compiler or ninja on this machine")
    cuda = torch.cuda.is_available()
    module = _ext.jit_build(tmp_path, with_cuda=cuda)
    assert module.API_VERSION == _ext.API_VERSION and module.has_cuda() == cuda
    for device in ["cpu"] + (["cuda"] if cuda else []):
        x = torch.randn(2, 33, 16, device=device)
        for a, b in zip(module.column_moments(x), TorchOps.column_moments(x)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
