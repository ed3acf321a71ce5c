"""The AdamW every trainable network of a run gets — the student's (the host's) and a method's own (DMD's fake
score, DCM's detail expert) — chosen by the host key ``optimizer`` (SimpleTuner's names):

- ``adamw`` / ``torch-adamw`` / ``adamw_bf16``: torch's AdamW; its moments are fp32 for fp32 trainable weights (8 bytes
  per trainable parameter);
- ``ao-adamw8bit``: torchao's ``AdamW8bit`` — block-wise 8-bit moments (2 bytes per parameter; tensors under 4,096
  values keep fp32 moments), the maintained low-bit AdamW that runs on a CPU as well as on CUDA (torchao compiles its
  update on first use: the first step takes tens of seconds on a CPU). ``pip install torchao`` (or
  ``simpletuner-dmd[lowbit]``); without it, the run stops before training with one line saying so.

Its effect on quality is measured in the CPU quality benchmark (case A rows "8-bit moments"); its effect on memory is
what ``simpletuner-dmd estimate`` shows.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable

import torch

from .errors import UserError

TORCH_ADAMW = ("adamw", "torch-adamw", "adamw_bf16")
LOW_BIT = {"ao-adamw8bit": ("torchao.optim", "AdamW8bit")}
CHOICES = TORCH_ADAMW + tuple(LOW_BIT)


def moments_of(kind: str) -> str:
    """The moments' precision for ``simpletuner-dmd estimate``: "fp32" or "8bit"."""
    return "8bit" if kind == "ao-adamw8bit" else "fp32"


def check_available(kind: str) -> str | None:
    """None when ``kind`` can be built here, else the one line to show."""
    if kind in LOW_BIT and importlib.util.find_spec("torchao") is None:
        return f"optimizer {kind}: needs torchao (pip install torchao, or pip install 'simpletuner-dmd[lowbit]')"
    return None


def adamw(params: Iterable[torch.nn.Parameter], *, kind: str, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The AdamW of ``kind`` over ``params``."""
    params = list(params)
    if kind in TORCH_ADAMW:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if kind not in LOW_BIT:
        raise UserError(f"optimizer: {kind!r} is not one of {', '.join(CHOICES)}")
    problem = check_available(kind)
    if problem:
        raise UserError(problem)
    module, name = LOW_BIT[kind]
    cls = getattr(importlib.import_module(module), name)
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


__all__ = ["CHOICES", "adamw", "check_available", "moments_of"]
