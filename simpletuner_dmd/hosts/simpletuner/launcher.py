"""Run SimpleTuner's own trainer with the plugin's methods: ``simpletuner-dmd simpletuner-train [--config FILE]``
(or ``python -m simpletuner_dmd.hosts.simpletuner``).

It applies ``patch.install()`` and then runs SimpleTuner's ``simpletuner.train`` module as ``__main__`` — exactly what
SimpleTuner's own ``simpletuner train`` runs in each process — so every SimpleTuner option works as usual. Without
``--config``, SimpleTuner finds its config as it always does (``CONFIG_BACKEND``/``CONFIG_PATH``, ``ENV``, or
``config/config.json``).

SimpleTuner's ``train.py`` catches every exception, prints it and exits 0. This launcher exits 1 when SimpleTuner's
training did not return normally, so scripts and CI see a failure.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from ...errors import UserError


def run(config: Path | None = None) -> int:
    if config is not None:
        if not Path(config).is_file():
            raise UserError(f"--config: file not found: {config}")
        os.environ["CONFIG_BACKEND"] = "json"
        os.environ["CONFIG_PATH"] = str(Path(config).resolve())
    try:
        import simpletuner  # noqa: F401
    except ImportError:
        raise UserError("SimpleTuner is not installed in this environment (see the README section Using with SimpleTuner: "
                        "scripts/install_simpletuner_env.sh creates one)") from None

    from .distiller import log
    from .patch import install

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
        print("[simpletuner-dmd] error: SimpleTuner's training did not finish (its traceback is above; SimpleTuner's "
              "own train.py exits 0 even then)", file=sys.stderr)
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
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


__all__ = ["main", "run"]
