"""The networks of a run, for method authors: the student, the teacher and any second adapter on one frozen base, each
call counted by role, and the teacher's guided flow with cond and uncond as one batch. DMD, LCM, DCM and the example
method plugin all call their networks through ``Networks``; a third-party method should too (it is public API).

Teacher: a separate frozen copy when the host has one (``model_type: full``), otherwise the student's base with every
adapter disabled (``AdapterSwitch.disabled()``) — never a second copy of the model. Training passes go through
``StepInfo.network`` (the host's prepared module, DDP-wrapped under several processes, so gradients are averaged):
call ``at(step)`` at the start of each step hook. Every call is counted by role in a ``PassCounter`` so a method's cost
can be stated in passes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .adapters import AdapterSwitch, add_adapter_beside
from .errors import UserError
from .passes import PassCounter
from .types import RunContext

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def require_teacher(run: RunContext, method_name: str) -> None:
    """A method whose teacher is the student's base with its adapters off needs ``model_type: lora``; a full student
    needs the host's separate frozen teacher. Refuse a context that can do neither, at setup, in one line."""
    if run.model_type != "lora" and run.teacher is None:
        raise UserError(f"distillation_method {method_name}: model_type {run.model_type!r} trains the base itself, so "
                        "the teacher must be a separate frozen copy, and this host gave none (RunContext.teacher)")


def guided_batch(family: Any, flow_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], x_t: torch.Tensor,
                 t: torch.Tensor, cond: Any, uncond: Any, combine: Combine | None) -> torch.Tensor:
    """``flow_fn(x_t, t, cond)``; with ``combine`` (a CFG form ``(c, u) → …``, e.g. ``flow.guided`` at a scale), the
    cond and the unconditional condition ``uncond`` (one encoded negative prompt, repeated to the batch with
    ``family.repeat_condition``) concatenated (``family.concat_conditions``), run as one batch of 2B, split in two and
    combined. ``flow_fn`` may return anything computed per sample from the flow (a flow, an x̂0, a consistency
    output). Every guided call of the package goes through here: the methods' ``Networks.guided`` and samplers, the
    few-step sampler and the families' Euler sampler."""
    if combine is None:
        return flow_fn(x_t, t, cond)
    both = family.concat_conditions([cond, family.repeat_condition(uncond, x_t.shape[0])])
    c, u = flow_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    return combine(c, u)


class Networks:
    def __init__(self, run: RunContext, passes: PassCounter, *, negative_prompt: str | None = None,
                 method_name: str = "this method"):
        require_teacher(run, method_name)
        self.run = run
        self.family = run.family
        self.student = run.student  # the bare module: adapters, state, sampling
        self.call = run.student  # the module training passes call: the host's prepared one, set per step
        self.passes = passes
        self.switch: AdapterSwitch | None = AdapterSwitch(run.student) if run.model_type == "lora" else None
        self.negative_prompt = negative_prompt if negative_prompt is not None else run.negative_prompt
        self.uncond = run.encode_prompts([self.negative_prompt])  # once: hosts may free the encoder after setup

    def at(self, step) -> None:
        """Training passes of this step go through ``step.network`` (DDP-wrapped under several processes)."""
        self.call = step.network or self.student

    # ------------------------------------------------------------------ contexts

    def adapters(self, *names: str):
        """Only ``names`` act inside (no-op for a full student, which has no adapters)."""
        return self.switch.use(*names) if self.switch is not None and names else contextlib.nullcontext()

    def teacher_context(self):
        if self.run.teacher is not None:
            return contextlib.nullcontext()
        return self.switch.disabled()

    # ------------------------------------------------------------------ calls

    def flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, *, role: str = "student",
             module: torch.nn.Module | None = None) -> torch.Tensor:
        """The student network's flow with whatever adapters are active (fp32), a training pass counted as ``role``.
        ``module``: another network to call (a full-copy fake score), or the bare module for a pass whose backward
        must not reach a DDP wrapper."""
        self.passes.forward(role, x_t.shape[0], grad=torch.is_grad_enabled())
        return self.family.predict_flow(self.call if module is None else module, x_t, t, cond).float()

    def sample_flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The student's flow for sampling (validation): the bare module — a DDP wrapper's forward on the one process
        that validates would wait for the others — and not counted (it is not a training pass)."""
        return self.family.predict_flow(self.student, x_t, t, cond).float()

    def teacher_flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, *, bare: bool = False) -> torch.Tensor:
        """The teacher's flow. ``bare``: call the unwrapped module (a pass whose backward reaches no parameter, which
        a DDP wrapper must not see)."""
        self.passes.forward("teacher", x_t.shape[0], grad=torch.is_grad_enabled())
        network = self.run.teacher if self.run.teacher is not None else (self.student if bare else self.call)
        with self.teacher_context():
            return self.family.predict_flow(network, x_t, t, cond).float()

    def guided(self, flow_fn: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, cond: Any,
               combine: Combine | None) -> torch.Tensor:
        """``flow_fn``'s flow; with ``combine`` (a CFG form) on the cond and the negative prompt's uncond prediction,
        run as one batch of 2B."""
        return guided_batch(self.family, flow_fn, x_t, t, cond, self.uncond, combine)

    # ------------------------------------------------------------------ a second adapter

    def add_adapter(self, name: str, rank: int | None) -> list[torch.nn.Parameter]:
        """A new LoRA adapter ``name`` on the student's base (B = 0: it starts as a no-op), with the student adapter's
        targets and scale; the student's adapter stays active and both stay trainable. Returns its parameters."""
        params = add_adapter_beside(self.student, self.run.student_adapter, name, rank)
        self.switch = AdapterSwitch(self.student)  # the new adapter's layers
        return params


@contextlib.contextmanager
def frozen(params: list[torch.nn.Parameter]):
    """``requires_grad`` off for ``params`` inside (restored on exit): a forward run inside builds no graph to them, so
    a loss of another network that shares their layers cannot reach them."""
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
