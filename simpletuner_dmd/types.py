"""The small data types and Protocols the hooks pass around.

Kept free of heavy imports: torch appears only in annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


@dataclass
class Batch:
    """One micro-batch as the host hands it to ``distill_loss``.

    ``latents`` are ``(B, C, F, H, W)`` (an image is ``F = 1``); ``cond`` is the family's condition for the batch
    (Wan: prompt embeddings ``(B, L, D)``); ``captions`` are the texts behind ``cond``.
    """

    latents: torch.Tensor
    cond: Any
    captions: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepInfo:
    """Where the run stands. ``global_step`` counts optimizer steps already completed (0 on the first step).

    ``generator`` is seeded identically on every process from the run seed and the step, so draws that must agree
    across ranks (DMD's exit index) are equal everywhere; per-sample noise may use the global RNG.
    """

    global_step: int
    micro_step: int
    accumulation_steps: int
    sync_gradients: bool
    generator: torch.Generator
    # The student network to call in this step: the host's prepared module (DDP-wrapped under several processes, so
    # a backward through it all-reduces gradients). None: call the module given to distill_setup.
    network: torch.nn.Module | None = None


def step_generator(seed: int, global_step: int, micro_step: int) -> torch.Generator:
    """``StepInfo.generator``: seeded from (seed, step, micro-batch) alone, so every process — and every host, the
    reference trainer and the SimpleTuner bridge alike — draws the same values from it."""
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + global_step * 1_009 + micro_step) % (2 ** 63))


@dataclass
class StepLoss:
    """What ``distill_loss`` returns: the student's loss (``None``: no student update on this micro-batch) and logs."""

    loss: torch.Tensor | None
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything ``distill_setup`` may use. Built by the host."""

    host_config: Mapping[str, Any]
    method_config: Mapping[str, Any]
    family: ModelFamily
    student: torch.nn.Module
    accelerator: Accelerator
    encode_prompts: Callable[[list[str]], Any]
    negative_prompt: str
    output_dir: Path
    model_type: str  # "lora": student is an adapter on a frozen base; "full": the student's weights are trained
    student_adapter: str | None  # the student's adapter name when model_type == "lora"
    load_base: Callable[[], torch.nn.Module]  # a fresh copy of the base network (full copies, full-model teachers)
    teacher: torch.nn.Module | None = None  # a separate frozen teacher (model_type "full"); None: base, adapters off
    seed: int = 0
    warn: Callable[[str], None] = print


class Sampler(Protocol):
    def __call__(
        self,
        noise: torch.Tensor,
        cond: Any,
        uncond: Any,
        guidance_scale: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor: ...


@runtime_checkable
class ModelFamily(Protocol):
    """What a method needs to know about a model family (flow-matching, rectified-flow convention).

    ``x_σ = (1 − σ)·x0 + σ·ε``; the network predicts the flow ``v = ε − x0`` at timestep ``t = 1000·σ``.
    """

    name: str
    causal: bool  # True when the family's network can run a block-causal (self-forcing) rollout

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Any
                     ) -> torch.Tensor:
        """The flow prediction of ``network`` (any instance of the family's network: student, copy, teacher)."""

    def concat_conditions(self, conds: list[Any]) -> Any:
        """Concatenate conditions along the batch axis (the teacher's cond + uncond run as one batch)."""

    def repeat_condition(self, cond: Any, batch_size: int) -> Any:
        """A batch-1 condition (the negative prompt) repeated to ``batch_size``."""

    def frame_axis(self) -> int:
        """The axis of latent frames (Wan: 2 in ``(B, C, F, H, W)``)."""

    # Optional (not part of the runtime check): ``gan_feature_module(network) -> (module, width)``, the submodule of
    # ``network`` whose output ``(B, width)`` or ``(B, tokens, width)`` DMD2's GAN classifier reads (Wan: the last
    # transformer block). DMD's ``gan_loss_weight`` > 0 needs it and says so by name when a family lacks it.


__all__ = ["Batch", "StepInfo", "StepLoss", "RunContext", "Sampler", "ModelFamily", "step_generator"]
