"""The checks that stop a SimpleTuner run before any model loads.

A mistake in ``distillation_config`` used to surface only once SimpleTuner had loaded its models and cached text
embeddings and latents (40 s on the tiny model; hours on a real data set). Three places now check a config first:

1. ``simpletuner train`` (SimpleTuner's own command): right before it starts ``accelerate launch``, the config file the
   training process will read (``CONFIG_BACKEND`` json, found as SimpleTuner finds it) is checked in the command's own
   process. Problems print as ``error: …`` lines — the last thing printed — and the command exits 2 without launching
   anything (``wrap_cli_launch``, applied by the import hook when ``simpletuner.cli.train`` loads).
2. The training process (``simpletuner train``'s child, the launcher, any other way of running SimpleTuner's trainer):
   right after ``Trainer.parse_arguments``, before SimpleTuner loads a model (``check_parsed_config``; ``patch.py``).
3. ``simpletuner-dmd validate-config --host simpletuner`` (``host_problems``), which also runs SimpleTuner's own
   argument checks when SimpleTuner is installed in the same environment.

What is checked, for a ``distillation_method`` the plugin serves (any case: SimpleTuner matches method names without
regard to case): the method's config through the core's ``validate_method_config`` (every problem, one line each,
naming the key), that a plugin family serves SimpleTuner's ``model_family``/``model_flavour``, that the family is
flow-matching (``not_flow_matching``: otherwise SimpleTuner's own distiller serves a name SimpleTuner has —
``hand_back`` — and any other name is refused, naming the families served), that the adapter type is one the bridge
serves, that SimpleTuner's FSDP and context parallelism are off (``parallelism_problems``); and — where SimpleTuner
is importable — every value SimpleTuner's own argument parser would refuse (its choices and types, read from
SimpleTuner's parser, not copied) and a ``validation_prompt_library`` value its prompt-library lookup refuses.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from ...config import validate_method_config
from ...errors import ConfigError, UserError, print_user_error
from . import base_loras
from .shared import MARK, log, served_name


def served_method(config: Mapping[str, Any], served: list[str]) -> str | None:
    """The plugin's method name for the config's ``distillation_method``, matched without regard to case, or None."""
    return served_name(config.get("distillation_method"), served)


def simpletuner_prediction_types() -> dict[str, str]:
    """SimpleTuner's model families and what each predicts (``flow_matching``, ``epsilon``, ...), from its model
    registry's metadata (4.x: ``helpers/models/model_metadata.json``, read without importing a model); empty where
    SimpleTuner is not importable or its registry has no metadata (3.x)."""
    try:
        from simpletuner.helpers.models.registry import ModelRegistry
    except ImportError:
        return {}
    load = getattr(ModelRegistry, "_load_metadata", None)
    if load is None:
        return {}
    load()
    return {family: str(meta.get("prediction_type")) for family, meta in ModelRegistry._metadata.items()
            if meta.get("prediction_type")}


def simpletuner_own_methods() -> set[str]:
    """The distillation methods SimpleTuner itself implements (its ``DistillationMethod`` enum)."""
    from simpletuner.helpers.distillation.factory import DistillationMethod

    return {m.value for m in DistillationMethod}


def not_flow_matching(config: Mapping[str, Any], method: str) -> tuple[str | None, str | None]:
    """For a SimpleTuner ``model_family`` that is not flow-matching (SDXL, SD 1.x, PixArt, DeepFloyd, ...), which the
    plugin's methods cannot serve: ``(None, note)`` when SimpleTuner has its own ``method`` (its distiller then serves
    the run, said in ``note``), ``(problem, None)`` when it does not. ``(None, None)`` for a flow-matching family, or
    one whose prediction SimpleTuner's registry does not say."""
    kinds = simpletuner_prediction_types()
    family = str(config.get("model_family") or "").lower()
    kind = kinds.get(family)
    if kind is None or kind == "flow_matching":
        return None, None
    if method in simpletuner_own_methods():
        return None, (f"model_family {family} predicts {kind}: distillation_method {method} is SimpleTuner's own "
                      f"here (simpletuner-dmd serves flow-matching families)")
    served = ", ".join(sorted(f for f, k in kinds.items() if k == "flow_matching"))
    return (f"model_family {family}: SimpleTuner's {family} predicts {kind}; distillation_method {method} "
            f"(simpletuner-dmd) serves the flow-matching families: {served}"), None


def hand_back(config: Mapping[str, Any], served: list[str]) -> str | None:
    """When the config's method is one the plugin serves but its model family is not flow-matching and SimpleTuner
    has a method of that name, the name is taken out of ``served`` — the list every take-over point of ``patch.py``
    reads — so SimpleTuner's own distiller serves the run. Returns the note saying so, or None."""
    method = served_method(config, served)
    if method is None:
        return None
    _, note = not_flow_matching(config, method)
    if note is not None:
        served.remove(method)
    return note


