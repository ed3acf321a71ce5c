"""The flow-matching math every method, family and host shares, as pure functions on tensors.

Convention (rectified flow, as Wan and diffusers' flow-matching schedulers use it):
``x_σ = (1 − σ)·x0 + σ·ε``; the network predicts the flow ``v = ε − x0``; its timestep is ``t = 1000·σ``
(``T_MAX``); σ is always looked up *by value* from t, never by indexing a descending table. Results are fp32.

Method-specific math lives in each method's ``loss.py`` and imports from here; no method imports another method's
modules.
"""

from __future__ import annotations

import torch

T_MAX = 1000.0


def sigma_of(timesteps: torch.Tensor) -> torch.Tensor:
    """σ by value (never by indexing a descending table with t, which inverts the noise level)."""
    return timesteps.float() / T_MAX


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``σ' = s·σ / (1 + (s − 1)·σ)`` (fp32): the time shift of SD3/Wan's flow schedules."""
    sigma = sigma.float()
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def unshift_sigma(sigma_shifted: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of ``shift_sigma``: the u with ``shift_sigma(u) = σ'``."""
    s = sigma_shifted.float()
    return s / (shift - (shift - 1.0) * s)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` → ``(B, 1, …)`` broadcastable against ``like`` (fp32, on its device)."""
    return values.float().reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε`` with one σ per sample (``σ = t / 1000``), broadcast over every other axis; computed
    in fp32, returned in ``x0``'s dtype."""
    return add_noise_at_sigma(x0, noise, sigma_of(timesteps))


def add_noise_at_sigma(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``add_noise`` given σ itself (one per sample, ``(B,)``) rather than the timestep: ``x_σ = (1 − σ)·x0 + σ·ε``
    in fp32, returned in ``x0``'s dtype."""
    sigma = per_sample(sigma, x0)
    return ((1.0 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x̂0 = x_σ − σ·v`` (fp32 result)."""
    sigma = per_sample(sigma_of(timesteps), x_t)
    return x_t.float() - sigma * flow.float()


def euler_step(x_t: torch.Tensor, flow: torch.Tensor, sigma_from: torch.Tensor | float,
               sigma_to: torch.Tensor | float) -> torch.Tensor:
    """One Euler step of the flow ODE ``dx/dσ = v`` from ``σ_from`` to ``σ_to`` (per-sample tensors or one float
    each): ``x + (σ_to − σ_from)·v`` in fp32."""
    step = sigma_to - sigma_from
    if isinstance(step, torch.Tensor):
        step = per_sample(step, x_t)
    return x_t.float() + step * flow.float()


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Standard (Ho & Salimans / diffusers) CFG: ``u + s·(c − u)``; ``s`` of 0 or 1 (or no uncond) means cond only."""
    if uncond is None or scale in (0.0, 1.0):
        return cond
    return uncond + scale * (cond - uncond)


def guided_per_sample(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Standard CFG ``u + w·(c − u)`` with one ``w`` per sample (fp32)."""
    w = per_sample(scale, cond)
    return uncond.float() + w * (cond.float() - uncond.float())


def guided_self_forcing(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Self-Forcing / FastVideo / DCM CFG: ``c + s·(c − u)`` (= the standard form at ``s + 1``); 0 (or no uncond)
    means cond only."""
    if uncond is None or scale == 0.0:
        return cond
    return cond + scale * (cond - uncond)


def boundary_scalings(timesteps: torch.Tensor, *, timestep_scaling: float, sigma_data: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The consistency models' ``c_skip(t)`` and ``c_out(t)`` at ``t·timestep_scaling`` (LCM): ``c_skip(0) = 1``,
    ``c_out(0) = 0``, so the consistency function is the identity at the boundary (``f(x, 0) = x``)."""
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def consistency_output(x_t: torch.Tensor, flow: torch.Tensor, timesteps: torch.Tensor, *, timestep_scaling: float
                       ) -> torch.Tensor:
    """``f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0`` with ``x̂0 = x_t − σ·v`` (fp32): LCM's student output, and the
    x̂0 rule of the few-step scheduler that samples an LCM student in stock pipelines."""
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling=timestep_scaling)
    x0 = flow_to_x0(x_t, flow, timesteps)
    return per_sample(c_skip, x_t) * x_t.float() + per_sample(c_out, x_t) * x0


def sampling_timesteps(schedule: torch.Tensor | list[float], steps: int) -> list[float]:
    """``steps`` points of a schedule ``t_0 … t_N`` (ascending), evenly spaced from its top (LCMScheduler's choice
    of origin timesteps): for N = 50 and 4 steps, the points n = 50, 38, 25, 13."""
    values = [float(t) for t in schedule]
    n = len(values) - 1
    return [values[n - (i * n) // steps] for i in range(steps)]


__all__ = ["T_MAX", "add_noise", "add_noise_at_sigma", "boundary_scalings", "consistency_output", "euler_step",
           "flow_to_x0", "guided", "guided_per_sample", "guided_self_forcing", "per_sample", "sampling_timesteps",
           "shift_sigma", "sigma_of", "unshift_sigma"]
