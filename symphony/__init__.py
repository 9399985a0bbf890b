"""Symphony-MoE: build one MoE model from several dense checkpoints, and run MoE layers fast."""
import importlib

_EXPORTS = {
    "SymphonyMoE": "nn.moe",
    "patch": "nn.hf",
    "unpatch": "nn.hf",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__


# `experts_implementation="symphony"` for transformers: registered now if transformers' experts interface is
# already imported, else by a one-shot import hook when it is (symphony.nn.hf imports neither transformers nor torch).
from symphony.nn import hf as _hf  # noqa: E402

_hf.install_import_hook()
