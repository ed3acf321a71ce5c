"""The teacher's CFG scale per sample, and the combine that applies it.

One scale applies to every sample, unless the family's network switches experts by timestep (``FamilyBase.
expert_guidance``: Wan 2.2 A14B) and a second scale is given: then each sample gets the scale of the expert its own
timestep runs (``WanPipeline``'s ``guidance_scale`` / ``guidance_scale_2``). DMD's real score, the teacher's ODE pairs
(DMD's regression term, ``ode_init``) and the families' Euler sampler all build their CFG here, so a config with one
scale runs exactly as before (the float path below) and nothing outside the family knows where its experts switch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .flow import guided, guided_per_sample

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EVERYWHERE = (0.0, 1000.0)


def highest_scale(config: dict[str, Any]) -> float:
    """The highest CFG scale a method's config guides its teacher at (``real_score_guidance_scale`` and, where given,
    ``real_score_guidance_scale_2``): above 1, the teacher's forward carries an uncond sample beside each cond one."""
    return max(config["real_score_guidance_scale"], config.get("real_score_guidance_scale_2") or 0.0)


def applies(family: Any, scale: float, scale_2: float | None) -> bool:
    """Whether a second scale changes anything: given, different from the first, and the family has experts."""
    has_experts = getattr(family, "expert_guidance", None) is not None
    return has_experts and scale_2 is not None and float(scale_2) != float(scale)


def teacher_scale(family: Any, scale: float, scale_2: float | None, t: torch.Tensor) -> float | torch.Tensor:
    """The CFG scale of each sample at timesteps ``t`` (one per sample): ``scale`` itself (a float) when the second
    scale does not apply (``applies``), else the family's ``expert_guidance(scale, scale_2, t)``, ``(B,)`` fp32."""
    if not applies(family, scale, scale_2):
        return scale
    return family.expert_guidance(float(scale), float(scale_2), t).to(device=t.device, dtype=torch.float32)


def cfg_combine(scale: float | torch.Tensor, t: torch.Tensor, interval: tuple[float, float] = EVERYWHERE
                ) -> Combine | None:
    """Standard CFG ``u + s·(c − u)`` at timesteps ``t`` where ``t`` lies inside ``interval`` (a guidance interval),
    cond only outside; ``scale`` one float or one per sample, where 0 and 1 mean cond only. None (no uncond pass)
    when no sample is guided. One float everywhere is ``flow.guided`` (the one-scale path, as it always was)."""
    per_sample = isinstance(scale, torch.Tensor)
    if not per_sample:
        if scale in (0.0, 1.0):
            return None
        if tuple(interval) == EVERYWHERE:
            return lambda c, u: guided(c, u, scale)
        scale = torch.full_like(t, scale, dtype=torch.float32)
    scale = torch.where((scale == 0.0) | (scale == 1.0), torch.ones_like(scale), scale.float())  # cond only: 1
    lo, hi = interval
    inside = (t >= lo) & (t <= hi)
    if not bool((inside & (scale != 1.0)).any()):
        return None
    per = torch.where(inside, scale, torch.ones_like(scale))
    return lambda c, u: guided_per_sample(c, u, per).to(c.dtype)


__all__ = ["Combine", "applies", "cfg_combine", "highest_scale", "teacher_scale"]
