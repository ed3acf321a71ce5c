"""What the import hook (``simpletuner_dmd_autoload``, loaded by a ``.pth`` file at interpreter start) does once
SimpleTuner's trainer module has been imported: apply the take-over points and say, once, what the plugin serves.

This is how ``simpletuner train`` — SimpleTuner's own command, and every process its ``accelerate launch`` starts —
runs the plugin's methods without a launcher. ``SIMPLETUNER_DMD_DISABLE=1`` turns the hook off.
"""

from __future__ import annotations

import sys
from importlib import metadata

from ...errors import UserError, print_user_error
from .shared import is_main_process, log

_applied: list[str] = []


def apply() -> list[str]:
    """Install the take-over points (idempotent) and, the first time in the main process, log one line naming each
    method the plugin serves with its distribution and version. Returns the served method names."""
    from .patch import install, served_methods

    entries = served_methods()
    served = install(list(entries))
    if not _applied:
        _applied.extend(served)
        install_user_error_hook()
        if is_main_process():
            log("serving distillation_method " + ", ".join(
                f"{name} ({entry.distribution} {_version(entry.distribution)})" for name, entry in entries.items())
                + " in SimpleTuner's trainer; other names stay SimpleTuner's (SIMPLETUNER_DMD_DISABLE=1 turns this off)")
    return served


def apply_cli() -> None:
    """In the ``simpletuner train`` command's own process: check the config before ``accelerate launch`` starts."""
    from .preflight import wrap_cli_launch

    wrap_cli_launch()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The plugin's ``UserError`` behind ``exc`` (itself, or a cause or context SimpleTuner wrapped it in)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_user_error_hook() -> None:
    """SimpleTuner 4.x's ``train.py`` re-raises what stopped training, so Python prints a traceback and exits 1. A
    user error of the plugin's (a bad ``distillation_config`` value, a checkpoint of another method) is printed as
    ``error: …`` lines instead, one per problem; every other exception keeps its traceback."""
    previous = sys.excepthook
    if getattr(previous, "_simpletuner_dmd", False):
        return

    def excepthook(kind, value, tb):
        error = user_error_in(value)
        if error is None:
            return previous(kind, value, tb)
        print_user_error(error)

    excepthook._simpletuner_dmd = True
    sys.excepthook = excepthook


__all__ = ["apply", "apply_cli", "install_user_error_hook", "is_main_process", "user_error_in"]
