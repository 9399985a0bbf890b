"""Stage 1 of Symphony-MoE and the build driver, in the order a build runs:

sources (symphony.build.sources) -> backbone fusion (fusion) -> FFN alignment (capture, correlate, permute,
align) -> experts and router init (experts, router_init) -> assembly into one output architecture (targets,
assemble, writer) -> stage 2 (symphony.train). The driver is symphony.build.pipeline, the YAML config
symphony.build.config; memory and report hold what a build measures and prints. Names are imported lazily.
"""
import importlib

_EXPORTS = {"build": "pipeline", "BuildConfig": "config", "load_config": "config", "parse_config": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
