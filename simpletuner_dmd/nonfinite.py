"""Non-finite losses and gradients: skip the update, count it, and stop after too many in a row.

One guard per turn (the student's, the fake score's, a discriminator's…). A turn whose loss or gradient is not finite
does not step its optimizer; the run goes on. After ``limit`` optimizer steps in a row like that, the run stops with a
``NonFiniteError`` naming the turn — before any checkpoint is written from the bad state, so the last good checkpoint
stays the latest one.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import UserError

DEFAULT_LIMIT = 5


class NonFiniteError(UserError):
    """Training diverged: exit status 3, one line naming the turn."""

    exit_code = 3


class NonFiniteGuard:
    def __init__(self, turn: str, limit: int = DEFAULT_LIMIT):
        self.turn = turn
        self.limit = limit
        self.skipped = 0  # over the whole run (logged)
        self.in_row = 0

    @staticmethod
    def finite(params: Iterable[torch.nn.Parameter], *losses: torch.Tensor | None) -> bool:
        """True when every given loss and every gradient of ``params`` is finite (after any all-reduce, so every
        process reaches the same answer from the gradients)."""
        checks = [torch.isfinite(loss.detach()).all() for loss in losses if loss is not None]
        checks += [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return bool(torch.stack(checks).all()) if checks else True

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        if self.in_row >= self.limit:
            raise NonFiniteError(
                f"{self.turn} turn: non-finite loss or gradient in {self.in_row} optimizer steps in a row (the last "
                f"at step {step}); those updates were skipped and nothing was saved after them — lower the learning "
                f"rate or check the data, then resume from the last checkpoint (nonfinite_skip_limit: {self.limit})")
