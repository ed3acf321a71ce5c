"""Test-only shims that let SimpleTuner run on a machine without a GPU. Never imported by runtime code.

Applied first by ``run_simpletuner.py`` (the integration test's entry point in the SimpleTuner venv), and — for the
``simpletuner train`` runs, whose processes ``accelerate launch`` starts — by a ``sitecustomize`` the test puts on
``PYTHONPATH``:

1. Only beside a CPU-only torch wheel (3.1.6's venv): SimpleTuner's PyPI torchvision wheel links CUDA libraries that
   torch lacks, so its C++ ops are never registered and ``import torchvision`` fails at ``torchvision::nms``. Defining
   the two op schemas it checks for lets the pure-Python parts import (nothing in a Wan LoRA run calls them). Beside a
   CUDA build of torch with the matching torchvision (4.10.1's venv) the ops exist and defining them again would abort
   the process, so nothing is done there.
2. Only beside a CPU-only torch: the torchaudio wheel's ``lib/*.so`` fail to load and torchaudio re-raises; an import
   hook makes its ``_load_lib`` report "extension not available" instead, so torchaudio falls back to pure Python (no
   file of the venv is changed).
3. SimpleTuner's collate calls ``.pin_memory()`` unconditionally, which raises without a GPU: a no-op there.

``diffusers_context_parallel_on_cpu`` (not applied by ``apply``) is called by the reference host's context-parallel
runs on CPU processes (``tests/multiprocess/cp_job.py``, benchmarks).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

_TORCHVISION_LIB = None


def _tolerant_torchaudio_lib(module) -> None:
    """torchaudio's ``_load_lib`` reports "extension not available" (False) instead of raising when its ``.so`` cannot
    load beside a CPU-only torch, so torchaudio falls back to pure Python."""
    load_lib = module._load_lib

    def tolerant_load_lib(lib):
        try:
            return load_lib(lib)
        except OSError:
            return False

    module._load_lib = tolerant_load_lib


def apply() -> None:
    global _TORCHVISION_LIB
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None and _TORCHVISION_LIB is None:  # a CPU-only torch wheel
        _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
        _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        sys.meta_path.insert(0, _PatchAfterImport("torchaudio._extension.utils", _tolerant_torchaudio_lib))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # noqa: ARG005


def stringify_tensorboard_config() -> None:
    """SimpleTuner 4.10.1 hands its whole config to the tracker, and accelerate's tensorboard tracker refuses
    dict-valued entries (``epoch_batches_schedule``, the parsed ``distillation_config``): plain LoRA training with
    ``report_to: tensorboard`` stops at ``init_trackers`` there. Test-only: such values are stored as strings."""
    from accelerate.tracking import TensorBoardTracker

    store = TensorBoardTracker.store_init_configuration
    if getattr(store, "_stringified", False):
        return

    def store_init_configuration(self, values):
        return store(self, {k: (str(v) if isinstance(v, (dict, list, tuple)) else v) for k, v in values.items()})

    store_init_configuration._stringified = True
    TensorBoardTracker.store_init_configuration = store_init_configuration


def diffusers_context_parallel_on_cpu() -> None:
    """For CPU runs only (tests and benchmarks; never on a machine with an accelerator, where it does nothing):
    diffusers' ``ModelMixin._resolve_parallel_config`` (``enable_parallelism``) places each rank on device
    ``rank % torch.accelerator.device_count()``, which is a ZeroDivisionError without an accelerator. During that call
    the count reads 1 (the device is then ``cpu:0``, which a CPU tensor ignores); nothing else sees it. Patched when
    ``diffusers.models.modeling_utils`` is imported (at once if it already is)."""
    target = "diffusers.models.modeling_utils"

    def patch(module) -> None:
        resolve = module.ModelMixin._resolve_parallel_config
        if getattr(resolve, "_cpu_shim", False):
            return

        def _resolve_parallel_config(self, config):
            count = torch.accelerator.device_count
            if count() > 0:
                return resolve(self, config)
            torch.accelerator.device_count = lambda: 1
            try:
                return resolve(self, config)
            finally:
                torch.accelerator.device_count = count

        _resolve_parallel_config._cpu_shim = True
        module.ModelMixin._resolve_parallel_config = _resolve_parallel_config

    if target in sys.modules:
        patch(sys.modules[target])
    elif not any(isinstance(f, _PatchAfterImport) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(target, patch))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` once the module named ``target`` has executed (so nothing is imported early)."""

    def __init__(self, target: str, patch):
        self.target, self.patch = target, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def ltxvideo_text_embed_scheduler() -> None:
    """SimpleTuner 4.10.1 bug, on any device: LTX-Video says it sets up its pipelines' scheduler itself
    (``requires_special_scheduler_setup`` is True) but has no ``_load_scheduler_for_pipeline`` (the base's returns
    None), so the ``LTXPipeline`` it caches text embeds with (``_encode_prompts`` -> ``models/common.py``
    ``_load_pipeline``) gets no scheduler and stops with "missing 1 required positional argument: 'scheduler'".
    Test-only: LTX-Video gets the one Wan has, the model's own ``scheduler/``, unless SimpleTuner defines one.
    Patched when SimpleTuner's ``ltxvideo.model`` is imported."""
    target = "simpletuner.helpers.models.ltxvideo.model"

    def patch(module) -> None:
        if "_load_scheduler_for_pipeline" in vars(module.LTXVideo):
            return

        def _load_scheduler_for_pipeline(self, pipeline_type):
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler.from_pretrained(self._model_config_path(), subfolder="scheduler")

        module.LTXVideo._load_scheduler_for_pipeline = _load_scheduler_for_pipeline

    if target in sys.modules:
        patch(sys.modules[target])
    elif not any(isinstance(f, _PatchAfterImport) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(target, patch))
