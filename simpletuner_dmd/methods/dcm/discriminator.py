"""DCM's small discriminator: heads on the frozen teacher's intermediate features, sized from the network itself.

Features are the outputs of every ``stride``-th block of the network's block list (the largest ``ModuleList`` of the
network — Wan's ``blocks``), captured by forward hooks while the teacher runs. Each head is a per-token MLP on the last
axis, so it takes any sequence length: no resolution, frame count or model size is built in (SimpleTuner's DCM head
hard-codes Wan 1.3B's width 1536 and its 30 layers). The width is read from the first linear layer of a block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def find_blocks(network: nn.Module) -> nn.ModuleList:
    """The network's transformer blocks: the ``ModuleList`` holding the most parameters."""
    best, best_count = None, -1
    for module in network.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = module, count
    if best is None:
        raise ValueError(f"{type(network).__name__} has no list of blocks to read features from")
    return best


def hidden_width(block: nn.Module) -> int:
    """The width of a block's hidden state: the input width of its first linear layer (Wan: ``attn1.to_q``)."""
    for module in block.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    raise ValueError(f"{type(block).__name__} has no linear layer to read its width from")


def feature_layers(num_blocks: int, stride: int, total_layers: int | None) -> list[int]:
    """Indices of the blocks the heads read: ``0, stride, 2·stride, …`` below ``total_layers`` (default: all)."""
    top = num_blocks if total_layers is None else total_layers
    if top > num_blocks:
        raise ValueError(f"discriminator_total_layers {total_layers} exceeds the network's {num_blocks} blocks")
    return list(range(0, top, stride))


def first_output(output):
    """A block's hidden state from its output: the tensor itself, or the first of a tuple (Wan)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(blocks: nn.ModuleList, indices: list[int], pick=first_output) -> Iterator[list[torch.Tensor]]:
    """Inside, each forward of the network appends the chosen blocks' outputs (in order; ``pick`` takes the media
    tokens out of a block's output: the family's ``block_features``) to the yielded list."""
    out: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        out.append(pick(output))

    handles = [blocks[i].register_forward_hook(hook) for i in indices]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


class Head(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature.float())  # (…, width) → (…, 1): one logit per token


class Discriminator(nn.Module):
    """One head per captured layer."""

    def __init__(self, width: int, num_layers: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList([Head(width, hidden) for _ in range(num_layers)])
        self.width = width

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} features for {len(self.heads)} discriminator heads")
        for f in features:
            if f.shape[-1] != self.width:
                raise ValueError(f"feature width {f.shape[-1]} does not match the discriminator's {self.width}")
        return [head(f) for head, f in zip(self.heads, features)]
