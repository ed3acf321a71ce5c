"""The user's own LoRAs as the teacher inside SimpleTuner (``teacher_loras``, issue 30; ``teacher_loras.py`` does the
work, as in the reference host).

SimpleTuner (4.10.1 and 3.1.6) has no key that merges a LoRA into the base before training: its ``init_lora`` starts
the *trained* LoRA from a file (the plugin's ``init_lora`` of the reference host), and 4.x's ``assistant_lora_path``
is a frozen adapter applied while training and taken off for validation and inference (Flux schnell's training
adapter) — the opposite of a teacher that *is* the user's model. So the key lives in the plugin's part of the config,
``distillation_config``, beside the method's keys (flat) or beside the method sections (keyed)::

    "distillation_config": "{'teacher_loras': [{'path': 'style.safetensors', 'scale': 0.8}], 'dmd_denoising_steps': …}"

``split`` takes it out before the method's config is validated (every host path: the checks before the launch, the
distiller's construction). The merge runs right after SimpleTuner's ``Trainer.init_load_base_model`` — before
``init_precision`` quantises the base, before PEFT adds the student's LoRA and before the method adds its fake score
(``patch.py``, take-over point 9) — into the network SimpleTuner trains, so the teacher (the base with adapters off),
the student's base and the fake score's base are the user's model, as in the reference host; a method that loads a
base copy of its own (``RunContext.load_base``) gets it merged too. Each checkpoint gets ``checkpoint-N/combined/``:
the user's LoRAs and the student as one LoRA for the stock base (``write_combined``; the diffusers layout only —
SimpleTuner writes the student's own files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ...config import parse_distillation_config
from ...errors import ConfigError
from ...teacher_loras import (KEY, combined_lora, merge_teacher_loras, parse_teacher_loras, read_teacher_loras,
                              teacher_lora_file_problems, teacher_lora_part_problems)

PREFIX = "distillation_config"


def split(distillation_config: Any) -> tuple[list[dict[str, Any]], Any, list[str]]:
    """``(teacher_loras entries, the rest of distillation_config for the method, problems)``. A config without the key
    (or one that does not parse: the method's validation reports it) comes back as it was."""
    section, problems = parse_distillation_config(distillation_config)
    if problems or not section or KEY not in section:
        return [], distillation_config, []
    rest = {k: v for k, v in section.items() if k != KEY}
    try:
        return parse_teacher_loras(section[KEY]), rest, []
    except ValueError as exc:
        message = str(exc)
        return [], rest, [f"{PREFIX}.{KEY}{message if message.startswith('[') else ': ' + message}"]


def problems(config: Mapping[str, Any], family_cls: type | None) -> list[str]:
    """What ``validate-config`` and the checks before the launch report of the key: a bad entry, a part the family
    does not have, a missing file."""
    entries, _, found = split(config.get("distillation_config"))
    if family_cls is not None:
        found += teacher_lora_part_problems(entries, family_cls, prefix=PREFIX)
    return found + teacher_lora_file_problems(entries, prefix=PREFIX)


def merge_into(network: Any, family: Any, config: Mapping[str, Any], log) -> None:
    """Merge the config's ``teacher_loras`` into ``network`` (a frozen base, before any adapter), read as ``family``
    reads LoRA files. Nothing to do without the key."""
    entries, _, found = split(config.get("distillation_config"))
    if not entries:
        return
    if found:
        raise ConfigError(found)
    for line in merge_teacher_loras(network, family, entries):
        log(line)


def merge_into_simpletuner_model(model: Any, config: Mapping[str, Any], family_cls: type, log) -> None:
    """``merge_into`` the network SimpleTuner's ``model`` object trains (before PEFT and quantisation), as
    ``family_cls`` (the plugin family serving the run) reads LoRA files."""
    family = family_cls()
    if family.bind_simpletuner_model is not None:
        family.bind_simpletuner_model(model)
    merge_into(model.get_trained_component(), family, config, log)


def write_combined(network: Any, adapter: str, family: Any, config: Mapping[str, Any], folder: Path) -> Path | None:
    """With ``teacher_loras``: ``folder`` gets the user's LoRAs and the student adapter ``adapter`` of ``network`` as
    one LoRA for the stock base (``teacher_loras.combined_lora``), in the layout ``family.save_lora`` writes (the
    stock pipeline's); returns the file, or None without the key."""
    entries, _, _ = split(config.get("distillation_config"))
    if not entries:
        return None
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(network, adapter_name=adapter)
    combined, combined_config = combined_lora(state, network.peft_config[adapter],
                                              read_teacher_loras(family, entries), family.lora_parts)
    folder.mkdir(parents=True, exist_ok=True)
    return family.save_lora(combined, folder, combined_config)


__all__ = ["merge_into", "merge_into_simpletuner_model", "problems", "split", "write_combined"]
