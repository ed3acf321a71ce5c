"""DCM's math as pure functions (flow matching: ``x_σ = (1 − σ)·x0 + σ·ε``, ``v = ε − x0``, ``t = 1000·σ``).

References: Lv et al., "DCM: Dual-Expert Consistency Model for Efficient and High-Quality Video Generation" (2025) —
a semantic expert for the high-noise phase, a detail expert for the rest, GAN and feature-matching losses for the
detail expert; Wang et al., "Phased Consistency Model" (PCM, 2024) — the multiphase consistency target on an Euler
schedule, the parameterisation ``f(x, σ) = x + (σ_end − σ)·v`` that reaches its phase's end in one step.

Indices run from the noisiest point: ``σ_0 = 1 > σ_1 > … > σ_N = 0`` (``N = euler_timesteps``).
"""

from __future__ import annotations

import torch

from ...flow import T_MAX, euler_step, per_sample, shift_sigma
ADV_OFFSET = 0.7  # the adversarial re-noise point lies 70% of the schedule above the phase end (SimpleTuner: 35 of 50)


def euler_sigmas(euler_timesteps: int, shift: float) -> torch.Tensor:
    """``σ_j = shift(1 − j/N)`` for ``j = 0 … N`` (fp32; ``σ_0 = 1``, ``σ_N = 0``)."""
    u = 1.0 - torch.arange(euler_timesteps + 1, dtype=torch.float32) / euler_timesteps
    return shift_sigma(u, shift)


def phase_edges(euler_timesteps: int, multiphase: int) -> list[int]:
    """The indices where the ``multiphase`` phases start, and N: ``[⌊m·N/M⌋ for m = 0 … M]``."""
    return [(m * euler_timesteps) // multiphase for m in range(multiphase + 1)]


def phase_end(index: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """For each index j, the first edge above it (the end of j's phase)."""
    bounds = torch.tensor(edges[1:], dtype=torch.long)
    return bounds[torch.searchsorted(bounds, index.long(), right=True)]


def boundary_timestep(sigmas: torch.Tensor, edges: list[int]) -> float:
    """The semantic expert serves ``t > boundary`` (the first phase), the detail expert ``t <= boundary``. With
    SimpleTuner's defaults (50 steps, shift 17, 4 phases) this is t ≈ 981.8 — the 981 its Wan forward hard-codes."""
    return float(sigmas[edges[1]]) * T_MAX


def expert_of(timesteps: torch.Tensor, boundary: float) -> torch.Tensor:
    """True where the semantic expert acts (the high-noise phase), False where the detail expert does."""
    return timesteps.float() > boundary


def phase_jump(x: torch.Tensor, flow: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """``x + (σ_to − σ_from)·v`` (fp32): an Euler step of the flow ODE, and — with ``σ_to`` the phase end — PCM's
    consistency function of that phase."""
    return euler_step(x, flow, sigma_from, sigma_to)


def renoise(x_end: torch.Tensor, noise: torch.Tensor, sigma_end: torch.Tensor, sigma_adv: torch.Tensor
            ) -> torch.Tensor:
    """Move a point at ``σ_end`` along the forward flow path to ``σ_adv ≥ σ_end``:
    ``x_end·(1 − σ_adv)/(1 − σ_end) + ε·(σ_adv − σ_end)/(1 − σ_end)`` (σ_end < 1)."""
    keep = per_sample((1.0 - sigma_adv) / (1.0 - sigma_end), x_end)
    add = per_sample((sigma_adv - sigma_end) / (1.0 - sigma_end), x_end)
    return keep * x_end.float() + add * noise.float()


def adversarial_index(end: torch.Tensor, euler_timesteps: int) -> torch.Tensor:
    """The Euler index at which the discriminator looks: ``ADV_OFFSET·N`` indices noisier than the phase end."""
    return (end - round(ADV_OFFSET * euler_timesteps)).clamp(min=0)


def hinge_d_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """The discriminator's hinge loss, averaged over heads: ``mean relu(1 − D(real)) + mean relu(1 + D(fake))``."""
    terms = [torch.relu(1.0 - r.float()).mean() + torch.relu(1.0 + f.float()).mean()
             for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """The generator's hinge loss, averaged over heads: ``mean relu(1 − D(fake))``."""
    return torch.stack([torch.relu(1.0 - f.float()).mean() for f in fake_logits]).mean()


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``mean((φ_fake − φ_real)²)``; ``real`` is a constant."""
    return torch.stack([torch.mean((f.float() - r.detach().float()) ** 2) for f, r in zip(fake, real)]).mean()
