"""Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", 2023, stage one) for
flow-matching families: the student, called once on the prompt, learns the teacher's classifier-free-guided flow
``u + w·(c − u)``, so sampling needs one network call per step instead of two.

One micro-batch: ``t`` drawn (shifted) per sample, ``x_t = (1 − σ)·x0 + σ·ε``; under no_grad the teacher's cond and
uncond flows as one batch of 2B; with grad the student's flow on the prompt; ``guidance_distill_loss`` = their MSE.
The teacher is the host's separate frozen copy when there is one (``model_type: full``), otherwise the student's base
with its adapters switched off — no copy of the model. No state of its own; validation uses the host's Euler sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from simpletuner_dmd import Key, MethodBase, Schema, StepLoss, hookimpl
from simpletuner_dmd.config import in_range

SCHEMA = Schema(keys=(
    Key("guidance_scale", "float", 5.0, "Teacher CFG to distil, standard form u + w(c - u).", check=in_range(1)),
    Key("timestep_shift", "float", 3.0, "Shift s of the timestep draw, sigma' = s*sigma/(1+(s-1)*sigma).",
        check=in_range(0, lo_open=True)),
    Key("negative_prompt", "str", None, "Negative prompt of the unconditional branch (default: "
        "validation_negative_prompt).", nullable=True),
))


class GuidanceDistill(MethodBase):
    name = "guidance_distill"
    summary = "Guidance distillation: the student learns the teacher's CFG flow in one call (example plugin)"
    schema = SCHEMA
    progress_metrics = ("guidance_distill_loss",)  # the logs the host's progress bar shows

    def __init__(self, config: dict[str, Any]):
        self.cfg = config

    @hookimpl
    def distill_setup(self, run) -> None:
        from simpletuner_dmd import Networks, PassCounter

        # The run's networks through the public helper: the teacher is the host's frozen copy (model_type full) or
        # the student's base with its adapters off (a full student without a teacher is refused here, in one line);
        # the negative prompt is encoded once (the host may free its text encoder after setup).
        self.nets = Networks(run, PassCounter(), negative_prompt=self.cfg["negative_prompt"], method_name=self.name)

    @hookimpl
    def distill_loss(self, batch, step, host_loss):
        from simpletuner_dmd import T_MAX, add_noise_at_sigma, shift_sigma

        nets, x0 = self.nets, batch.latents
        nets.at(step)  # training passes through step.network: DDP-wrapped under several processes
        sigma = shift_sigma(torch.rand(x0.shape[0]), self.cfg["timestep_shift"]).to(x0.device)
        x_t = add_noise_at_sigma(x0, torch.randn_like(x0), sigma)  # (1 − σ)·x0 + σ·ε, one σ per sample
        t = sigma * T_MAX
        w = self.cfg["guidance_scale"]
        with torch.no_grad():  # the teacher's cond and uncond flows as one batch of 2B, combined u + w(c - u)
            target = nets.guided(nets.teacher_flow, x_t, t, batch.cond, lambda c, un: un + w * (c - un))
        flow = nets.flow(x_t, t, batch.cond)
        loss = torch.mean((flow - target) ** 2)
        return StepLoss(loss, {"guidance_distill_loss": float(loss.detach()), "guidance_distill_t": float(t.mean())})
