"""The reference host's whole config: its own keys (``host_schema.HOST_SCHEMA``), the model family and the selected
method's section (validated by the core's ``config.validate_method_config``, as every host does), then the files and
folders the keys name (the model, the data backend file, the prompt library, the webhook file, the output folders).
All problems are reported together, one line each, before any model is loaded. ``validate_config`` is the procedure;
the functions below it are its checks, in the order it calls them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import read_json, suggest, validate_method_config
from ...errors import ConfigError, UserError
from ...estimate import transformer_config
from ...optimizers import check_available
from ...plugins import registered_families
from ...teacher_loras import teacher_lora_file_problems, teacher_lora_part_problems
from .backends import load_backend_config
from .context_parallel import context_parallel_problems, degree_problems
from .fsdp import fsdp_problems
from .host_schema import HOST_SCHEMA, SEED_KEYS_NOT_SUPPORTED
from .prompt_library import library_prompts
from .webhooks import load_webhook_config


@dataclass
class RunConfig:
    """A validated run: host keys, the selected method (or None for plain fine-tuning) and its config."""

    path: Path | None
    host: dict[str, Any]
    method_name: str | None
    method_cls: type | None
    method_config: dict[str, Any]
    family_cls: type
    warnings: list[str] = field(default_factory=list)


def load_config(path: str | Path, pm: Any, *, check_paths: bool = True) -> RunConfig:
    """Read and validate a host config file. Raises ``ConfigError`` with every problem, one line each."""
    raw = read_json(path, "config")
    return validate_config(raw, pm, path=Path(path), check_paths=check_paths)


def validate_config(raw: Any, pm: Any, *, path: Path | None = None, check_paths: bool = True) -> RunConfig:
    """Validate a whole reference-host config: the host's keys (``HOST_SCHEMA``), the model family, and the method's
    section through the core ``validate_method_config``; with ``check_paths``, once those are clean, the files and
    folders the keys name. Raises ``ConfigError`` with every problem, one line each."""

    if not isinstance(raw, dict):
        raise ConfigError([f"config: must be a JSON object, got {type(raw).__name__}"])
    problems: list[str] = []
    warnings: list[str] = []

    host_raw = {k: v for k, v in raw.items() if k not in ("distillation_method", "distillation_config")}
    host, host_problems, unknown = HOST_SCHEMA.validate(host_raw, prefix="config", unknown="collect")
    problems += host_problems
    warnings += host_key_warnings(host_raw, unknown)

    families = registered_families(pm)
    family_name = host.get("model_family")
    family_cls = None
    if family_name is None:
        pass  # reported by HOST_SCHEMA as required
    elif family_name not in families:
        problems.append(f"config.model_family: unknown family {family_name!r}{suggest(str(family_name), families)}; "
                        f"installed: {', '.join(families) or 'none'}")
    else:
        family_cls = families[family_name].cls

    if family_cls is not None and not host_problems:
        problems += family_key_problems(host, family_cls)
        warnings += family_key_warnings(host, family_cls)
    if not host_problems:
        missing = check_available(host["optimizer"])
        if missing:
            problems.append(f"config.{missing}")

    method_name = raw.get("distillation_method")
    method_cls = None
    method_config: dict[str, Any] = {}
    if method_name in (None, "", "none"):
        method_name = None
        if raw.get("distillation_config"):
            warnings.append("distillation_config is set but distillation_method is not: the config has no effect")
    else:
        selection, method_problems = validate_method_config(method_name, raw.get("distillation_config"), pm,
                                                            family_cls=family_cls, host=host)
        problems += method_problems
        if selection is not None:
            method_name, method_cls, method_config = selection.name, selection.cls, selection.config
            warnings += selection.warnings
    if not host_problems:
        problems += fsdp_problems(host)
        if family_cls is not None:
            problems += context_parallel_problems(host, family_cls, method_cls, method_config)

    if check_paths and not problems:
        problems += check_host_paths(host)
    if check_paths and not problems:
        problems += backend_file_problems(host["data_backend_config"], family_cls)
        problems += model_degree_problems(host, family_cls)
        _, library_problems, library_warnings = library_prompts(host)
        problems += library_problems
        warnings += library_warnings
        if host["webhook_config"]:
            try:
                load_webhook_config(host["webhook_config"])
            except ConfigError as exc:
                problems += list(exc.problems)
    if problems:
        raise ConfigError(problems)
    return RunConfig(path, host, method_name, method_cls, method_config, family_cls, warnings)


def host_key_warnings(raw: dict[str, Any], unknown: list[str]) -> list[str]:
    """One warning for each key the host does not know: a seed quickstart key it does not implement (and why), or an
    unknown key (with a close match)."""
    out = []
    for name in unknown:
        if name in SEED_KEYS_NOT_SUPPORTED:
            out.append(f"{name}: not supported by the reference host and ignored ({SEED_KEYS_NOT_SUPPORTED[name]})")
        else:
            out.append(f"{name}: unknown to the reference host and ignored{suggest(name, HOST_SCHEMA.by_name)}")
    return out


def family_key_problems(host: dict, family_cls: type) -> list[str]:
    """The host keys whose valid values depend on the model family's media rules (``LoadingFamily.size_multiple``,
    ``frame_stride``): the validation sample's size and frame count."""
    problems = []
    multiple, stride = family_cls.size_multiple, family_cls.frame_stride
    w, h = host["validation_resolution"]  # (a family without the rules cannot run in this host: it loads nothing)
    if w % multiple or h % multiple or w < multiple or h < multiple:
        problems.append(f"config.validation_resolution: width and height must be multiples of {multiple} for the "
                        f"{family_cls.name} family, got {w}x{h}")
    frames = host["validation_num_video_frames"]
    if (frames - 1) % stride:
        examples = ", ".join(str(1 + stride * k) for k in range(4))
        problems.append(f"config.validation_num_video_frames: must be 1 + {stride}k ({examples}, …) for the "
                        f"{family_cls.name} family, got {frames}")
    problems += teacher_lora_part_problems(host["teacher_loras"], family_cls)
    problems += list(family_cls.config_problems(host))  # what else the family cannot run (Wan 2.2: model_type full)
    return problems


