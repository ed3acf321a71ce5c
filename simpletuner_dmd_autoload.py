"""Serve the plugin's methods in SimpleTuner's own ``simpletuner train``, lazily.

``simpletuner_dmd_autoload.pth`` (installed beside this module in site-packages) imports this module when any Python
of the environment starts: ``simpletuner train`` itself and every process its ``accelerate launch`` starts. It does
nothing but put one small finder on ``sys.meta_path``; SimpleTuner and the plugin are imported only when the process
imports SimpleTuner's trainer module (``simpletuner.helpers.training.trainer``) on its own. Right after that module has
run, ``simpletuner_dmd.hosts.simpletuner.autoload.apply()`` installs the take-over points (``patch.py``) — before any
``Trainer`` exists, so before SimpleTuner parses its config.

Set ``SIMPLETUNER_DMD_DISABLE=1`` to turn it off: SimpleTuner then runs exactly as installed.

Kept free of imports beyond ``os`` and ``sys`` (its cost is paid by every interpreter start of the environment:
``benchmarks/autoload_cost.py`` measures it).
"""

import os
import sys

TARGET = "simpletuner.helpers.training.trainer"


def disabled() -> bool:
    return os.environ.get("SIMPLETUNER_DMD_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


class _TrainerFinder:
    """A meta-path finder that answers for SimpleTuner's trainer module only: it finds the real spec with the other
    finders and wraps its loader so that the plugin's take-over points are applied once the module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once per process; also keeps the lookup below from finding this finder
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_apply(module):
            exec_module(module)
            from simpletuner_dmd.hosts.simpletuner.autoload import apply

            apply()

        spec.loader.exec_module = exec_then_apply
        return spec

    def invalidate_caches(self):
        pass


def install() -> None:
    if disabled() or any(isinstance(f, _TrainerFinder) for f in sys.meta_path):
        return
    if TARGET in sys.modules:  # imported before this ran (not through the .pth): apply now
        from simpletuner_dmd.hosts.simpletuner.autoload import apply

        apply()
        return
    sys.meta_path.insert(0, _TrainerFinder())


install()
