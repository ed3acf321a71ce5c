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

    ``latents`` are ``(B, C, F, H, W)`` (an image is ``F = 1``); ``captions`` are the texts behind ``cond``.

    ``cond`` is the family's condition for the batch, whatever its ``encode_prompts`` returns; methods only hand it
    back to the family (``predict_flow``, ``concat_conditions``, ``repeat_condition``). The reference host, though,
    caches one condition per caption, collates them and drops captions on them as a tensor ``(B, L, D)`` (``L``
    tokens of width ``D`` per sample; shorter rows are zero-padded at the end to the batch's longest, which must not
    change what they mean; caption dropout swaps whole rows with ``torch.where``): a family served by the reference
    host encodes to that shape — SD3 packs its pooled embedding into token row 0 to fit (``families/sd3.py``). The
    SimpleTuner bridge passes whatever the family's ``from_simpletuner_batch`` returns.

    A condition that belongs to the clip rather than its caption (image-to-video's first frame) comes from the
    family's optional ``clip_condition`` hook (``FamilyBase``): the reference host caches it per clip and hands
    ``attach_clip_condition(text, clip)`` as ``cond`` (``wan-i2v``: a ``WanI2VCondition``), keeping the parts in
    ``extras["text_cond"]`` (the ``(B, L, D)`` text, what caption dropout swaps) and ``extras["clip_condition"]``.
    A family without the hook (the default) gets the text tensor as ``cond`` and neither extra.
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


# The host keys a method may read from ``RunContext.host_config``, with these meanings (the reference host's schema
# gives their defaults). A method reads nothing else of the host's config, and reads each with a default: a host may
# lack one (SimpleTuner has no nonfinite_skip_limit). tests/test_protocols.py checks the built-in methods.
HOST_KEYS_FOR_METHODS: dict[str, str] = {
    "seed": "the run seed (int)",
    "learning_rate": "the student's learning rate (a method's own optimizer may follow it)",
    "max_grad_norm": "the student's gradient clip (a method's own optimizer may follow it)",
    "gradient_checkpointing": "whether the host checkpoints the student's activations (a full-copy network should too)",
    "flow_schedule_shift": "the family's σ shift for training and sampling (a method's default for its own shift)",
    "nonfinite_skip_limit": "how many non-finite updates in a row stop the run",
    "validation_num_inference_steps": "the host's step count for the teacher's reference sample",
    "model_type": "lora or full, as RunContext.model_type",
    "optimizer": "the optimizer kind (simpletuner_dmd.optimizers.adamw builds it): a method's own optimizers follow it",
    "validation_prompt": "the host's validation prompt: a method's default prompt for what it generates itself (DMD's "
                         "teacher ODE pairs)",
    "cache_dir": "a folder for what a method computes once and reuses across runs (DMD's teacher ODE pairs); "
                 "absent: RunContext.output_dir/cache",
    "pretrained_model_name_or_path": "the base model's folder or hub id: the teacher's identity in a method's caches",
}


@dataclass
class RunContext:
    """Everything ``distill_setup`` may use. Built by the host; valid for the run, except ``encode_prompts``.

    ``host_config``: the host's config; a method reads only the keys in ``HOST_KEYS_FOR_METHODS``.
    ``method_config``: the method's validated ``distillation_config`` section (its schema's keys, defaults filled in).
    ``family``: the model family's instance (``ModelFamily``).
    ``student``: the bare trainable network — with the student's adapter already added when ``model_type`` is
    ``lora`` — for adding adapters, saving state and sampling; training passes call ``StepInfo.network``.
    ``accelerator``: the host's accelerate ``Accelerator`` (prepare the method's own models and optimizers with it).
    ``encode_prompts(texts) -> cond``: the family's condition for a batch of texts; valid during ``distill_setup``
    only (hosts may free the text encoder afterwards), so encode the negative prompt there.
    ``negative_prompt``: the host's negative prompt text (the unconditional branch of CFG).
    ``output_dir``: the run's output folder (None in tests and benchmarks that write nothing).
    ``model_type``: ``lora`` (the student is an adapter on a frozen base; the teacher is that base with every adapter
    off) or ``full`` (the student's weights are trained; then ``teacher`` must be a separate frozen copy).
    ``student_adapter``: the student's adapter name when ``model_type`` is ``lora``.
    ``load_base()``: a fresh copy of the base network (for full copies).
    ``teacher``: the separate frozen teacher for ``model_type: full``; None with ``lora``.
    ``seed``: the run seed. ``warn(message)``: the host's way to show a warning.
    ``data_parallel_rank``: this process's rank among the processes that take different batches and draw different
    noise (a method's own per-process draws seed from it); the processes that split one sample's tokens (the
    reference host's ``context_parallel_size``) share it. None: ``accelerator.process_index``.
    """
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
    data_parallel_rank: int | None = None


class Sampler(Protocol):
    """What ``distill_sampler`` returns (and a family's ``euler_sampler`` builds): samples x̂0 from noise.

    ``noise``: the starting latents ``(B, …)`` in the family's layout; ``cond``: the batch's condition (B rows);
    ``uncond``: the negative prompt's condition with *one* row (the sampler repeats it with
    ``family.repeat_condition``), or None; ``guidance_scale``: standard CFG ``u + s·(c − u)``, 0 or 1 meaning cond only
    (a family with experts' Euler sampler also takes a pair ``(scale, scale_2)``: each expert at its own);
    ``generator``: the CPU generator for any fresh noise the sampler draws (None: the global RNG). Returns the final
    latents, under no_grad.
    """

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
    """What every method needs to know about a model family (flow matching, rectified-flow convention):
    ``x_σ = (1 − σ)·x0 + σ·ε``; the network predicts the flow ``v = ε − x0`` at timestep ``t = 1000·σ``
    (``simpletuner_dmd.flow``).

    A family class is registered with ``register_model_families`` and constructed by hosts as
    ``FamilyClass(autocast_dtype=dtype)``: ``autocast_dtype`` is the compute dtype of the network's forward
    (``torch.bfloat16`` or ``torch.float16`` for mixed precision on a GPU; None for fp32).
    """

    name: str  # the value of model_family
    summary: str  # one line for `simpletuner-dmd plugins`
    causal: bool  # True when the family's network can run a block-causal (self-forcing) rollout

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Any
                     ) -> torch.Tensor:
        """The flow prediction of ``network`` (any instance of the family's network: student, copy, teacher) for
        latents ``x_t`` at ``timesteps`` (one per sample, ``t = 1000·σ``) under condition ``cond``."""

    def concat_conditions(self, conds: list[Any]) -> Any:
        """Concatenate conditions along the batch axis (the teacher's cond + uncond run as one batch)."""

    def repeat_condition(self, cond: Any, batch_size: int) -> Any:
        """A batch-1 condition (the negative prompt) repeated to ``batch_size``."""

    def frame_axis(self) -> int:
        """The axis of latent frames in the family's latent layout (Wan: 2 in ``(B, C, F, H, W)``)."""

    # The optional members (``block_causal``, ``gan_feature_module``, …), each with its default and its caller, are
    # declared by ``simpletuner_dmd.family_base.FamilyBase``, which every family class derives from.


