"""A diffusers scheduler that makes a stock pipeline sample a few-step student the way its method trained it.

Stock pipelines (``WanPipeline`` and the others) take no σ list: they call ``scheduler.set_timesteps(n)`` and then
``scheduler.step(flow, t, x)`` once per timestep. No stock scheduler setting gives DMD's schedule with DMD's sampler
(predict x̂0, re-noise to the next σ with fresh noise). This one holds the student's schedule and step rule in its
config (``scheduler/scheduler_config.json`` beside the LoRA), so ``FewStepFlowScheduler.from_pretrained(output_dir,
subfolder="scheduler")`` brings both::

    timesteps  t_0 … t_{K−1} = few_step_timesteps, σ_i = t_i / 1000, σ_K = 0
    x0_renoise x̂0 = x − σ_i·v (or LCM's c_skip·x + c_out·x̂0 with consistency_timestep_scaling);
               x ← (1 − σ_{i+1})·x̂0 + σ_{i+1}·ε with fresh ε; the last step returns x̂0        (DMD, LCM)
    euler      x ← x + (σ_{i+1} − σ_i)·v                                                      (DCM)

The fresh noise of ``x0_renoise`` comes from the ``generator`` given to ``step``, else from ``scheduler.generator``
when set (stock pipelines pass none: set it to reproduce a sample exactly), else from torch's global generator.
``scheduler.generator_seed`` (an attribute, not saved in the config), when set, gives ``generator`` a fresh CPU
``torch.Generator`` seeded with it at every ``set_timesteps``, i.e. at the start of every pipeline call, as a pipeline
called with a freshly seeded ``generator=`` draws its initial noise: each call re-noises alike, whatever ran before
(SimpleTuner's validation sets it from ``validation_seed``). The noise is always drawn on the CPU and moved to the
sample's device, so a CPU generator reproduces it on any device.

A student is trained for its K steps: ``set_timesteps(n)`` with n ≠ K raises ``ValueError`` naming K (a pipeline's
default of 50 steps would otherwise run a schedule the student never saw). A consistency student (LCM) is defined on
its whole skipping schedule: with ``sampling_schedule`` in its config, any n from 1 to N picks n of its points evenly
from the top, exactly as the method's own sampler does for ``num_inference_steps: n``. It subclasses
``FlowMatchEulerDiscreteScheduler`` so that everything else a pipeline or a trainer reads from a flow scheduler
(``config.num_train_timesteps``, ``sigmas``, ``order``, ``set_begin_index``) is there. The parent's own keywords
(``shift``, ``use_dynamic_shifting``, … whatever the installed diffusers has) reach it through ``**kwargs`` and are
recorded in the config by it, so they count as this scheduler's keywords too (``_get_init_keys``): a saved config
loads whole, without diffusers' "config attributes … are not expected and will be ignored" warning.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from .flow import consistency_output, euler_step, sampling_timesteps

STEP_RULES = ("x0_renoise", "euler")


class FewStepFlowScheduler(FlowMatchEulerDiscreteScheduler):
    @register_to_config
    def __init__(self, few_step_timesteps: tuple[float, ...] | list[float] = (1000, 757, 522),
                 step_rule: str = "x0_renoise", consistency_timestep_scaling: float | None = None,
                 sampling_schedule: list[float] | None = None, num_train_timesteps: int = 1000, **kwargs):
        super().__init__(num_train_timesteps=num_train_timesteps, **kwargs)
        steps = [float(t) for t in few_step_timesteps]
        if not steps or any(not 0 < t <= num_train_timesteps for t in steps) or any(
                a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"few_step_timesteps must be strictly decreasing values in (0, {num_train_timesteps}]: "
                             f"{list(few_step_timesteps)}")
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {', '.join(STEP_RULES)}, got {step_rule!r}")
        if consistency_timestep_scaling is not None and step_rule != "x0_renoise":
            raise ValueError("consistency_timestep_scaling applies to step_rule 'x0_renoise' only")
        if sampling_schedule is not None and (len(sampling_schedule) < 2 or any(
                a >= b for a, b in zip(sampling_schedule, sampling_schedule[1:]))):
            raise ValueError("sampling_schedule must be an increasing list of timesteps t_0 … t_N")
        self.generator: torch.Generator | None = None
        self.generator_seed: int | None = None
        self.set_timesteps()

    @staticmethod
    def _get_init_keys(input_class) -> set[str]:
        """The keywords diffusers' ``from_config`` passes on from a saved config: this class's own and, for this class
        (and its subclasses), ``FlowMatchEulerDiscreteScheduler``'s, which ``**kwargs`` hands to it."""
        keys = ConfigMixin._get_init_keys(input_class)
        if isinstance(input_class, type) and issubclass(input_class, FewStepFlowScheduler):
            keys |= ConfigMixin._get_init_keys(FlowMatchEulerDiscreteScheduler)
        return keys

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, **ignored) -> None:
        """The configured timesteps; another ``num_inference_steps`` only for a student with a ``sampling_schedule``
        (LCM: any count up to its N, picked as its sampler picks them). A pipeline that always passes its own σ grid
        (``FluxPipeline``, ``QwenImagePipeline``: ``sigmas=linspace(1, 1/n, n)`` with ``mu``) asks for ``len(sigmas)``
        steps: the student's own timesteps for that count replace the grid, as they replace any pipeline's default.
        With ``generator_seed`` set, ``generator`` starts afresh from it."""
        if num_inference_steps is None and sigmas is not None:
            num_inference_steps = len(sigmas)
        steps = [float(t) for t in self.config.few_step_timesteps]
        schedule = self.config.sampling_schedule
        if schedule is not None and num_inference_steps not in (None, len(steps)):
            if not 1 <= num_inference_steps <= len(schedule) - 1:
                raise ValueError(f"FewStepFlowScheduler: num_inference_steps must be 1 to {len(schedule) - 1} for "
                                 f"this student, got {num_inference_steps}")
            steps = sampling_timesteps(schedule, num_inference_steps)
        elif num_inference_steps not in (None, len(steps)):
            raise ValueError(
                f"FewStepFlowScheduler: this student was trained for {len(steps)} steps (timesteps "
                f"{', '.join(f'{t:g}' for t in steps)}); pass num_inference_steps={len(steps)}, not "
                f"{num_inference_steps}")
        n = float(self.config.num_train_timesteps)
        self.timesteps = torch.tensor(steps, dtype=torch.float32, device=device)
        self.sigmas = torch.tensor([t / n for t in steps] + [0.0], dtype=torch.float32, device=device)
        self.num_inference_steps = len(steps)
        self._step_index = None
        self._begin_index = None
        if self.generator_seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.generator_seed))

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, **ignored
             ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        if self.config.step_rule == "euler":
            prev = euler_step(sample, model_output, sigma, sigma_next)
        else:
            t = torch.full((sample.shape[0],), sigma * float(self.config.num_train_timesteps), device=sample.device)
            scaling = self.config.consistency_timestep_scaling
            if scaling is None:
                x0 = sample.float() - sigma * model_output.float()
            else:
                x0 = consistency_output(sample, model_output, t, timestep_scaling=scaling)
            if sigma_next > 0:
                generator = generator if generator is not None else self.generator
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                prev = (1.0 - sigma_next) * x0 + sigma_next * eps
            else:
                prev = x0
        self._step_index += 1
        prev = prev.to(sample.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


__all__ = ["STEP_RULES", "FewStepFlowScheduler"]
