"""Backward simulation (DMD2 §4.5, Self-Forcing's training rollout, bidirectional case): the student generates its
training sample the way it samples at inference, from pure noise through its own timesteps, and exits at step k.

Only the exit step builds a graph: the steps before it run under ``no_grad`` (they are inputs, not parameters' paths),
so the memory of a rollout is that of one forward pass whatever k is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...fewstep_sampling import PredictBlock, PredictX0, WriteContext
from ...flow import T_MAX


@dataclass
class Rollout:
    x0: torch.Tensor  # the generated sample x̂0 (with a graph to the student when with_grad)
    exit_index: int
    denoised_from: float  # t_k
    denoised_to: float  # t_{k+1}, 0 when k is the last index
    student_forwards: int


def backward_simulation(predict_x0: PredictX0, noise: torch.Tensor, timesteps: list[int], exit_index: int, *,
                        with_grad: bool) -> Rollout:
    """Run the student from ``noise`` through ``timesteps[:exit_index + 1]``.

    For i < k, under no_grad: ``x̂0 = G(x, t_i)``, then ``x = (1 − σ_{i+1})·x̂0 + σ_{i+1}·ε_fresh``.
    At i = k: ``x̂0 = G(x, t_k)`` with grad when ``with_grad``.
    """
    x = noise
    batch = noise.shape[0]
    for i in range(exit_index):
        t = torch.full((batch,), float(timesteps[i]), device=noise.device)
        with torch.no_grad():
            x0 = predict_x0(x, t)
            sigma_next = timesteps[i + 1] / T_MAX
            x = ((1.0 - sigma_next) * x0.float() + sigma_next * torch.randn_like(x0, dtype=torch.float32)
                 ).to(noise.dtype)
    t = torch.full((batch,), float(timesteps[exit_index]), device=noise.device)
    with torch.set_grad_enabled(with_grad):
        x0 = predict_x0(x, t)
    denoised_to = float(timesteps[exit_index + 1]) if exit_index + 1 < len(timesteps) else 0.0
    return Rollout(x0, exit_index, float(timesteps[exit_index]), denoised_to, exit_index + 1)


# --------------------------------------------------------------------------- the block-causal rollout (Self-Forcing)


@dataclass
class BlockRollout:
    x0: torch.Tensor  # the whole generated clip (B, C, F, H, W): each block's exit x̂0, in frame order
    exit_indices: list[int]  # one per block
    grad_blocks: list[int]  # the blocks whose exit step built a graph (inside the last num_training_frames frames)
    student_forwards: int  # denoising forwards, every block
    context_writes: int  # no-grad forwards that wrote a finished block into the KV cache


def block_backward_simulation(predict_block: PredictBlock, write_context: WriteContext, noise: torch.Tensor,
                              timesteps: list[int], blocks: list[tuple[int, int]], exits: list[int], *,
                              grad_from_frame: int, context_noise: float, with_grad: bool) -> BlockRollout:
    """Self-Forcing's training rollout: the blocks in turn, each from its own noise through the student's
    ``timesteps``, exiting at its own ``exits[b]``.

    For a block: the steps before its exit run under no_grad (x̂0, then re-noised to the next step with fresh noise);
    the exit step builds a graph only when ``with_grad`` and the block starts at or after ``grad_from_frame`` (the last
    ``num_training_frames`` frames); its x̂0 is the block's output. Then, unless it is the last block, the context
    write: the output re-noised to ``context_noise`` (0: clean) and run once at that timestep under no_grad, which
    ``write_context`` does into the KV cache — so no gradient reaches an earlier block (stochastic gradient
    truncation). ``predict_block(x, t, start, end)`` runs the student on frames ``start:end`` (one timestep per
    sample, ``(B,)``) reading the cache; the frame axis is 2 (``(B, C, F, H, W)``)."""
    outputs, grad_blocks, forwards, writes = [], [], 0, 0
    batch = noise.shape[0]
    for b, ((start, end), k) in enumerate(zip(blocks, exits)):
        x = noise[:, :, start:end]
        for i in range(k):
            t = torch.full((batch,), float(timesteps[i]), device=noise.device)
            with torch.no_grad():
                x0 = predict_block(x, t, start, end)
                sigma_next = timesteps[i + 1] / T_MAX
                x = ((1.0 - sigma_next) * x0.float() + sigma_next * torch.randn_like(x0, dtype=torch.float32)
                     ).to(noise.dtype)
            forwards += 1
        t = torch.full((batch,), float(timesteps[k]), device=noise.device)
        grad = with_grad and start >= grad_from_frame
        with torch.set_grad_enabled(grad):
            x0 = predict_block(x, t, start, end)
        forwards += 1
        if grad:
            grad_blocks.append(b)
        outputs.append(x0)
        if b + 1 < len(blocks):
            with torch.no_grad():
                sigma = context_noise / T_MAX
                context = ((1.0 - sigma) * x0.detach().float() + sigma * torch.randn_like(x0, dtype=torch.float32)
                           ).to(noise.dtype)
                write_context(context, torch.full((batch,), float(context_noise), device=noise.device), start, end)
            writes += 1
    return BlockRollout(torch.cat(outputs, dim=2), list(exits), grad_blocks, forwards, writes)