@runtime_checkable
class LoadingFamily(ModelFamily, Protocol):
    """What a host that loads models and media from disk (the reference host) needs of a family, on top of
    ``ModelFamily``. ``components`` is whatever ``load_components`` returns (Wan: VAE, text encoder, tokenizer)."""

    lora_target_modules: tuple[str, ...]  # the module names the student's (and every second) adapter targets
    max_sequence_length: int  # the text encoder's default token length (host key tokenizer_max_length overrides)
    frame_stride: int  # a clip has 1 + frame_stride·k pixel frames (Wan: 4); hosts trim videos to that
    size_multiple: int  # pixel widths and heights are multiples of it (Wan: 16); hosts crop media to that

    def load_network(self, model_path: str, *, dtype: torch.dtype) -> torch.nn.Module:
        """The denoising network from a local diffusers folder (or hub id), in ``dtype``, frozen."""

    def load_components(self, model_path: str, *, text_encoder_path: str | None, dtype: torch.dtype) -> Any:
        """Everything else the host needs to encode data and decode samples (VAE, text encoder, tokenizer)."""

    def encode_prompts(self, components: Any, texts: list[str], *, max_length: int | None = None) -> Any:
        """The condition for ``texts`` (Wan: UMT5 embeddings ``(B, L, D)``, zero-padded as ``WanPipeline`` does)."""

    def encode_pixels(self, components: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] → the network's normalised latents."""

    def decode_latents(self, components: Any, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode_pixels``: latents → pixels ``(B, 3, F, H, W)`` in [-1, 1]."""

    def latent_shape(self, components: Any, *, width: int, height: int, frames: int) -> tuple[int, ...]:
        """The latent shape (without the batch axis) of a ``frames``-frame clip of ``width`` × ``height``."""

    def save_lora(self, lora_state: dict[str, torch.Tensor], folder: Path, peft_config: Any) -> Path:
        """Write a student's adapter weights in the format the family's stock pipeline loads; returns the file."""

    def euler_sampler(self, network: torch.nn.Module, *, steps: int, shift: float) -> Sampler:
        """The host's default sampler (the teacher's): Euler on the flow ODE over ``steps`` shifted σs."""

    # The optional members (``original_lora_state``, ``pipeline_class``, the estimate's ``meta_network``, …) are
    # declared by ``FamilyBase``, with their defaults and callers.


@runtime_checkable
class Method(Protocol):
    """A distillation method class, as ``register_methods`` hands it over. Hosts build one instance per run as
    ``MethodClass(config)`` with the validated ``distillation_config`` section and register it with the plugin
    manager; the instance implements the step-loop hooks of ``hookspecs`` with ``@hookimpl`` (``distill_setup`` and
    ``distill_loss`` at least).

    The optional members (``config_warnings``, ``progress_metrics``, ``usage_notes``, ``memory_plan``,
    ``streaming``), each with its default and its caller, are declared by ``simpletuner_dmd.method_base.MethodBase``,
    which every method class derives from."""

    name: str  # the value of distillation_method
    summary: str  # one line for `simpletuner-dmd plugins` and the docs' key tables
    schema: Any  # a simpletuner_dmd.Schema of every key of the method's distillation_config

    def __init__(self, config: Mapping[str, Any]) -> None: ...


__all__ = ["Batch", "HOST_KEYS_FOR_METHODS", "LoadingFamily", "Method", "ModelFamily", "RunContext", "Sampler",
           "StepInfo", "StepLoss", "step_generator"]
