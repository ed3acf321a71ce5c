"""What every module of the SimpleTuner bridge uses: the names it sets on SimpleTuner's objects, its log line and the
process rank. It imports nothing of the bridge, so the bridge's modules import one way::

    shared <- distiller <- preflight <- patch <- autoload <- launcher

Nothing here imports SimpleTuner or torch.
"""

from __future__ import annotations

import os

MARK = "_simpletuner_dmd_patched"  # on each function ``patch.py`` and ``preflight.py`` put in SimpleTuner's place
HOST_PARAMETERS_ATTR = "_simpletuner_dmd_host_parameters"  # PluginDistiller.host_parameters, on SimpleTuner's model
NEGATIVE_EMBEDS_ATTR = "_simpletuner_dmd_negative_embeds"  # set on SimpleTuner's model by patch.py


def log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[simpletuner-dmd] {message}")  # above SimpleTuner's progress bar


def is_main_process() -> bool:
    """The process of rank 0 (or the only one): launchers set RANK, and LOCAL_RANK, in every process."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("", "0")


__all__ = ["HOST_PARAMETERS_ATTR", "MARK", "NEGATIVE_EMBEDS_ATTR", "is_main_process", "log"]
