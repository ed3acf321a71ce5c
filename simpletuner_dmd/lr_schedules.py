"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR`.

Each schedule is a plain function of the step with its settings captured in a closure. LambdaLR
saves no state for plain functions (its state_dict stores None for them), so resuming is:
rebuild the scheduler with the same config, then `load_state_dict` — the step counter comes from
the checkpoint and the curve from the config.

Conventions follow diffusers/transformers: during warm-up the factor is step / warmup_steps (so 0
at step 0), and the decaying schedules reach their floor at `total_steps`. Unlike diffusers, the
cosine stays at its floor past `total_steps` instead of rising again.
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "cosine_with_min_lr", "linear")


def build_lr_lambda(
    name: str, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each step for schedule `name`.

    `min_lr_ratio` is the floor of the decaying schedules ("linear", "cosine",
    "cosine_with_min_lr"), as a fraction of the base rate; the constant ones have no decay and
    ignore it. With the default 0.0, "cosine" and "linear" match diffusers.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be between 0 and 1, got {min_lr_ratio}")

    def warmup(step: int) -> float:
        return step / max(1, warmup_steps)

    def progress(step: int) -> float:
        """0 at the end of warm-up, 1 at total_steps, clamped so the floor holds afterwards."""
        return min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    if name in ("constant", "constant_with_warmup"):

        def lr_lambda(step: int) -> float:
            return warmup(step) if step < warmup_steps else 1.0

    elif name == "linear":

        def lr_lambda(step: int) -> float:
            if step < warmup_steps:
                return warmup(step)
            return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress(step))

    else:  # cosine, cosine_with_min_lr: the same curve; the second name says outright it has a floor

        def lr_lambda(step: int) -> float:
            if step < warmup_steps:
                return warmup(step)
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress(step)))

    return lr_lambda
