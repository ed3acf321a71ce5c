"""DMD's math as pure functions on tensors (flow matching: ``x_σ = (1 − σ)·x0 + σ·ε``, the network predicts
``v = ε − x0``, ``t = 1000·σ``).

References: Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, 2024), §3 and
Alg. 1; Huang et al., "Self Forcing" (2025), its DMD loss and timestep rule. Where they differ the choice is the one in
``docs/methods.md`` (DMD as the papers define it) and ``docs/config.md``. The flow math shared with every method (noising, x̂0, σ, both CFG forms) is in
``simpletuner_dmd/flow.py``.
"""

from __future__ import annotations

import torch

from ...flow import T_MAX, shift_sigma, unshift_sigma


def dmd_timestep_bounds(
    denoised_from: float, denoised_to: float, *, ts_schedule: bool, ts_schedule_max: bool,
    min_score_timestep: float, shift: float,
) -> tuple[float, float]:
    """The draw window of the DMD (and critic) timestep, in the *unshifted* domain.

    Lower bound: ``denoised_to`` if ``ts_schedule`` else ``min_score_timestep``; upper: ``denoised_from`` if
    ``ts_schedule_max`` else 1000. Because the draw is shifted afterwards, each bound t is mapped to the u with
    ``shift(u) = t`` (Self-Forcing), so that the shifted draw lies between the exit step's and the next step's noise.
    """
    lo = denoised_to if ts_schedule else min_score_timestep
    hi = denoised_from if ts_schedule_max else T_MAX
    if shift > 1.0:
        lo = float(unshift_sigma(torch.tensor(lo / T_MAX), shift)) * T_MAX
        hi = float(unshift_sigma(torch.tensor(hi / T_MAX), shift)) * T_MAX
    return lo, hi


def sample_dmd_timesteps(
    batch_size: int, lo: float, hi: float, *, shift: float, min_ratio: float, max_ratio: float,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One timestep per sample (the same for every frame): uniform in ``[lo, hi]``, shifted when ``shift > 1``, then
    clamped to ``[min_ratio·1000, max_ratio·1000]``. fp32, on ``device``."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float32)
    t = lo + (hi - lo) * u
    if shift > 1.0:
        t = shift_sigma(t / T_MAX, shift) * T_MAX
    return t.clamp(min_ratio * T_MAX, max_ratio * T_MAX).to(device)


def dmd_gradient(x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """DMD2 eq. (DMD gradient): ``(x̂0_fake − x̂0_real) / mean|x̂0_gen − x̂0_real|`` per sample, ``nan_to_num``'d.

    Returns (grad, normaliser per sample). All in fp32; inputs are treated as constants.
    """
    gen, real, fake = x0_gen.detach().float(), x0_real.float(), x0_fake.float()
    dims = tuple(range(1, gen.ndim))
    normaliser = (gen - real).abs().mean(dim=dims, keepdim=True)
    grad = torch.nan_to_num((fake - real) / normaliser)
    return grad, normaliser.flatten()


def dmd_loss(x0_gen: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5·mean((x̂0_gen − (x̂0_gen − grad).detach())²)`` in fp32, so ``∂loss/∂x̂0_gen = grad / numel``."""
    x = x0_gen.float()
    target = (x - grad.float()).detach()
    return 0.5 * torch.mean((x - target) ** 2)


def critic_flow_loss(flow_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The fake score's denoising loss with the flow target (Self-Forcing/CausVid): ``mean((v̂ − (ε − x0))²)``."""
    return torch.mean((flow_pred.float() - (noise.float() - x0.float())) ** 2)
