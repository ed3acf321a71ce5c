"""What the built-in families share (not a plugin: nothing here is registered): loading one part of a diffusers
pipeline folder with a clear error, peft's LoRA scale and metadata, and the Euler sampler on the flow ODE that every
flow-matching family hands the host as its default (teacher) sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..flow import T_MAX, euler_step, shift_sigma
from ..guidance import cfg_combine, teacher_scale
from ..networks import guided_batch


def autocast(dtype: torch.dtype | None, device: torch.device):
    """One network call's autocast region (``dtype`` None: none). Each call gets its own: one region around a no_grad
    and a grad call of the same module can drop gradients (autocast's weight cache)."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_part(cls: Any, path: str, subfolder: str, dtype: torch.dtype | None, pipeline: str) -> Any:
    """``cls.from_pretrained(path, subfolder=…)`` (in ``dtype`` when given); a local folder without ``subfolder/`` or
    weights that cannot be read are one ``UserError`` naming the folder and what a ``pipeline`` folder holds."""
    kwargs: dict[str, Any] = {"subfolder": subfolder}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    local = Path(path)
    if local.is_dir() and not (local / subfolder).is_dir():
        raise UserError(f"model folder {path} has no {subfolder}/ (a diffusers {pipeline} folder is expected)")
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as exc:  # diffusers/transformers raise OSError for missing/unreachable weights
        raise UserError(f"cannot load {subfolder} from {path}: {str(exc).splitlines()[0]}") from exc


def peft_scale(peft_config: Any) -> float:
    """The factor peft multiplies ``B·A`` by: ``alpha / r`` (``alpha / √r`` with rsLoRA). Per-module rank or alpha
    patterns are refused (an original-layout export writes one scale for every module)."""
    if getattr(peft_config, "rank_pattern", None) or getattr(peft_config, "alpha_pattern", None):
        raise ValueError("per-module rank_pattern/alpha_pattern: the original-layout export supports one rank")
    r, alpha = peft_config.r, peft_config.lora_alpha
    return alpha / r ** 0.5 if getattr(peft_config, "use_rslora", False) else alpha / r


def lora_metadata(peft_config: Any) -> dict[str, Any]:
    """The adapter's peft config as the metadata diffusers' ``save_lora_weights`` stores (rank and alpha travel in
    it, so ``load_lora_weights`` rebuilds the same scale)."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.to_dict().items()}


def euler_sampler(family: Any, network: torch.nn.Module, *, steps: int, shift: float):
    """The host's default sampler (the teacher's): Euler on the flow ODE over ``steps`` σs of the shifted uniform grid
    from 1 to 0, standard CFG ``u + s·(c − u)`` with cond and uncond in one batch; calls go through
    ``family.predict_flow``. ``guidance_scale`` may be a pair ``(scale, scale_2)`` for a family with experts: each
    step at its expert's scale (``guidance.teacher_scale``, as ``WanPipeline``'s ``guidance_scale_2``)."""
    def flow(x, t, cond):
        return family.predict_flow(network, x, t, cond).float()

    def sample(noise, cond, uncond, guidance_scale, generator):
        scale, scale_2 = guidance_scale if isinstance(guidance_scale, tuple) else (guidance_scale, None)
        sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
        x = noise
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((x.shape[0],), s * T_MAX, device=x.device)
            combine = None if uncond is None else cfg_combine(teacher_scale(family, scale, scale_2, t), t)
            v = guided_batch(family, flow, x, t, cond, uncond, combine)
            x = euler_step(x, v, s, s_next).to(noise.dtype)
        return x

    return sample


__all__ = ["autocast", "euler_sampler", "load_part", "lora_metadata", "peft_scale"]
