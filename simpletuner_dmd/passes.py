"""Counting a method's network passes by role, so its cost is stated in passes and a test can hold it to the minimum.

A *pass* is one call of a network on one batch (a cond + uncond batch of 2B is one pass) or one backward through it.
Gradient checkpointing's recompute inside a backward is not counted separately.
"""

from __future__ import annotations

from collections import Counter

import torch


class PassCounter:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def forward(self, role: str, batch_size: int, *, grad: bool) -> None:
        self.counts[f"{role}_forward"] += 1
        self.counts[f"{role}_forward_samples"] += batch_size
        if grad:
            self.counts[f"{role}_forward_with_grad"] += 1

    def backward(self, role: str) -> None:
        self.counts[f"{role}_backward"] += 1

    def on_backward(self, tensor: torch.Tensor, role: str) -> None:
        """Count one backward of ``role`` when a gradient reaches ``tensor`` (a backward the host runs)."""
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: self.backward(role) or grad)

    def take(self) -> dict[str, int]:
        """The counts since the last ``take``, then start again."""
        out = dict(self.counts)
        self.counts.clear()
        return out