def _setting(config: Mapping[str, Any], key: str) -> Any:
    """``key`` of a SimpleTuner config, written bare or as its command-line option (``--key``)."""
    return config.get(key, config.get(f"--{key}"))


def _on(value: Any) -> bool:
    return value is True or str(value).strip().lower() in {"1", "true", "yes", "on"}


def parallelism_problems(config: Mapping[str, Any], method: str) -> list[str]:
    """SimpleTuner's FSDP (``fsdp_enable``, version 1 or 2) and its context parallelism (``context_parallel_size`` >
    1) with a plugin method: refused, one line each (``docs/simpletuner-multi-gpu.md`` says what goes wrong).

    FSDP: the bridge builds the method before SimpleTuner's ``accelerator.prepare``, which then replaces every
    parameter of the trained network by a sharded one — the method's own optimizer (DMD's fake score) keeps the old
    tensors, which get no gradient from then on (its critic silently stops learning), and its checkpoint crashes
    (accelerate's ``save_fsdp_optimizer``: ``KeyError``). Context parallelism: SimpleTuner splits the trained network's
    sequence over a group of processes that must feed it the same inputs, and scales its own loss for it; the method's
    draws (noise, timesteps, its generator's rollout) are per process and its own losses are not scaled."""
    problems = []
    if _on(_setting(config, "fsdp_enable")):
        problems.append(f"fsdp_enable: SimpleTuner's FSDP is not served with distillation_method {method} "
                        "(simpletuner-dmd): its prepare replaces the network's parameters after the method built its "
                        "own optimizer, which would then train nothing; leave fsdp_enable off (several processes "
                        "train with DDP)")
    cp = _setting(config, "context_parallel_size")
    try:
        cp_size = int(cp) if cp not in (None, "", "None") else 1
    except (TypeError, ValueError):
        cp_size = 1  # SimpleTuner refuses a value that is not a whole number itself
    if cp_size > 1:
        problems.append(f"context_parallel_size: {cp_size} is not served with distillation_method {method} "
                        "(simpletuner-dmd): the method's own draws and losses are per process, not shared by a "
                        "context-parallel group; use 1")
    return problems


def plugin_problems(config: Mapping[str, Any], method: str, pm) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the plugin's own part of a SimpleTuner config for ``method``."""
    from .distiller import simpletuner_family_class

    refused, _ = not_flow_matching(config, method)
    if refused is not None:
        return [refused], []
    problems: list[str] = parallelism_problems(config, method)
    model_type = str(config.get("model_type") or "lora").lower()
    lora_type = str(config.get("lora_type") or "standard").lower()
    if model_type == "lora" and lora_type != "standard":
        problems.append(f"lora_type: {config.get('lora_type')!r} is not served by distillation_method {method}: its "
                        "extra networks (DMD's fake score) are peft adapters beside the student's; use lora_type "
                        "standard, or model_type full")
    family_cls = None
    try:
        family_cls = simpletuner_family_class(pm, config.get("model_family"), config.get("model_flavour"))
    except UserError as exc:
        problems.extend(str(exc).splitlines())
    problems.extend(base_loras.problems(config, family_cls))  # teacher_loras, the plugin's key beside the method's
    _, method_section, _ = base_loras.split(config.get("distillation_config"))
    selection, method_problems = validate_method_config(method, method_section, pm, family_cls=family_cls,
                                                        host=config)
    problems.extend(method_problems)
    return problems, list(selection.warnings) if selection is not None else []


def simpletuner_version() -> str:
    return metadata.version("simpletuner")


def extend_method_choices(served: list[str]) -> None:
    """Add the plugin's method names to SimpleTuner's ``distillation_method`` choices and drop its cached parser (the
    take-over point 1 of ``patch.py``; the checks here build SimpleTuner's parser the same way)."""
    from simpletuner.helpers.configuration import cmd_args
    from simpletuner.simpletuner_sdk.server.services.field_registry.registry import field_registry

    field = field_registry._fields["distillation_method"]
    known = {c.get("value") if isinstance(c, dict) else c for c in (field.choices or [])}
    for name in served:
        if name not in known:
            field.choices.append({"value": name, "label": f"{name.upper()} (simpletuner-dmd)"})
    cmd_args._ARG_PARSER_CACHE = None


