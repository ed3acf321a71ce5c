"""A student LoRA's files, as the family writes them with ``save_lora`` — read back, loaded into a stock pipeline, and
shown in the model card.

A family writes one file (``pytorch_lora_weights.safetensors``, keys ``transformer.…``: the default below) or more
(Wan 2.2 A14B: one per expert). A family with several files implements the three optional members that this module
otherwise supplies — ``read_lora(folder)``, ``load_lora_into_pipeline(pipe, folder, adapter_name=)`` and
``lora_loading_code()`` — so hosts, ``sample`` and model cards never need to know how many files there are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAIN_FILE = "pytorch_lora_weights.safetensors"


def read_lora(family: Any, folder: Path) -> dict:
    """The peft state of the student adapter (keys as ``get_peft_model_state_dict`` gives them for the family's
    network) from a folder ``save_lora`` wrote, or from the one file of a one-file family."""
    own = None if family is None else family.read_lora  # None: the one-file default
    if own is not None:
        return own(Path(folder))
    from safetensors.torch import load_file

    path = Path(folder)
    file = path / MAIN_FILE if path.is_dir() else path
    return {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}


def load_into_pipeline(family: Any, pipe: Any, folder: Path, *, adapter_name: str) -> None:
    """Load the student from ``folder`` into a stock diffusers pipeline under ``adapter_name``."""
    own = None if family is None else family.load_lora_into_pipeline  # None: the one-file default
    if own is not None:
        own(pipe, Path(folder), adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)


def load_user_lora(pipe: Any, entry: dict, *, adapter_name: str) -> None:
    """One of a run's ``teacher_loras`` entries (``{"path", "scale", "into"}``) into a stock pipeline under
    ``adapter_name``; a part other than ``transformer`` goes through diffusers' ``load_into_<part>`` (Wan 2.2's
    ``load_into_transformer_2``). The caller weights it with ``set_adapters`` at the entry's scale."""
    into = {} if entry["into"] == "transformer" else {f"load_into_{entry['into']}": True}
    pipe.load_lora_weights(str(entry["path"]), adapter_name=adapter_name, **into)


def loading_code(family: Any) -> list[str]:
    """The model card's lines that load the student into ``pipe``."""
    own = None if family is None else family.lora_loading_code  # None: the one-file default
    if own is not None:
        return list(own())
    return [f'pipe.load_lora_weights("path/to/this/folder")  # {MAIN_FILE}']


__all__ = ["MAIN_FILE", "load_into_pipeline", "load_user_lora", "loading_code", "read_lora"]
