"""DMD2's GAN term: a small classifier on the fake score's features, off by default (``gan_loss_weight`` 0).

The classifier reads the features the family names (``family.gan_feature_module(network) -> (module, width)``: the
output of that module, ``(B, width)`` or ``(B, tokens, width)``) during a fake-score forward on a noisy sample, and
returns one realism logit per sample (the mean of per-token logits). DMD2 (Yin et al. 2024, §4.3) trains it with the
fake score, ``softplus(D(fake)) + softplus(−D(real))``, and adds ``softplus(−D(G(z)))`` to the generator's loss: the
distribution-matching gradient only sees what the teacher knows, the classifier sees real data, which is what lets a
student sharpen past a blurry fit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F


class GANHead(torch.nn.Module):
    """``features (B, [tokens,] width) → logit (B,)``: LayerNorm, a two-layer MLP per token, mean over tokens."""

    def __init__(self, width: int, hidden: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        if x.ndim == 2:
            x = x[:, None]
        return self.net(x.reshape(x.shape[0], -1, x.shape[-1])).mean(dim=(1, 2))


@contextlib.contextmanager
def captured_output(module: torch.nn.Module) -> Iterator[list[Any]]:
    """Collects ``module``'s outputs while inside (a forward hook, removed on exit: a checkpointed backward that
    recomputes the module later does not append)."""
    outputs: list[Any] = []

    def hook(_module, _inputs, output):
        outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating GAN loss, ``mean(softplus(−D(fake)))``."""
    return F.softplus(-logits_fake.float()).mean()


def classifier_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """The classifier's loss, ``mean(softplus(D(fake))) + mean(softplus(−D(real)))``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
