"""The hook contract between a host trainer, distillation methods and model families.

Two kinds of hooks live here.

**Registration hooks** are implemented by every plugin (built-in or third-party, found through the entry-point group
``simpletuner_dmd``). They hand classes to a ``register`` callback; nothing is instantiated at registration time.

**Step-loop hooks** are implemented by the *selected method's instance* only. The host builds that instance from the
method class registered under ``distillation_method`` and registers it with the plugin manager for the run (a method
that is not selected is never registered, so its hooks never run). The host calls the step-loop hooks through
``pm.hook.<name>(...)``.

Order of calls in one run (the reference host in ``hosts/reference/trainer.py`` does exactly this; the SimpleTuner
bridge maps SimpleTuner's distiller calls onto the same order)::

    register_methods(register)                  at start-up (plugins.registered_methods): every plugin's methods
    register_model_families(register)           at start-up (plugins.registered_families); then the config is checked
    distill_setup(run)                          once, after the student's adapter exists, before accelerator.prepare
    distill_load_state(checkpoint_dir)          once, when resuming, after the host restored its own state
    for each optimizer step:
        for each micro-batch (gradient accumulation):
            distill_loss(batch, step, host_loss) -> StepLoss | None
            host: backward of the returned loss (or of its own loss when None was returned;
                  nothing when StepLoss.loss is None)
        host: clip, student optimizer.step(), zero_grad()         (skipped when no micro-batch had a student loss)
        distill_after_optimizer_step(step)      once per optimizer step, after the student's step (the critic's turn)
        distill_metrics(step) -> dict           merged into the host's log line
        distill_save_state(checkpoint_dir)      on checkpoint steps, into the host's (temporary) checkpoint folder
        distill_sampler(...)                    on validation steps, to make samples with the method's schedule
    distill_save_state(checkpoint_dir)          once more at the end with the final checkpoint
    distill_scheduler()                         at the export, saved beside the student for stock pipelines (a host
                                                that validates with a stock pipeline asks it at validation instead)

Contract for every step-loop hook: exceptions propagate (a host never wraps them); the hook leaves the student's
adapter active and every adapter's ``requires_grad`` as it found them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # the types are documentation; importing them must stay cheap
    import torch

    from .types import Batch, RunContext, Sampler, StepInfo, StepLoss

PROJECT = "simpletuner_dmd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def register_methods(register: Callable[[type], None]) -> None:
    """Register distillation method classes: call ``register(MethodClass)`` once per method.

    A method class has a unique ``name`` (the value of ``distillation_method``), a ``schema`` (a
    ``simpletuner_dmd.config.Schema`` describing every key of its ``distillation_config``), a one-line ``summary``, and
    a constructor ``MethodClass(config)`` taking the validated config (a mapping of key to value). Its instance
    implements the step-loop hooks below with ``@hookimpl``.
    """


@hookspec
def register_model_families(register: Callable[[type], None]) -> None:
    """Register model-family classes: call ``register(FamilyClass)`` once per family.

    A family class has a unique ``name`` (the value of ``model_family``) and implements the ``ModelFamily`` Protocol
    in ``simpletuner_dmd.types``: how its network is called (the flow prediction for a noisy latent, a timestep and a
    condition), σ(t), its latent layout, how conditions are batched, and — for hosts that load models — how its
    components are loaded and how media and prompts are encoded.
    """


# --------------------------------------------------------------------------- step loop


@hookspec
def distill_setup(run: RunContext) -> None:
    """Build the method's extra models and optimizers. Called once, before ``accelerator.prepare`` of the student.

    ``run`` carries the host config, the method config, the model family, the student (the trainable network, with
    the student adapter already added when ``model_type`` is ``lora``), the accelerator, ``encode_prompts`` (valid
    during this call only: hosts may free the text encoder afterwards), the negative prompt text and the output folder.
    Add adapters or models here (so they exist before the host wraps the student for several processes) and prepare
    your own optimizers with ``run.accelerator``. Do not touch the student's optimizer: the host owns it.
    """


@hookspec(firstresult=True)
def distill_loss(batch: Batch, step: StepInfo, host_loss: Callable[[], torch.Tensor]) -> StepLoss | None:
    """The loss of one micro-batch. ``firstresult``: the selected method answers.

    Return ``None`` to let the host use its ordinary loss (``host_loss()``). Return a ``StepLoss`` to replace it:
    ``StepLoss.loss`` is what the host back-propagates into the student (already divided by nothing: the host scales
    for gradient accumulation), or ``None`` when the student takes no step on this micro-batch (DMD's critic-only
    steps). ``host_loss`` computes the host's own denoising loss on demand; a method may add it (DMD only when its
    explicit weight is set). ``StepLoss.logs`` are scalars for the tracker.

    The method may stash what later hooks of this optimizer step need (DMD keeps the generated sample for its critic).
    """


@hookspec
def distill_after_optimizer_step(step: StepInfo) -> None:
    """Once per optimizer step, after the student's ``optimizer.step()`` and ``zero_grad()``.

    Also called on optimizer steps where the student did not step. This is where a method updates its own networks:
    DMD's fake score (critic), an EMA/target network (LCM), a discriminator (DCM). Runs on every process.
    """


@hookspec
def distill_metrics(step: StepInfo) -> dict[str, float] | None:
    """Scalars to log for this optimizer step (merged with the host's). Names are tracker keys."""


@hookspec
def distill_save_state(checkpoint_dir: Path) -> None:
    """Write the method's state (weights, optimizer, counters) into ``checkpoint_dir`` (the host's folder, which the
    host makes atomic). Use safetensors/JSON only: hosts never unpickle checkpoint files. Called on every process;
    write only where ``accelerator.is_main_process`` (the host waits for everyone afterwards)."""


@hookspec
def distill_load_state(checkpoint_dir: Path) -> None:
    """Restore what ``distill_save_state`` wrote. Called once on resume, after ``distill_setup`` and after the host
    restored its own state. A checkpoint without the method's files is a user error (say which file is missing)."""


@hookspec(firstresult=True)
def distill_sampler() -> Sampler | None:
    """The sampler validation should use for the student, or ``None`` for the host's default.

    A ``Sampler`` is a callable ``sampler(noise, cond, uncond, guidance_scale, generator) -> x0 latents``; a few-step
    method samples with its own schedule (DMD: ``dmd_denoising_steps``). ``firstresult``.
    """


@hookspec(firstresult=True)
def distill_scheduler() -> object | None:
    """A diffusers scheduler with which a *stock* pipeline samples the student the way the method does, or ``None``
    when the method has none (the host keeps its own). ``firstresult``.

    Hosts that validate through a diffusers pipeline instead of ``distill_sampler`` ask for it after
    ``distill_setup``: the SimpleTuner bridge answers SimpleTuner's ``get_scheduler()`` with it. DMD returns a
    ``simpletuner_dmd.fewstep_scheduler.FewStepFlowScheduler`` over its ``dmd_denoising_steps``.
    """


def all_hook_names() -> list[str]:
    """Every hook name in this module (used by the docs/meta tests)."""
    return [
        name
        for name, obj in globals().items()
        if callable(obj) and hasattr(obj, f"{PROJECT}_spec")
    ]


__all__ = ["PROJECT", "hookspec", "hookimpl", "all_hook_names"]
