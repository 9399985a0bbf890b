"""The runtime side: `SymphonyMoE` (a drop-in MoE layer on the kernels) and the transformers integration
(`experts_implementation="symphony"`, `patch`, `unpatch`). Importing this package stays cheap (no torch)."""
import importlib

_EXPORTS = {"SymphonyMoE": "moe", "patch": "hf", "unpatch": "hf"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
