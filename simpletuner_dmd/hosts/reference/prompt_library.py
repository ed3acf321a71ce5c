"""Validation prompts from SimpleTuner's prompt-library files (``validation_prompt_library``, ``user_prompt_library``).

The file is a JSON object of ``name → prompt`` or ``name → {"prompt": …}`` (SimpleTuner's format; its other entry keys,
such as ``lyrics`` or ``adapter_strength``, do not apply to this host and are reported). Each name becomes the folder of
its samples (``validation/step-N/<name>/``), made safe for a file system; every problem of every file is reported at
once, by ``validate-config`` and before any model is loaded. (SimpleTuner 4.10.1 itself reads a string in
``validation_prompt_library`` as the name of a built-in library and refuses a path there; its key for a file is
``user_prompt_library``. This host accepts a file in both; its built-in libraries are not shipped here.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_MAX_NAME = 64


def folder_name(name: str) -> str:
    """A library name as a folder name: letters, digits, ``-`` and ``_`` kept, anything else ``_`` (at most 64)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip())[:_MAX_NAME]
    return cleaned or "prompt"


def read_prompt_library(path: str, key: str) -> tuple[dict[str, str], list[str], list[str]]:
    """``(folder name → prompt, problems, warnings)`` of one library file; problems name ``config.<key>``."""
    where = f"config.{key}"
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, [f"{where}: file not found: {path}"], []
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [f"{where}: cannot read {path}: {exc}"], []
    except json.JSONDecodeError as exc:
        return {}, [f"{where}: {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"], []
    if not isinstance(data, dict):
        return {}, [f"{where}: {path} must hold a JSON object of name → prompt, got a JSON {type(data).__name__}"], []
    prompts: dict[str, str] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for name, entry in data.items():
        label = f"{where}: {path}: entry {name!r}"
        extra: list[str] = []
        if isinstance(entry, dict):
            extra = sorted(k for k in entry if k != "prompt")
            entry = entry.get("prompt")
        if not isinstance(entry, str) or not entry.strip():
            problems.append(f"{label}: the prompt must be a non-empty string")
            continue
        if extra:
            warnings.append(f"{label}: {', '.join(extra)} not used by the reference host")
        folder = folder_name(name)
        if folder in prompts:
            problems.append(f"{label}: its folder name {folder!r} is taken by another entry; rename one")
            continue
        prompts[folder] = entry.strip()
    if not data:
        problems.append(f"{where}: {path} holds no prompts")
    return prompts, problems, warnings


def library_prompts(host: dict) -> tuple[dict[str, str], list[str], list[str]]:
    """Every library prompt of the host config (both keys), with every problem and warning."""
    prompts: dict[str, str] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for key in ("validation_prompt_library", "user_prompt_library"):
        if not host.get(key):
            continue
        found, bad, notes = read_prompt_library(host[key], key)
        problems += bad
        warnings += notes
        for name, prompt in found.items():
            if name in prompts or (name == "validation" and host.get("validation_prompt")):
                problems.append(f"config.{key}: entry folder {name!r} is used twice (validation_prompt's folder is "
                                "'validation'); rename one")
            else:
                prompts[name] = prompt
    return prompts, problems, warnings


__all__ = ["folder_name", "library_prompts", "read_prompt_library"]
