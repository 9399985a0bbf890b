"""transformers integration: the experts implementation "symphony", `patch` and `unpatch`.

After `import symphony` (or `import symphony.nn.hf`),

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="symphony")

runs the experts of Mixtral, Qwen2-MoE and Qwen3-MoE models (any experts module built with transformers'
`use_experts_implementation` in the concatenated gate/up layout, without biases) on
`symphony_kernels.moe_experts`; the model's own router still chooses the experts. `patch(model)` switches a
model that is already loaded.

`import symphony` stays cheap: it imports neither transformers nor the kernels. When transformers is already
imported it registers at once; otherwise a one-shot import hook registers the moment transformers imports its
experts interface (`transformers.integrations.moe`, which every model load goes through). The kernels are
imported at the first forward.

Experts modules the kernels cannot represent (biases, no gate, transposed or interleaved weights, a custom
gating function, an activation other than SiLU or exact GELU) run transformers' own eager
forward instead, with a warning once per class: a slower answer, never a wrong one. `patch` refuses such a
model up front with a ValueError.
"""
from __future__ import annotations

import sys
import warnings

NAME = "symphony"
_HOOKED_MODULE = "transformers.integrations.moe"
_MOE_BLOCKS = {  # (module, class name) -> kind, for SymphonyMoE.from_hf
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"): "qwen2_moe",
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"): "qwen3_moe",
    ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"): "mixtral",
}
_warned: set[type] = set()


