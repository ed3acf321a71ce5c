"""Serve the plugin's methods in SimpleTuner's own ``simpletuner train``, lazily.

``simpletuner_dmd_autoload.pth`` (installed beside this module in site-packages) imports this module when any Python
of the environment starts: ``simpletuner train`` itself and every process its ``accelerate launch`` starts. It does
nothing but put one small finder on ``sys.meta_path``; SimpleTuner and the plugin are imported only when the process
imports one of two SimpleTuner modules on its own:

- its trainer module (``simpletuner.helpers.training.trainer``): right after it has run,
  ``simpletuner_dmd.hosts.simpletuner.autoload.apply()`` installs the take-over points (``patch.py``) — before any
  ``Trainer`` exists, so before SimpleTuner parses its config;
- its ``train`` command (``simpletuner.cli.train``, in the ``simpletuner train`` process itself):
  ``apply_cli()`` makes the command check the config before it starts ``accelerate launch`` (``preflight.py``).

Set ``SIMPLETUNER_DMD_DISABLE=1`` to turn it off: SimpleTuner then runs exactly as installed.

Kept free of imports beyond ``os`` and ``sys`` (its cost is paid by every interpreter start of the environment:
``benchmarks/autoload_cost.py`` measures it).
"""

import os
import sys

TARGETS = {"simpletuner.helpers.training.trainer": "apply", "simpletuner.cli.train": "apply_cli"}


def disabled() -> bool:
    return os.environ.get("SIMPLETUNER_DMD_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


class _TrainerFinder:
    """A meta-path finder that answers for the ``TARGETS`` modules only: it finds the real spec with the other finders
    and wraps its loader so that the plugin's function for that module runs once the module has executed."""

    def __init__(self):
        self.pending = dict(TARGETS)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        action = self.pending.pop(fullname)  # once per module and process
        sys.meta_path.remove(self)  # keeps the lookup below from finding this finder
        try:
            from importlib.util import find_spec

            spec = find_spec(fullname)
        finally:
            if self.pending:
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_apply(module):
            exec_module(module)
            from simpletuner_dmd.hosts.simpletuner import autoload

            getattr(autoload, action)()

        spec.loader.exec_module = exec_then_apply
        return spec

    def invalidate_caches(self):
        pass


def install() -> None:
    if disabled() or any(isinstance(f, _TrainerFinder) for f in sys.meta_path):
        return
    finder = _TrainerFinder()
    for name in [n for n in TARGETS if n in sys.modules]:  # imported before this ran (not through the .pth)
        from simpletuner_dmd.hosts.simpletuner import autoload

        getattr(autoload, finder.pending.pop(name))()
    if finder.pending:
        sys.meta_path.insert(0, finder)


install()
