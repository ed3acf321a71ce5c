"""Few-step sampling of a distilled student, the way it was trained to be run — shared by the methods.

- ``sample_with_schedule``: a bidirectional student through its K timesteps (x̂0, re-noised with fresh noise to the
  next step), what DMD's and ``ode_init``'s samplers and the few-step scheduler do;
- ``few_step_sampler``: the ``distill_sampler`` of a method whose student samples this way (DMD, ``ode_init``), with
  CFG on the student when a host asks for it (bidirectional only);
- ``block_calls`` and ``sample_blocks``: a block-causal student (a family with ``causal = True`` and
  ``block_causal(network)``) streaming block by block through a KV cache — each block through all K timesteps, then
  written into the cache re-noised to ``context_noise``; ``window`` (latent frames) bounds the cache for clips longer
  than the student was trained on (a rolling cache), and ``on_block`` sees each block as soon as it is done.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import UserError
from .flow import T_MAX, flow_to_x0, guided
from .networks import guided_batch

PredictX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PredictBlock = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
WriteContext = Callable[[torch.Tensor, torch.Tensor, int, int], None]


def sample_with_schedule(predict_x0: PredictX0, noise: torch.Tensor, timesteps: list[int],
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step sampling with the same schedule (inference): all K steps, no grad, returns the final x̂0."""
    x = noise
    batch = noise.shape[0]
    with torch.no_grad():
        for i, step in enumerate(timesteps):
            t = torch.full((batch,), float(step), device=noise.device)
            x0 = predict_x0(x, t)
            if i + 1 < len(timesteps):
                sigma_next = timesteps[i + 1] / T_MAX
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                x = ((1.0 - sigma_next) * x0.float() + sigma_next * eps).to(noise.dtype)
    return x0


def block_calls(family: Any, network: torch.nn.Module, flow: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                cond: Any, noise: torch.Tensor, *, frames_per_block: int, independent_first_frame: bool,
                window: int | None = None) -> tuple[PredictBlock, WriteContext, list[tuple[int, int]]]:
    """``(predict, write, blocks)`` for ``noise``'s clip: ``predict(x, t, start, end)`` the x̂0 of ``flow`` on frames
    ``start:end`` reading a fresh KV cache (of ``window`` frames; None: unbounded), ``write`` the same pass appending
    its keys and values (the context write; under no_grad), and the block layout of the clip's frames."""
    switch = family.block_causal(network)
    tokens = switch.tokens_per_frame(noise)
    cache = switch.new_cache(window)

    def run(x, t, start, end, writing):
        cache.writing = writing
        with switch.cached(cache, start, tokens):
            return flow_to_x0(x, flow(x, t, cond), t)

    blocks = switch.frame_blocks(noise.shape[family.frame_axis()], frames_per_block,
                                 independent_first_frame=independent_first_frame)
    return (lambda x, t, s, e: run(x, t, s, e, False)), (lambda x, t, s, e: run(x, t, s, e, True)), blocks


def sample_blocks(predict_block: PredictBlock, write_context: WriteContext, noise: torch.Tensor,
                  timesteps: list[int], blocks: list[tuple[int, int]], *, context_noise: float,
                  generator: torch.Generator | None = None, on_block: Callable[[int, torch.Tensor], None] | None = None
                  ) -> torch.Tensor:
    """Streaming inference of a block-causal student: every block through all its ``timesteps`` (as
    ``sample_with_schedule``), then written into the KV cache at ``context_noise``; ``on_block(b, x0)`` sees each
    block as soon as it is done. No grad."""
    batch, outputs = noise.shape[0], []
    with torch.no_grad():
        for b, (start, end) in enumerate(blocks):
            x = noise[:, :, start:end]
            for i, step in enumerate(timesteps):
                t = torch.full((batch,), float(step), device=noise.device)
                x0 = predict_block(x, t, start, end)
                if i + 1 < len(timesteps):
                    sigma_next = timesteps[i + 1] / T_MAX
                    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                    x = ((1.0 - sigma_next) * x0.float() + sigma_next * eps).to(noise.dtype)
            outputs.append(x0)
            if on_block is not None:
                on_block(b, x0)
            if b + 1 < len(blocks):
                sigma = context_noise / T_MAX
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                context = ((1.0 - sigma) * x0.float() + sigma * eps).to(noise.dtype)
                write_context(context, torch.full((batch,), float(context_noise), device=noise.device), start, end)
    return torch.cat(outputs, dim=2)


def few_step_sampler(family: Any, network: torch.nn.Module,
                     flow: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], steps: list[int], *,
                     causal: bool, frames_per_block: int, independent_first_frame: bool, context_noise: float,
                     window: int | None):
    """A ``Sampler`` ``(noise, cond, uncond, guidance_scale, generator) → x̂0`` of the student ``flow``: through
    ``steps`` (``sample_with_schedule``), or, for a ``causal`` family, streamed block by block (``sample_blocks``).
    A guidance other than 0 or 1 with an uncond runs CFG on the student (cond and uncond as one batch); a block-causal
    student refuses it (one error line: its guidance is distilled)."""

    def sampler(noise, cond, uncond, guidance_scale, generator):
        use_cfg = uncond is not None and guidance_scale not in (0.0, 1.0)
        if causal:
            if use_cfg:
                raise UserError("validation_guidance: CFG on a block-causal student is not supported; sample it at "
                                "guidance 1 (the teacher's guidance is distilled into it)")
            predict, write, blocks = block_calls(family, network, flow, cond, noise, frames_per_block=frames_per_block,
                                                 independent_first_frame=independent_first_frame, window=window)
            return sample_blocks(predict, write, noise, steps, blocks, context_noise=context_noise,
                                 generator=generator)

        combine = (lambda c, u: guided(c, u, guidance_scale)) if use_cfg else None

        def predict_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return flow_to_x0(x, guided_batch(family, flow, x, t, cond, uncond, combine), t)

        return sample_with_schedule(predict_x0, noise, steps, generator)

    return sampler


def streaming_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What running a block-causal student of a ``distillation_config`` needs (DMD's key names: the export writes it
    into ``simpletuner_dmd.json`` for a causal family, and ``simpletuner-dmd sample`` streams with it): its
    timesteps, block layout, context noise and cache window."""
    return {"timesteps": list(config["dmd_denoising_steps"]), "num_frame_per_block": config["num_frame_per_block"],
            "independent_first_frame": config["independent_first_frame"],
            "context_noise": config["context_noise"], "kv_cache_window": config["kv_cache_window"]}