def simpletuner_argument_problems(config: Mapping[str, Any], served: list[str]) -> list[str]:
    """Every value of ``config`` that SimpleTuner's own argument parser would refuse (a choice it lacks, a value its
    type rejects), as SimpleTuner turns the config into arguments (``mapping_to_cli_args``). The plugin's method names
    are added to the ``distillation_method`` choices first, as the import hook does for the trainer."""
    from simpletuner.helpers.configuration import cmd_args
    from simpletuner.helpers.configuration.cli_utils import mapping_to_cli_args

    extend_method_choices(served)
    parser = cmd_args.get_argument_parser()
    version = simpletuner_version()
    problems = []
    for argument in mapping_to_cli_args(dict(config)):
        option, has_value, raw = argument.partition("=")
        action = parser._option_string_actions.get(option)
        if action is None or not has_value:
            continue  # a flag, or a key SimpleTuner's parser does not define (its own legacy handling decides)
        key = option.lstrip("-")
        try:
            value = action.type(raw) if callable(action.type) else raw
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            problems.append(f"{key}: SimpleTuner {version} refuses {raw!r} ({exc})")
            continue
        if action.choices is not None and value not in action.choices:
            accepted = ", ".join(str(c) for c in action.choices)
            problems.append(f"{key}: SimpleTuner {version} refuses {raw!r}; it accepts {accepted}")
    problems.extend(_prompt_library_problems(config, version))
    return problems


def _prompt_library_problems(config: Mapping[str, Any], version: str) -> list[str]:
    """SimpleTuner 4.x reads ``validation_prompt_library`` as true/false or the name of one of its built-in libraries
    (the quickstart's file path is refused once validation is set up); a file of one's own prompts is
    ``user_prompt_library``."""
    value = config.get("validation_prompt_library")
    if value is None or isinstance(value, bool):
        return []
    try:
        from simpletuner.helpers.prompts import get_validation_prompt_library
    except ImportError:  # SimpleTuner 3.x: no built-in libraries, the key is a flag there
        return []
    try:
        get_validation_prompt_library(value)
    except ValueError as exc:
        return [f"validation_prompt_library: SimpleTuner {version} refuses {value!r} ({exc}); a JSON file of your own "
                "prompts goes in user_prompt_library"]
    return []


def simpletuner_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("simpletuner") is not None


def host_problems(config: Mapping[str, Any], pm, *, with_simpletuner: bool) -> tuple[str | None, list[str], list[str]]:
    """(the served method or None, problems, warnings) of a SimpleTuner config, as ``validate-config --host
    simpletuner`` reports them."""
    from ...plugins import registered_methods

    served = list(registered_methods(pm))
    note = hand_back(config, served)
    method = served_method(config, served)
    problems: list[str] = []
    warnings: list[str] = [note] if note else []
    if method is not None:
        problems, warnings = plugin_problems(config, method, pm)
    if with_simpletuner:
        problems.extend(simpletuner_argument_problems(config, served))
    return method, problems, warnings


def validate_for_simpletuner(path: Path) -> int:
    """``simpletuner-dmd validate-config --host simpletuner PATH``: every problem at once (``ConfigError``), else the
    warnings and one ``ok:`` line. SimpleTuner's own argument checks run when SimpleTuner is importable here; when it
    is not, one warning says they did not."""
    from ...config import read_json
    from ...plugins import get_plugin_manager

    config = read_json(path, "config")
    if not isinstance(config, dict):
        raise ConfigError([f"config: {path} must hold a JSON object"])
    with_simpletuner = simpletuner_importable()
    method, problems, warnings = host_problems(config, get_plugin_manager(), with_simpletuner=with_simpletuner)
    if problems:
        raise ConfigError(problems)
    if not with_simpletuner:
        warnings.append("SimpleTuner is not installed in this environment: only the plugin's keys were checked, not "
                        "SimpleTuner's own (run this where SimpleTuner is installed)")
    for warning in warnings:
        print(f"warning: {warning}")
    against = f"SimpleTuner {simpletuner_version()}" if with_simpletuner else "SimpleTuner (not installed here)"
    print(f"ok: {path} for {against} (distillation_method: {method or 'none of the plugin'})")
    return 0


def check_parsed_config(config: Mapping[str, Any], served: list[str]) -> None:
    """In the training process, right after SimpleTuner parsed its config: raise ``ConfigError`` with every problem of
    the plugin's part (SimpleTuner's parser has already checked its own)."""
    note = hand_back(config, served)
    if note is not None:
        log(note)
    method = served_method(config, served)
    if method is None:
        return
    from ...plugins import get_plugin_manager

    problems, _ = plugin_problems(config, method, get_plugin_manager())
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- `simpletuner train`, before the launch


