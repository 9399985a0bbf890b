"""Symphony-MoE kernels: fused top-k routing, grouped-GEMM experts, activation correlation, matching.

Names are imported lazily so that importing the package stays cheap and never compiles anything.
"""
import importlib

_EXPORTS = {
    "route": "routing",
    "RoutingPlan": "routing",
    "dispatch": "routing",
    "moe_experts": "experts",
    "warmup": "_warmup",
    "set_compile_mode": "_launch",
    "CorrelationAccumulator": "correlation",
    "linear_assignment": "matching",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
