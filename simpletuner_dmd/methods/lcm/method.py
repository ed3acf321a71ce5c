"""LCM (latent consistency distillation) for flow-matching families, in the diffusers LCM-LoRA design.

One micro-batch (``distill_loss``):
  1. draw n ~ U{1, …, N} per sample on the skipping schedule (``num_ddim_timesteps`` points) and w ~ U[w_min, w_max];
     ``x_n = (1 − σ_n)·x0 + σ_n·ε``;
  2. under no_grad: the teacher (the base with adapters disabled) guided with w (cond + negative prompt as one batch),
     one Euler step of its flow ODE to ``x_{n−1}``; the target ``f(x_{n−1}, t_{n−1})`` from the *student itself*
     (adapters on) — no separate target network (diffusers' LCM-LoRA; an EMA target would be a full copy of the
     adapter's effect that LCM-LoRA found unnecessary);
  3. with grad: ``f(x_n, t_n)``; ``lcm_loss`` = l2 or pseudo-Huber between them. f applies the boundary scalings,
     so ``f(x, 0) = x``.

No state besides a counter; the validation sampler is the multi-step consistency sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...method_toolkit import load_method_state, save_method_state
from ...hookspecs import hookimpl
from ...method_base import MethodBase
from ...passes import PassCounter
from ...types import Batch, RunContext, StepInfo, StepLoss
from ...networks import Networks, guided_batch
from ...flow import add_noise, euler_step, guided, guided_per_sample, sigma_of
from .loss import consistency_loss, consistency_output, sampling_timesteps, skipping_schedule
from .config import LCM_SCHEMA


class LCM(MethodBase):
    name = "lcm"
    summary = "Latent Consistency Model distillation (LCM-LoRA design): any-step student, no extra network"
    schema = LCM_SCHEMA
    progress_metrics = ("lcm_loss",)  # the logs the host's progress bar shows

    def __init__(self, config: dict[str, Any]):
        self.cfg = config
        self.passes = PassCounter()
        self.updates = 0
        self._logs: dict[str, float] = {}

    @hookimpl
    def distill_setup(self, run: RunContext) -> None:
        cfg = self.cfg
        self.nets = Networks(run, self.passes, negative_prompt=cfg["negative_prompt"], method_name=self.name)
        self.family = run.family
        self.accelerator = run.accelerator
        shift = cfg["shift"] if cfg["shift"] is not None else float(run.host_config.get("flow_schedule_shift", 1.0))
        self.shift = shift
        self.schedule = skipping_schedule(cfg["num_ddim_timesteps"], shift)  # t_0 = 0 … t_N = 1000
        # w = 1 everywhere: cond only, and the uncond half of the teacher batch is never run
        self._use_uncond = not (cfg["w_min"] == cfg["w_max"] == 1.0)

    # ------------------------------------------------------------------ the consistency function

    def f(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The student's consistency function (boundary scalings applied), with grad if grad is enabled."""
        return consistency_output(x_t, self.nets.flow(x_t, t, cond), t,
                                    timestep_scaling=self.cfg["timestep_scaling_factor"])

    @hookimpl
    def distill_loss(self, batch: Batch, step: StepInfo, host_loss) -> StepLoss:
        cfg = self.cfg
        self.nets.at(step)
        x0 = batch.latents
        b, device = x0.shape[0], x0.device
        n = torch.randint(1, cfg["num_ddim_timesteps"] + 1, (b,))
        t_n, t_prev = self.schedule[n].to(device), self.schedule[n - 1].to(device)
        w = (cfg["w_min"] + (cfg["w_max"] - cfg["w_min"]) * torch.rand(b)).to(device)
        x_n = add_noise(x0, torch.randn_like(x0), t_n)

        with torch.no_grad():
            combine = (lambda c, u: guided_per_sample(c, u, w)) if self._use_uncond else None
            v = self.nets.guided(self.nets.teacher_flow, x_n, t_n, batch.cond, combine)
            x_prev = euler_step(x_n, v, sigma_of(t_n), sigma_of(t_prev)).to(x0.dtype)
            target = self.f(x_prev, t_prev, batch.cond)  # the student itself, adapters on (LCM-LoRA)
        pred = self.f(x_n, t_n, batch.cond)
        self.passes.on_backward(pred, "student")
        loss = consistency_loss(pred, target, loss_type=cfg["loss_type"], huber_c=cfg["huber_c"])
        return StepLoss(loss, {
            "lcm_loss": float(loss.detach()),
            "lcm_timestep": float(t_n.mean()),
            "lcm_guidance": float(w.mean()),
            "lcm_target_gap": float((pred.detach() - target).abs().mean()),
        })

    @hookimpl
    def distill_after_optimizer_step(self, step: StepInfo) -> None:
        self.updates += 1  # no target network to move (LCM-LoRA); only the count, for the checkpoint

    @hookimpl
    def distill_metrics(self, step: StepInfo) -> dict[str, float]:
        return {f"passes/{k}": float(v) for k, v in self.passes.take().items()}

    # ------------------------------------------------------------------ sampling

    @hookimpl
    def distill_scheduler(self):
        """Stock pipelines sample the student with ``distill_sampler``'s schedule and rule (x̂0 through the boundary
        scalings, then re-noise)."""
        from ...fewstep_scheduler import FewStepFlowScheduler

        return FewStepFlowScheduler(
            few_step_timesteps=sampling_timesteps(self.schedule, self.cfg["num_inference_steps"]),
            consistency_timestep_scaling=self.cfg["timestep_scaling_factor"],
            sampling_schedule=[float(t) for t in self.schedule])

    @hookimpl
    def distill_sampler(self):
        timesteps = sampling_timesteps(self.schedule, self.cfg["num_inference_steps"])

        def student_output(x, t, cond):
            """The consistency function of the bare student (not a counted training pass)."""
            return consistency_output(x, self.family.predict_flow(self.nets.student, x, t, cond), t,
                                        timestep_scaling=self.cfg["timestep_scaling_factor"])

        def sampler(noise, cond, uncond, guidance_scale, generator):
            """Multi-step consistency sampling (LCM Alg. 3): x̂0 = f(x, τ_i), then re-noise to τ_{i+1}."""
            use_cfg = uncond is not None and guidance_scale not in (0.0, 1.0)
            combine = (lambda c, u: guided(c, u, guidance_scale)) if use_cfg else None
            x = noise
            with torch.no_grad():
                for i, tau in enumerate(timesteps):
                    t = torch.full((x.shape[0],), tau, device=x.device)
                    x0 = guided_batch(self.family, student_output, x, t, cond, uncond, combine)
                    if i + 1 < len(timesteps):
                        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                        x = add_noise(x0, eps, torch.full((x.shape[0],), timesteps[i + 1], device=x.device)
                                      ).to(noise.dtype)
            return x0

        return sampler

    # ------------------------------------------------------------------ checkpoints

    @hookimpl
    def distill_save_state(self, checkpoint_dir: Path) -> None:
        save_method_state(checkpoint_dir, "lcm", self.accelerator, {"updates": self.updates, "shift": self.shift})

    @hookimpl
    def distill_load_state(self, checkpoint_dir: Path) -> None:
        self.updates = int(load_method_state(checkpoint_dir, "lcm", "an LCM run")["updates"])
