"""What every module of the SimpleTuner bridge uses: the names it sets on SimpleTuner's objects, its log line and the
process rank. It imports nothing of the bridge, so the bridge's modules import one way::

    shared <- distiller <- preflight <- patch <- autoload <- launcher
    shared <- validation_drift <- patch
    base_loras <- distiller, preflight, patch

Nothing here imports SimpleTuner or torch.
"""

from __future__ import annotations

import os
from typing import Any

MARK = "_simpletuner_dmd_patched"  # on each function ``patch.py`` and ``preflight.py`` put in SimpleTuner's place
HOST_PARAMETERS_ATTR = "_simpletuner_dmd_host_parameters"  # PluginDistiller.host_parameters, on SimpleTuner's model
NEGATIVE_EMBEDS_ATTR = "_simpletuner_dmd_negative_embeds"  # set on SimpleTuner's model by patch.py


def log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[simpletuner-dmd] {message}")  # above SimpleTuner's progress bar


def served_name(method: Any, served: list[str]) -> str | None:
    """The plugin's method name for SimpleTuner's ``distillation_method`` (a string or its enum), matched without
    regard to case as SimpleTuner's own registry matches, or None when the plugin does not serve it."""
    name = getattr(method, "value", method)
    if isinstance(name, str) and name.strip().lower() in served:
        return name.strip().lower()
    return None


def is_main_process() -> bool:
    """The process of rank 0 (or the only one): launchers set RANK, and LOCAL_RANK, in every process."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("", "0")


__all__ = ["HOST_PARAMETERS_ATTR", "MARK", "NEGATIVE_EMBEDS_ATTR", "is_main_process", "log", "served_name"]
