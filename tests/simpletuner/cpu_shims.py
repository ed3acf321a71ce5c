"""Test-only shims that let SimpleTuner 3.1.6 run on a CPU-only torch wheel. Never imported by runtime code.

Applied first by ``run_simpletuner.py`` (the integration test's entry point in the SimpleTuner venv):

1. SimpleTuner's PyPI torchvision wheel links CUDA libraries that a CPU torch lacks, so its C++ ops are never
   registered and ``import torchvision`` fails at ``torchvision::nms``. Defining the two op schemas it checks for lets
   the pure-Python parts import (nothing in a Wan LoRA run calls them).
2. The torchaudio wheel's ``lib/*.so`` fail to load beside the CPU torch and torchaudio re-raises; an import hook makes
   its ``_load_lib`` report "extension not available" instead, so torchaudio falls back to pure Python (no file of
   the venv is changed).
3. SimpleTuner's collate calls ``.pin_memory()`` unconditionally, which raises without CUDA: a no-op there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

_TORCHVISION_LIB = None


class _TorchaudioLibFinder(importlib.abc.MetaPathFinder):
    target = "torchaudio._extension.utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            load_lib = module._load_lib

            def tolerant_load_lib(lib):
                try:
                    return load_lib(lib)
                except OSError:
                    return False

            module._load_lib = tolerant_load_lib

        spec.loader.exec_module = exec_and_patch
        return spec


def apply() -> None:
    global _TORCHVISION_LIB
    if torch.cuda.is_available():
        return
    if _TORCHVISION_LIB is None:
        _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
        _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        sys.meta_path.insert(0, _TorchaudioLibFinder())
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # noqa: ARG005
