"""simpletuner-dmd: Distribution Matching Distillation (DMD2 / Self-Forcing) as a plugin for SimpleTuner-style
trainers. The public surface is below; everything else is an implementation detail."""

from .config import Key, MethodSelection, Schema, validate_method_config
from .errors import ConfigError, DataError, PluginError, UserError
from .hookspecs import hookimpl
from .plugins import get_plugin_manager, registered_families, registered_methods
from .types import (HOST_KEYS_FOR_METHODS, Batch, LoadingFamily, Method, ModelFamily, RunContext, Sampler, StepInfo,
                    StepLoss)

__version__ = "0.1.0"

__all__ = [
    "Batch", "ConfigError", "DataError", "HOST_KEYS_FOR_METHODS", "Key", "LoadingFamily", "Method", "MethodSelection",
    "ModelFamily", "PluginError", "RunContext", "Sampler", "Schema", "StepInfo", "StepLoss", "UserError",
    "get_plugin_manager", "hookimpl", "registered_families", "registered_methods", "validate_method_config",
    "__version__",
]