def register() -> None:
    """Register `symphony_experts_forward` under the name "symphony" in transformers' ExpertsInterface
    (idempotent). Needs transformers >= 5."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:
        raise ImportError("the 'symphony' experts implementation needs transformers >= 5 "
                          f"(its ExpertsInterface): {e}") from e
    ExpertsInterface.register(NAME, symphony_experts_forward)


def experts_activation(module) -> str | None:
    """"silu" or "gelu" for a module whose `act_fn` is SiLU or exact GELU (a module such as nn.SiLU, or the
    function F.silu / F.gelu, as Lfm2-MoE stores it), else None."""
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers.activations import GELUActivation, SiLUActivation

    act = getattr(module, "act_fn", None)
    if type(act) in (nn.SiLU, SiLUActivation) or act is F.silu:
        return "silu"
    if type(act) is GELUActivation or (type(act) is nn.GELU and act.approximate == "none") or act is F.gelu:
        return "gelu"
    return None


def experts_problem(experts) -> str | None:
    """Why a transformers experts module cannot run on symphony's kernels, or None when it can."""
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(experts, "has_gate", False):
        return "its experts have no gate projection (has_gate=False)"
    if getattr(experts, "has_bias", False):
        return "its experts have biases (has_bias=True)"
    if getattr(experts, "is_transposed", False):
        return "its expert weights are stored transposed (is_transposed=True)"
    if not getattr(experts, "is_concatenated", True):
        return "its gate and up rows are interleaved (is_concatenated=False)"
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"{type(experts).__name__} has its own gating function (_apply_gate)"
    if experts_activation(experts) is None:
        act = getattr(experts, "act_fn", None)
        name = getattr(act, "__name__", None) or type(act).__name__
        return f"activation {name} is not SiLU or exact GELU"
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return "its experts do not hold 3-D gate_up_proj and down_proj weights"
    E, two_f, d = gate_up.shape
    if two_f % 2 or tuple(down.shape) != (E, d, two_f // 2):
        return (f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not [E, 2f, d] and "
                "[E, d, f]")
    from symphony_kernels._runtime import MAX_EXPERTS, MAX_TOP_K

    if E > MAX_EXPERTS:
        return f"it has {E} experts, more than the kernels' limit of {MAX_EXPERTS}"
    top_k = getattr(getattr(experts, "config", None), "num_experts_per_tok", None)
    if isinstance(top_k, int) and top_k > MAX_TOP_K:
        return f"it routes each token to {top_k} experts, more than the kernels' limit of top-{MAX_TOP_K}"
    return None


def symphony_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The "symphony" experts implementation: transformers calls it as the forward of an experts module with
    hidden_states [T, d], top_k_index [T, k] and top_k_weights [T, k]; returns [T, d] in hidden_states' dtype.
    Ids outside [0, E) (transformers' expert-parallel sentinel) contribute nothing. Under autocast the experts
    run in the autocast dtype; float32 expert weights are rounded to hidden_states' dtype by the kernels."""
    problem, activation = _verdict(self)
    if problem is None and top_k_index.shape[-1] > _max_top_k():
        problem = f"it routes each token to {top_k_index.shape[-1]} experts, more than the kernels' limit"
    if problem is not None:
        return _eager_fallback(self, problem, hidden_states, top_k_index, top_k_weights)
    import symphony_kernels as sk
    from symphony.nn.cast import compute_dtype_cast

    x, (gate_up, down) = compute_dtype_cast(hidden_states, self.gate_up_proj, self.down_proj, strict=False)
    out = sk.moe_experts(x, gate_up, down, top_k_weights, top_k_index, activation=activation)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def _verdict(module) -> tuple[str | None, str | None]:
    """(experts_problem, experts_activation) of an experts module, computed once and kept on the module for as
    long as its weights and activation are the same objects (a decode step calls this for every layer)."""
    key = (module.__dict__.get("_parameters", {}).get("gate_up_proj"), module.__dict__.get("_parameters", {})
           .get("down_proj"), getattr(module, "act_fn", None), getattr(module, "has_bias", None))
    cached = module.__dict__.get("_symphony_verdict")
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    verdict = (experts_problem(module), experts_activation(module))
    module.__dict__["_symphony_verdict"] = (key, verdict)
    return verdict


def _max_top_k() -> int:
    from symphony_kernels._runtime import MAX_TOP_K

    return MAX_TOP_K


def _eager_fallback(module, problem, *args):
    cls = type(module)
    original = getattr(cls.forward, "__wrapped__", None)
    if original is None:
        raise ValueError(f"the 'symphony' experts implementation cannot run {cls.__name__}: {problem}")
    if cls not in _warned:
        _warned.add(cls)
        warnings.warn(f"experts_implementation='symphony': {cls.__name__} runs transformers' eager experts "
                      f"instead, because {problem}", stacklevel=3)
    return original(module, *args)


def hf_moe_block_kind(block) -> str:
    """"qwen2_moe", "qwen3_moe" or "mixtral" for the transformers MoE blocks SymphonyMoE.from_hf represents;
    a TypeError for anything else."""
    kind = _MOE_BLOCKS.get((type(block).__module__, type(block).__qualname__))
    if kind is None:
        names = ", ".join(name for _, name in _MOE_BLOCKS)
        raise TypeError(f"SymphonyMoE.from_hf supports {names}; not {type(block).__qualname__}")
    return kind


def _experts_modules(model):
    return [(name, m) for name, m in model.named_modules()
            if hasattr(type(m).forward, "__wrapped__") and hasattr(m, "has_gate") and hasattr(m, "config")]


def patch(model):
    """Run an already loaded transformers model's experts on symphony's kernels (its config and sub-configs
    get experts_implementation "symphony"); returns the model. `unpatch` restores the previous setting.
    TypeError for something that is not a transformers model, ValueError for a model without experts modules
    or with experts modules the kernels cannot represent (named, with the reason)."""
    if not callable(getattr(model, "set_experts_implementation", None)):
        raise TypeError(f"patch expects a transformers PreTrainedModel, not {type(model).__name__}")
    register()
    modules = _experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no experts modules that an experts implementation can run")
    for name, module in modules:
        problem = experts_problem(module)
        if problem is not None:
            raise ValueError(f"cannot patch {type(model).__name__}: {name} ({type(module).__name__}): {problem}")
    previous = model.get_experts_implementation()
    model.set_experts_implementation(NAME)
    if "_symphony_previous_experts" not in vars(model):
        model._symphony_previous_experts = previous
    return model


def unpatch(model):
    """Undo `patch`: restore the experts implementation the model had before (eager when unknown)."""
    if not callable(getattr(model, "set_experts_implementation", None)):
        raise TypeError(f"unpatch expects a transformers PreTrainedModel, not {type(model).__name__}")
    previous = vars(model).pop("_symphony_previous_experts", None)
    model.set_experts_implementation(previous or "eager")
    return model


class _RegisterOnImport:
    """A meta path finder (importlib.abc is not imported: it costs more than the rest of `import symphony`)
    that finds transformers.integrations.moe through the other finders and registers "symphony" right after the
    module has run; removes itself from sys.meta_path once it has fired."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        hook = self

        class _Loader:  # a loader (create_module, exec_module) that delegates to the real one
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                module.__loader__ = module.__spec__.loader = loader
                loader.exec_module(module)
                hook.uninstall()
                try:
                    register()
                except Exception as e:  # never break transformers' import because of us
                    warnings.warn(f"could not register the 'symphony' experts implementation: {e}")

        spec.loader = _Loader()
        return spec

    def uninstall(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install_import_hook() -> None:
    """Register now if transformers' experts interface is already imported, else when it gets imported.
    Cheap: imports nothing."""
    if _HOOKED_MODULE in sys.modules:
        try:
            register()
        except Exception as e:
            warnings.warn(f"could not register the 'symphony' experts implementation: {e}")
        return
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