def config_file_for(env: Mapping[str, str]) -> Path | None:
    """The JSON config the training process will read with ``env`` — SimpleTuner's lookup: ``CONFIG_PATH`` (a folder
    holding ``config.json``, a file, or a path without its ``.json``), else ``config/<ENV>/config.json`` or
    ``<ENV>/config.json``, else ``config/config.json``. None for another backend (toml, env) or when no file is there
    (SimpleTuner then reports it itself)."""
    backend = (env.get("SIMPLETUNER_CONFIG_BACKEND") or env.get("CONFIG_BACKEND") or env.get("CONFIG_TYPE") or "json")
    if backend.lower() != "json":
        return None
    candidates: list[Path] = []
    override = env.get("CONFIG_PATH")
    if override:
        path = Path(override).expanduser()
        candidates += [path / "config.json"] if path.is_dir() else ([path] if path.suffix else []) + [
            path.with_suffix(".json")]
    name = env.get("SIMPLETUNER_ENVIRONMENT") or env.get("SIMPLETUNER_ENV") or env.get("ENV")
    if name and name != "default":
        candidates += [Path(name) / "config.json", Path("config") / name / "config.json"]
    else:
        candidates.append(Path("config") / "config.json")
    return next((c for c in candidates if c.is_file()), None)


class _Refused(BaseException):
    """Raised through SimpleTuner's ``run_training`` (whose ``except Exception`` would print it as a launch failure)
    back to the wrapper, which returns exit status 2."""


class _CheckFailed(BaseException):
    """A bug in the check itself, carried past ``run_training``'s ``except Exception`` (which would print only its
    message) so that the wrapper re-raises it with its traceback."""


def wrap_cli_launch() -> None:
    """Wrap ``simpletuner.cli.train.run_training`` so that the config is checked right before ``accelerate launch``
    starts (SimpleTuner has then resolved which config file the training process reads, in the environment it hands
    the process)."""
    from simpletuner.cli import train as cli_train

    current = cli_train.run_training
    if getattr(current, MARK, False):
        return
    real_subprocess = cli_train.subprocess

    class CheckedSubprocess:
        """``subprocess`` as ``run_training`` sees it: ``Popen`` checks the config before it starts the launch."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real_subprocess, name)

        @staticmethod
        def Popen(cmd, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any):  # noqa: N802
            try:
                path, problems = launch_problems(env if env is not None else os.environ)
            except UserError as exc:  # e.g. a broken plugin package: the user's to fix, in its own lines
                path, problems = config_file_for(env if env is not None else os.environ), str(exc).splitlines()
            except Exception as exc:  # not handled: re-raised by run_training below, traceback and all
                raise _CheckFailed() from exc
            if problems:
                print(f"[simpletuner-dmd] {path}: nothing was launched; `simpletuner-dmd validate-config --host "
                      f"simpletuner {path}` checks a config without starting SimpleTuner", flush=True)
                print_user_error(ConfigError(problems))
                raise _Refused()
            return real_subprocess.Popen(cmd, *args, env=env, **kwargs)

    def run_training(*args: Any, **kwargs: Any) -> int:
        cli_train.subprocess = CheckedSubprocess()
        try:
            return current(*args, **kwargs)
        except _Refused:
            _quiet_exit_reports()
            return 2
        except _CheckFailed as failed:
            raise failed.__cause__ from None
        finally:
            cli_train.subprocess = real_subprocess

    setattr(run_training, MARK, True)
    cli_train.run_training = run_training


def _quiet_exit_reports() -> None:
    """torch's Dynamo logs two reports at interpreter exit (the frames it traced, its compile times), at INFO, which
    SimpleTuner's logging set-up prints. Nothing ran, so they say nothing; without them the ``error:`` lines stay the
    last thing the command prints."""
    import logging

    for name in ("torch._dynamo", "torch._dynamo.eval_frame", "torch._dynamo.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def launch_problems(env: Mapping[str, str]) -> tuple[Path | None, list[str]]:
    """The config file a launch with ``env`` would train on and its problems (none when it is not JSON, not found, or
    not a distillation run of the plugin's: SimpleTuner's own checks then stand)."""
    path = config_file_for(env)
    if path is None:
        return None, []
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return path, []  # SimpleTuner reports an unreadable config itself
    if not isinstance(config, dict):
        return path, []
    from ...plugins import get_plugin_manager

    method, problems, _ = host_problems(config, get_plugin_manager(), with_simpletuner=True)
    return path, problems if method is not None else []


__all__ = ["check_parsed_config", "config_file_for", "extend_method_choices", "hand_back", "host_problems",
           "launch_problems", "not_flow_matching", "parallelism_problems", "plugin_problems", "served_method",
           "simpletuner_argument_problems", "simpletuner_importable", "simpletuner_own_methods",
           "simpletuner_prediction_types", "validate_for_simpletuner", "wrap_cli_launch"]
