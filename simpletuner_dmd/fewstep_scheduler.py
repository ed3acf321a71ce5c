"""A diffusers scheduler that makes a stock pipeline sample a few-step student the way DMD trained it.

Stock pipelines (``WanPipeline`` and the others) take no σ list: they call ``scheduler.set_timesteps(n)`` and then
``scheduler.step(flow, t, x)`` once per timestep. No stock scheduler setting gives DMD's schedule with DMD's sampler
(predict x̂0, re-noise to the next σ with fresh noise — ``methods/dmd/rollout.sample_with_schedule``). This one does:

    timesteps  t_0 … t_{K−1} from its config (``few_step_timesteps``), σ_i = t_i / 1000
    step i     x̂0 = x − σ_i·v;  x ← (1 − σ_{i+1})·x̂0 + σ_{i+1}·ε  with fresh ε  (the last step returns x̂0)

It subclasses ``FlowMatchEulerDiscreteScheduler`` so that everything else a pipeline or a trainer reads from a flow
scheduler (``config.num_train_timesteps``, ``sigmas``, ``order``, ``set_begin_index``) is there.
"""

from __future__ import annotations

import logging

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

logger = logging.getLogger(__name__)


class FewStepFlowScheduler(FlowMatchEulerDiscreteScheduler):
    @register_to_config
    def __init__(self, few_step_timesteps: tuple[int, ...] | list[int] = (1000, 757, 522),
                 num_train_timesteps: int = 1000, **kwargs):
        super().__init__(num_train_timesteps=num_train_timesteps, **kwargs)
        steps = [float(t) for t in few_step_timesteps]
        if not steps or any(not 0 < t <= num_train_timesteps for t in steps) or steps != sorted(steps, reverse=True):
            raise ValueError(f"few_step_timesteps must be decreasing values in (0, {num_train_timesteps}]: "
                             f"{list(few_step_timesteps)}")
        self._warned_steps: int | None = None
        self.set_timesteps()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      **ignored) -> None:
        """Always the configured timesteps: the student was trained for them. A different ``num_inference_steps``
        is logged once and not followed (``len(few_step_timesteps)`` is the step count to pass)."""
        steps = [float(t) for t in self.config.few_step_timesteps]
        if num_inference_steps not in (None, len(steps)) and self._warned_steps != num_inference_steps:
            logger.warning("FewStepFlowScheduler: num_inference_steps=%s ignored; the student samples its %d trained "
                           "timesteps %s", num_inference_steps, len(steps), [int(t) for t in steps])
            self._warned_steps = num_inference_steps
        n = float(self.config.num_train_timesteps)
        self.timesteps = torch.tensor(steps, dtype=torch.float32, device=device)
        self.sigmas = torch.tensor([t / n for t in steps] + [0.0], dtype=torch.float32, device=device)
        self.num_inference_steps = len(steps)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, **ignored
             ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        x0 = sample.float() - sigma * model_output.float()
        if sigma_next > 0:
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            prev = (1.0 - sigma_next) * x0 + sigma_next * eps
        else:
            prev = x0
        self._step_index += 1
        prev = prev.to(sample.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


__all__ = ["FewStepFlowScheduler"]
