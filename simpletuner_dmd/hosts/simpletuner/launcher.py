"""Run SimpleTuner's own trainer with the plugin's methods: ``simpletuner-dmd simpletuner-train [--config FILE]``
(or ``python -m simpletuner_dmd.hosts.simpletuner``).

The alternative to SimpleTuner's own ``simpletuner train``, which serves the plugin through the import hook
(``simpletuner_dmd_autoload``) once ``simpletuner-dmd`` is installed beside it. The launcher applies
``patch.install()`` and then runs SimpleTuner's ``simpletuner.train`` module as ``__main__`` — what ``simpletuner
train`` runs in each process — in this one process, so every SimpleTuner option works as usual. Without ``--config``,
SimpleTuner finds its config as it always does (``CONFIG_BACKEND``/``CONFIG_PATH``, ``ENV``, or ``config/config.json``).

Exit status: 0 when SimpleTuner's training returned normally. A user error of the plugin's (SimpleTuner 4.x re-raises
it) prints ``error: …`` lines and exits 2. SimpleTuner 3.1.6's ``train.py`` catches every exception, prints it and
exits 0: the launcher then exits 1, so scripts and CI see the failure. Any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from ...errors import UserError, print_user_error


def run(config: Path | None = None) -> int:
    if config is not None:
        if not Path(config).is_file():
            raise UserError(f"--config: file not found: {config}")
        os.environ["CONFIG_BACKEND"] = "json"
        os.environ["CONFIG_PATH"] = str(Path(config).resolve())
    try:
        import simpletuner  # noqa: F401
    except ImportError:
        raise UserError("SimpleTuner is not installed in this environment (see docs/simpletuner.md: "
                        "scripts/install_simpletuner_env.sh creates one)") from None

    from .patch import install
    from .shared import log

    served = install()
    finished = _track_completion()
    log(f"SimpleTuner's trainer with the plugin's methods: {', '.join(served)}")
    argv = sys.argv
    sys.argv = [argv[0]]  # SimpleTuner's train module reads its own config, not this command's arguments
    try:
        runpy.run_module("simpletuner.train", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    if not finished:
        print("[simpletuner-dmd] error: SimpleTuner's training did not finish (its traceback is above; SimpleTuner "
              "3.1.6's own train.py exits 0 even then)", file=sys.stderr)
        return 1
    return 0


def _track_completion() -> list[bool]:
    """A list that holds ``True`` once ``Trainer.train()`` has returned normally."""
    from simpletuner.helpers.training.trainer import Trainer

    finished: list[bool] = []
    train = Trainer.train

    def tracked_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        finished.append(True)
        return result

    Trainer.train = tracked_train
    return finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner-dmd simpletuner-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="SimpleTuner's config.json (default: SimpleTuner's "
                                                                   "own lookup)")
    args = parser.parse_args(argv)
    try:
        return run(args.config)
    except Exception as exc:
        from .autoload import user_error_in

        error = user_error_in(exc)  # SimpleTuner 4.x re-raises it, possibly wrapped
        if error is None:
            raise
        print_user_error(error)
        return error.exit_code


__all__ = ["main", "run"]
