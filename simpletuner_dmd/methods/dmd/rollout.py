"""Backward simulation (DMD2 §4.5, Self-Forcing's training rollout, bidirectional case): the student generates its
training sample the way it samples at inference, from pure noise through its own timesteps, and exits at step k.

Only the exit step builds a graph: the steps before it run under ``no_grad`` (they are inputs, not parameters' paths),
so the memory of a rollout is that of one forward pass whatever k is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...flow import T_MAX

PredictX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Rollout:
    x0: torch.Tensor  # the generated sample x̂0 (with a graph to the student when with_grad)
    exit_index: int
    denoised_from: float  # t_k
    denoised_to: float  # t_{k+1}, 0 when k is the last index
    student_forwards: int


def draw_exit_index(num_steps: int, *, last_step_only: bool, generator: torch.Generator | None) -> int:
    """k ~ U{0, …, K−1} from a generator seeded alike on every process (so every rank exits at the same k)."""
    if last_step_only:
        return num_steps - 1
    return int(torch.randint(num_steps, (1,), generator=generator).item())


def backward_simulation(predict_x0: PredictX0, noise: torch.Tensor, timesteps: list[int], exit_index: int, *,
                        with_grad: bool) -> Rollout:
    """Run the student from ``noise`` through ``timesteps[:exit_index + 1]``.

    For i < k, under no_grad: ``x̂0 = G(x, t_i)``, then ``x = (1 − σ_{i+1})·x̂0 + σ_{i+1}·ε_fresh``.
    At i = k: ``x̂0 = G(x, t_k)`` with grad when ``with_grad``.
    """
    x = noise
    batch = noise.shape[0]
    for i in range(exit_index):
        t = torch.full((batch,), float(timesteps[i]), device=noise.device)
        with torch.no_grad():
            x0 = predict_x0(x, t)
            sigma_next = timesteps[i + 1] / T_MAX
            x = ((1.0 - sigma_next) * x0.float() + sigma_next * torch.randn_like(x0, dtype=torch.float32)
                 ).to(noise.dtype)
    t = torch.full((batch,), float(timesteps[exit_index]), device=noise.device)
    with torch.set_grad_enabled(with_grad):
        x0 = predict_x0(x, t)
    denoised_to = float(timesteps[exit_index + 1]) if exit_index + 1 < len(timesteps) else 0.0
    return Rollout(x0, exit_index, float(timesteps[exit_index]), denoised_to, exit_index + 1)


def sample_with_schedule(predict_x0: PredictX0, noise: torch.Tensor, timesteps: list[int],
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step sampling with the same schedule (inference): all K steps, no grad, returns the final x̂0."""
    x = noise
    batch = noise.shape[0]
    with torch.no_grad():
        for i, step in enumerate(timesteps):
            t = torch.full((batch,), float(step), device=noise.device)
            x0 = predict_x0(x, t)
            if i + 1 < len(timesteps):
                sigma_next = timesteps[i + 1] / T_MAX
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                x = ((1.0 - sigma_next) * x0.float() + sigma_next * eps).to(noise.dtype)
    return x0
