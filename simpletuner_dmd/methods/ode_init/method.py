"""ODE initialisation (CausVid §3.3, Self-Forcing's "ODE init"): regress the student onto the teacher's own ODE
trajectories before distribution matching.

A causal student started from a bidirectional checkpoint has never attended block-causally; DMD from there starts far
from any sensible few-step generator. The fix of CausVid and Self-Forcing is a regression stage: the guided teacher
solves its ODE from noise (the teacher's ODE pairs, ``simpletuner_dmd.ode_pairs``, with the states at every student
timestep), and the student learns to map a state at a student step straight to the solution.

One micro-batch (``distill_loss``), on the next pairs of the run's stream (``pair_source.PairSource``):

- **block-causal family** (``causal = True``): the clip's frames in blocks (``num_frame_per_block``,
  ``independent_first_frame``); each block draws its own student step ``k_b ~ U{0, …, K−1}`` (one for all with
  ``same_step_across_blocks``; K−1 with ``last_step_only``) from the step's generator, so every process draws alike;
  the student's input is, frame by frame, the trajectory's state at its block's step, with per-frame timesteps, in
  one pass under the block-causal mask (each block sees the earlier blocks at their own noise levels, as teacher
  forcing does); ``loss = metric(x̂0, x0)`` over the whole clip.
- **bidirectional family**: one step ``k`` for the batch, ``loss = metric(G(x_{t_k}, t_k), x0)`` — DMD's regression
  term on its own.

No second network, no optimizer of its own: the host's optimizer steps the student. The sampler and the scheduler are
the ones DMD's student of the same keys uses (few-step sampling through ``dmd_denoising_steps``; block by block through
a KV cache for a causal family), so the initialised student is validated as it will be run, and a DMD run started from
it (the host's ``init_lora``) continues with the same keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...flow import T_MAX
from ...hookspecs import hookimpl
from ...method_base import MethodBase
from ...networks import Networks
from ...passes import PassCounter
from ...pair_source import PairSource, guided_teacher, pair_generation_passes
from ...types import Batch, RunContext, StepInfo, StepLoss
# the same draws and regression as DMD's rollout and regression term
from ...method_toolkit import (FewStepStudent, draw_block_exits, exit_regression, load_method_state, regression_loss,
                               save_method_state, second_scale_warnings)
from .config import BLOCK_ONLY_KEYS, ODE_INIT_SCHEMA


class ODEInit(FewStepStudent, MethodBase):
    name = "ode_init"
    summary = ("ODE initialisation (CausVid / Self-Forcing): regress the student onto the guided teacher's ODE "
               "trajectories; the first stage of a causal student")
    schema = ODE_INIT_SCHEMA
    progress_metrics = ("ode_init_loss",)

    @staticmethod
    def config_warnings(config: dict[str, Any], family_cls: type, host: dict[str, Any]) -> list[str]:
        out = second_scale_warnings(config, family_cls)
        if family_cls.causal:
            return out
        defaults = ODE_INIT_SCHEMA.defaults()
        return out + [f"distillation_config.{name}: has no effect with the bidirectional family {family_cls.name!r} "
                      f"(the whole clip is one block)" for name in BLOCK_ONLY_KEYS if config[name] != defaults[name]]

    @staticmethod
    def memory_plan(config: dict[str, Any], host: dict[str, Any], layout: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """One student forward and backward per step, whatever the ``layout``; no second network. The pairs' one-time
        generation is ``one_time_passes`` (``pair_source.pair_generation_passes``), not a per-step cost."""
        return {"second_network": None,
                "passes_per_step": {"student_forward": 1.0, "student_backward": 1.0, "teacher_forward": 0.0,
                                    "teacher_forward_samples": 0.0},
                "one_time_passes": pair_generation_passes(config)}

    @staticmethod
    def usage_notes(config: dict[str, Any]) -> list[str]:
        return ["This student is the ODE-initialised first stage: distil it further with distillation_method dmd and "
                "the same distillation_config, starting from these weights (the reference host's init_lora)."]

    def __init__(self, config: dict[str, Any]):
        self.cfg = config
        self.steps: list[int] = list(config["dmd_denoising_steps"])
        self.passes = PassCounter()
        self.updates = 0

    @hookimpl
    def distill_setup(self, run: RunContext) -> None:
        cfg = self.cfg
        self.nets = Networks(run, self.passes, negative_prompt=cfg["negative_prompt"], method_name=self.name)
        self.run, self.family, self.accelerator, self.student = run, run.family, run.accelerator, run.student
        self.causal = bool(run.family.causal)
        teacher = guided_teacher(self.nets, cfg["real_score_guidance_scale"], cfg["real_score_guidance_interval"],
                                 cfg["real_score_guidance_scale_2"])
        self.pair_source = PairSource(cfg, steps=self.steps, nets=self.nets, family=self.family,
                                      accelerator=self.accelerator, teacher_flow=teacher,
                                      negative_prompt=self.nets.negative_prompt, what="ode_init")
        self.pair_source.setup(run)

    # ------------------------------------------------------------------ the loss

    @hookimpl
    def distill_loss(self, batch: Batch, step: StepInfo, host_loss) -> StepLoss:
        cfg = self.cfg
        self.nets.at(step)
        pairs, cond = self.pair_source.take(step, batch.latents)
        dtype, device = batch.latents.dtype, batch.latents.device
        if self.causal:
            x0, logs = self._causal_x0(pairs, cond, step, dtype, device)
            self.passes.on_backward(x0, "student")
            loss = regression_loss(x0, pairs.x0, cfg["regression_metric"])
        else:  # DMD's regression term on its own
            loss, k = exit_regression(self.nets, pairs, cond, self.steps, last_step_only=cfg["last_step_only"],
                                      metric=cfg["regression_metric"], generator=step.generator, dtype=dtype,
                                      device=device)
            logs = {"ode_init_step_index": float(k)}
        return StepLoss(loss, {"ode_init_loss": float(loss.detach()), **logs})

    def _causal_x0(self, pairs, cond: Any, step: StepInfo, dtype: torch.dtype, device: torch.device):
        """The whole clip in one block-causal pass: block b's frames at the trajectory's state of its own step."""
        cfg = self.cfg
        switch = self.family.block_causal(self.student)
        states = pairs.states.to(dtype)  # (B, K, C, F, H, W)
        frames = states.shape[3]
        blocks = switch.frame_blocks(frames, cfg["num_frame_per_block"],
                                     independent_first_frame=cfg["independent_first_frame"])
        ks = draw_block_exits(len(blocks), len(self.steps), same_step_across_blocks=cfg["same_step_across_blocks"],
                              last_step_only=cfg["last_step_only"], generator=step.generator)
        x = torch.cat([states[:, k, :, start:end] for (start, end), k in zip(blocks, ks)], dim=2)
        per_frame = torch.tensor([float(self.steps[k]) for (start, end), k in zip(blocks, ks)
                                  for _ in range(end - start)], device=device)
        t = per_frame[None].expand(x.shape[0], frames)
        with switch.masked(blocks, switch.tokens_per_frame(x)):
            flow = self.nets.flow(x, t, cond)
        sigma = (t / T_MAX).float()[:, None, :, None, None]
        return x.float() - sigma * flow, {"ode_init_step_index": sum(ks) / len(ks)}

    @hookimpl
    def distill_after_optimizer_step(self, step: StepInfo) -> None:
        self.updates += 1

    @hookimpl
    def distill_metrics(self, step: StepInfo) -> dict[str, float]:
        return {f"passes/{k}": float(v) for k, v in self.passes.take().items()}

    # ------------------------------------------------------------------ sampling: FewStepStudent (method_toolkit), as
    # the DMD student of these keys

    # ------------------------------------------------------------------ checkpoints

    @hookimpl
    def distill_save_state(self, checkpoint_dir: Path) -> None:
        shape = self.pair_source.shape
        save_method_state(checkpoint_dir, "ode_init", self.accelerator,
                          {"updates": self.updates, "pair_shape": None if shape is None else list(shape)})

    @hookimpl
    def distill_load_state(self, checkpoint_dir: Path) -> None:
        meta = load_method_state(checkpoint_dir, "ode_init", "an ode_init run")
        self.updates = int(meta["updates"])
        self.pair_source.restore_shape(meta.get("pair_shape"))