def family_key_warnings(host: dict, family_cls: type) -> list[str]:
    """The host keys of a family with experts (``FamilyBase.expert_guidance``: Wan 2.2 A14B) set for a family
    without: one warning each, naming the key and the family (they have no effect)."""
    if family_cls.expert_guidance is not None:
        return []
    return [f"config.{name}: has no effect with the {family_cls.name} family (one network, no experts switched by "
            f"timestep)" for name in ("boundary_ratio", "validation_teacher_guidance_2") if host.get(name) is not None]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_host_paths(host: dict[str, Any]) -> list[str]:
    """The model folder and the data backend file must exist; the output and cache folders must be writable."""
    problems = []
    model = host.get("pretrained_model_name_or_path")
    if not model:
        problems.append("config.pretrained_model_name_or_path: must be set (a local diffusers folder)")
    elif not Path(model).is_dir() and not (_HUB_ID.match(model) and not Path(model).parent.is_dir()):
        problems.append(f"config.pretrained_model_name_or_path: model folder not found: {model}")
    data = host.get("data_backend_config")
    if not data:
        problems.append("config.data_backend_config: must be set (a multidatabackend JSON file)")
    elif not Path(data).is_file():
        problems.append(f"config.data_backend_config: file not found: {data}")
    image = host.get("validation_image")
    if image and not Path(image).is_file():
        problems.append(f"config.validation_image: file not found: {image}")
    problems += teacher_lora_file_problems(host["teacher_loras"])
    for key in ("output_dir", "cache_dir"):
        problem = host.get(key) and writable_folder_problem(host[key])
        if problem:
            problems.append(f"config.{key}: {problem}")
    return problems


def model_degree_problems(host: dict[str, Any], family_cls: type) -> list[str]:
    """``context_parallel_size`` against the local model's transformer config (its attention heads) and the
    validation sample's tokens (``context_parallel.degree_problems``)."""
    model = Path(host["pretrained_model_name_or_path"])
    if host.get("context_parallel_size", 1) == 1 or not model.is_dir():
        return []
    return degree_problems(host, family_cls, transformer_config(family_cls, str(model)))


def writable_folder_problem(value: str) -> str | None:
    """Why the trainer could not create or write into the folder ``value``, or None. Nothing is created: an existing
    folder must be writable; a new one needs its nearest existing ancestor to be a writable folder. (Root writes
    through permission bits, but not into a read-only file system, which ``os.access`` reports for root too.)"""
    path = Path(value)
    try:
        if path.is_dir():
            target = path
        elif os.path.lexists(path):
            kind = "a dangling symlink" if path.is_symlink() else "a file"
            return f"{value} is {kind}, not a folder"
        else:
            target = path.absolute().parent
            while not os.path.lexists(target):
                target = target.parent
            if not target.is_dir():
                return f"cannot create the folder {value}: {target} is not a folder"
    except OSError as exc:  # a name too long, a loop of links: the trainer's mkdir would fail the same way
        return f"cannot create the folder {value} ({exc.strerror or exc})"
    if not os.access(target, os.W_OK | os.X_OK):
        return f"cannot write into {target} (no permission, or a read-only file system)"
    return None


def backend_file_problems(path: str, family_cls: type | None = None) -> list[str]:
    """Every problem of the data backend file, read and checked here — by ``validate-config`` and before the trainer
    loads any model — rather than only once the VAE and text encoder are loaded; with ``family_cls``, also a video
    dataset for an image-only family (``video = False``). (Its warnings come when the run builds the dataset.)"""
    try:
        backends = load_backend_config(path, warn=lambda message: None)
    except ConfigError as exc:
        return list(exc.problems)
    except UserError as exc:
        return [str(exc)]
    if family_cls is not None and not family_cls.video:
        return [f"{path}: dataset {b['id']!r} is a video dataset, but the {family_cls.name} family makes images only"
                for b in backends if b.get("dataset_type") == "video"]
    return []


__all__ = ["RunConfig", "backend_file_problems", "check_host_paths", "family_key_problems", "family_key_warnings",
           "host_key_warnings",
           "load_config", "validate_config", "writable_folder_problem"]
