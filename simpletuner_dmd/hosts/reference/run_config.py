"""The reference host's whole config: its own keys (``host_schema.HOST_SCHEMA``), the model family and the selected
method's section (validated by the core's ``config.validate_method_config``, as every host does). All problems are
reported together, one line each, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import read_json, suggest, validate_method_config
from ...errors import ConfigError
from ...plugins import registered_families
from .host_schema import HOST_SCHEMA, check_host_paths, host_key_warnings


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
    section through the core ``validate_method_config``. Raises ``ConfigError`` with every problem, one line each."""

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
    if not host_problems:
        from ...optimizers import check_available

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

    if check_paths and not problems:
        problems += check_host_paths(host)
    if check_paths and not problems:
        problems += backend_file_problems(host["data_backend_config"], family_cls)
        from .prompt_library import library_prompts

        _, library_problems, library_warnings = library_prompts(host)
        problems += library_problems
        warnings += library_warnings
        if host["webhook_config"]:
            from .webhooks import load_webhook_config

            try:
                load_webhook_config(host["webhook_config"])
            except ConfigError as exc:
                problems += list(exc.problems)
    if problems:
        raise ConfigError(problems)
    return RunConfig(path, host, method_name, method_cls, method_config, family_cls, warnings)


def backend_file_problems(path: str, family_cls: type | None = None) -> list[str]:
    """Every problem of the data backend file, read and checked here — by ``validate-config`` and before the trainer
    loads any model — rather than only once the VAE and text encoder are loaded; with ``family_cls``, also a video
    dataset for an image-only family (``video = False``). (Its warnings come when the run builds the dataset.)"""
    from ...errors import UserError
    from .backends import load_backend_config

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
    problems += list(family_cls.config_problems(host))  # what else the family cannot run (Wan 2.2: model_type full)
    return problems


__all__ = ["RunConfig", "backend_file_problems", "family_key_problems", "load_config", "validate_config"]
