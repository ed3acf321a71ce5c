"""LCM's math as pure functions, for flow-matching families (``x_σ = (1 − σ)·x0 + σ·ε``, the network predicts
``v = ε − x0``, ``t = 1000·σ``).

References: Luo et al., "Latent Consistency Models" (2023), Alg. 1 (skipping-step consistency distillation with an
augmented, guided PF-ODE); Luo et al., "LCM-LoRA" (2023); diffusers' ``train_lcm_distill_lora_sdxl.py`` (teacher = the
base with adapters disabled, target = the student itself under no_grad, pseudo-Huber loss, boundary scalings).
The DDIM step of the diffusion-model versions becomes one Euler step of the teacher's flow ODE.
"""

from __future__ import annotations

import torch

from ...flow import (  # noqa: F401 (re-exported: LCM's math, shared with the few-step scheduler)
    T_MAX, boundary_scalings, consistency_output, per_sample, sampling_timesteps, shift_sigma)


def skipping_schedule(num_points: int, shift: float) -> torch.Tensor:
    """The ``num_ddim_timesteps`` points of the teacher's ODE solver and a boundary point, as timesteps (fp32):
    ``t_n = 1000·shift(n/N)`` for ``n = 0 … N`` (``t_0 = 0``, ``t_N = 1000``). A training pair is ``(t_n, t_{n−1})``,
    one solver step of size ``k = 1000/N`` apart before the shift (LCM's skipping step)."""
    u = torch.arange(num_points + 1, dtype=torch.float32) / num_points
    return shift_sigma(u, shift) * T_MAX


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, *, loss_type: str, huber_c: float) -> torch.Tensor:
    """``l2``: ``mean((f − target)²)``; ``huber``: the pseudo-Huber ``mean(sqrt((f − target)² + c²) − c)`` (the
    consistency-models/diffusers form, elementwise). ``target`` is treated as a constant."""
    diff = pred.float() - target.detach().float()
    if loss_type == "l2":
        return torch.mean(diff ** 2)
    if loss_type == "huber":
        return torch.mean(torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}")
