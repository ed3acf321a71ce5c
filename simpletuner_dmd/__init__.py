"""simpletuner-dmd: Distribution Matching Distillation (DMD2 / Self-Forcing) as a plugin for SimpleTuner-style
trainers. The public surface is below; everything else is an implementation detail."""

from .config import Key, MethodSelection, Schema, validate_method_config
from .errors import ConfigError, DataError, PluginError, UserError
from .family_base import FamilyBase
from .hookspecs import hookimpl
from .method_base import MethodBase
from .plugins import get_plugin_manager, registered_families, registered_methods
from .types import (HOST_KEYS_FOR_METHODS, Batch, LoadingFamily, Method, ModelFamily, RunContext, Sampler, StepInfo,
                    StepLoss)

__version__ = "0.1.0"

# For method and family authors, loaded on first use (``import simpletuner_dmd`` stays free of torch, so a plugin's
# entry point stays cheap): the flow-matching math (``flow.py``: σ and its shift, noising ``x_σ = (1 − σ)·x0 + σ·ε``,
# x̂0, Euler steps, the CFG forms) and the run's networks (``networks.py``: ``Networks``, the guided cond + uncond
# batch ``guided_batch``; ``PassCounter``, which counts their calls by role).
_LAZY = {
    **{name: "flow" for name in (
        "T_MAX", "add_noise", "add_noise_at_sigma", "boundary_scalings", "consistency_output", "euler_step",
        "flow_to_x0", "guided", "guided_per_sample", "guided_self_forcing", "per_sample", "sampling_timesteps",
        "shift_sigma", "sigma_of", "unshift_sigma")},
    **{name: "networks" for name in ("Networks", "frozen", "guided_batch", "require_teacher")},
    "PassCounter": "passes",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Batch", "ConfigError", "DataError", "FamilyBase", "HOST_KEYS_FOR_METHODS", "Key", "LoadingFamily", "Method",
    "MethodBase", "MethodSelection",
    "ModelFamily", "PluginError", "RunContext", "Sampler", "Schema", "StepInfo", "StepLoss", "UserError",
    "get_plugin_manager", "hookimpl", "registered_families", "registered_methods", "validate_method_config",
    "__version__", *_LAZY,
]
