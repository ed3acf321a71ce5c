"""LCM's math as pure functions, for flow-matching families (``x_σ = (1 − σ)·x0 + σ·ε``, the network predicts
``v = ε − x0``, ``t = 1000·σ``).

References: Luo et al., "Latent Consistency Models" (2023), Alg. 1 (skipping-step consistency distillation with an
augmented, guided PF-ODE); Luo et al., "LCM-LoRA" (2023); diffusers' ``train_lcm_distill_lora_sdxl.py`` (teacher = the
base with adapters disabled, target = the student itself under no_grad, pseudo-Huber loss, boundary scalings).
The DDIM step of the diffusion-model versions becomes one Euler step of the teacher's flow ODE.
"""

from __future__ import annotations

import torch

from ...flow import T_MAX, per_sample, shift_sigma


def skipping_schedule(num_points: int, shift: float) -> torch.Tensor:
    """The ``num_ddim_timesteps`` points of the teacher's ODE solver and a boundary point, as timesteps (fp32):
    ``t_n = 1000·shift(n/N)`` for ``n = 0 … N`` (``t_0 = 0``, ``t_N = 1000``). A training pair is ``(t_n, t_{n−1})``,
    one solver step of size ``k = 1000/N`` apart before the shift (LCM's skipping step)."""
    u = torch.arange(num_points + 1, dtype=torch.float32) / num_points
    return shift_sigma(u, shift) * T_MAX


def boundary_scalings(timesteps: torch.Tensor, *, timestep_scaling: float, sigma_data: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's ``c_skip(t)`` and ``c_out(t)`` at ``t·timestep_scaling``: ``c_skip(0) = 1``, ``c_out(0) = 0``, so the
    consistency function is the identity at the boundary (``f(x, 0) = x``)."""
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def consistency_output(x_t: torch.Tensor, flow: torch.Tensor, timesteps: torch.Tensor, *, timestep_scaling: float
                       ) -> torch.Tensor:
    """``f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0`` with ``x̂0 = x_t − σ·v`` (fp32)."""
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling=timestep_scaling)
    sigma = per_sample(timesteps / T_MAX, x_t)
    x0 = x_t.float() - sigma * flow.float()
    return per_sample(c_skip, x_t) * x_t.float() + per_sample(c_out, x_t) * x0


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, *, loss_type: str, huber_c: float) -> torch.Tensor:
    """``l2``: ``mean((f − target)²)``; ``huber``: the pseudo-Huber ``mean(sqrt((f − target)² + c²) − c)`` (the
    consistency-models/diffusers form, elementwise). ``target`` is treated as a constant."""
    diff = pred.float() - target.detach().float()
    if loss_type == "l2":
        return torch.mean(diff ** 2)
    if loss_type == "huber":
        return torch.mean(torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def sampling_timesteps(schedule: torch.Tensor, steps: int) -> list[float]:
    """``steps`` points of the skipping schedule, evenly spaced from its top (LCMScheduler's choice of origin
    timesteps): for N = 50 and 4 steps, the points n = 50, 38, 25, 13."""
    n = schedule.shape[0] - 1
    indices = [n - (i * n) // steps for i in range(steps)]
    return [float(schedule[i]) for i in indices]
