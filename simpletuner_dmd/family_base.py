"""``FamilyBase``: the class a model family derives from. It declares every *optional* member a host or a method may
read, with the default a family that does not set it gets; the required members are the ``ModelFamily`` and
``LoadingFamily`` Protocols in ``types.py``. Hosts and methods read these members as plain attributes, so a family
class derives from ``FamilyBase`` (a registered class that does not — a plugin written before it — gets the defaults
it lacks set on it by ``plugins.registered_families``); ``tests/test_bases.py`` checks that nothing reads a member
declared nowhere.

A callable member whose default is ``None`` is a hook the caller falls back from when absent (the caller and its
fallback are named in the member's docstring). Kept free of heavy imports: ``import simpletuner_dmd`` loads this.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping


class FamilyBase:
    """Optional members of a model family, each with its default, who reads it and when."""

    autocast_dtype: Any = None
    """The compute dtype of the network's forward (hosts construct ``FamilyClass(autocast_dtype=dtype)``; the family
    stores it). ``PairSource`` (``pair_source.py``) reads it for the dtype of a method's teacher ODE pairs; ``None``:
    fp32."""

    video: bool = True
    """False for an image-only family (SD3): the reference host's ``run_config`` refuses video datasets, and the model
    card's diffusers call asks for an image instead of frames."""

    context_parallel: bool = False
    """True when the family's network is one diffusers model whose class ships a ``_cp_plan`` and whose attention
    processors take diffusers' context-parallel config, so the reference host's ``context_parallel_size`` can split
    one sample's tokens over processes (``hosts/reference/context_parallel.py``; ``wan``, ``wan-i2v``,
    ``wan2.2-ti2v``). False: such a config is refused at ``validate-config`` by the family's name."""

    size_multiple: int = 1
    """Pixel widths and heights are multiples of it (``LoadingFamily`` requires it of a family the reference host
    loads); ``run_config.family_key_problems`` checks the validation size against it. 1: no rule."""

    frame_stride: int = 1
    """A clip has ``1 + frame_stride·k`` pixel frames (``LoadingFamily`` requires it of a family the reference host
    loads); ``run_config.family_key_problems`` checks the validation frame count, and ``estimate`` turns frames into
    latent frames for a method's ``memory_plan`` layout. 1: no rule."""

    pipeline_class: str = "DiffusionPipeline"
    """The name of the stock diffusers pipeline that loads the student; the reference host's model card
    (``hosts/reference/export.py``) writes the diffusers example with it."""

    card_notes: tuple[str, ...] = ()
    """Paragraphs the reference host's model card adds to its ComfyUI section (when an original-layout file was
    written)."""

    published_configs: Mapping[str, dict] = MappingProxyType({})
    """Hub id → the network's config, so ``simpletuner-dmd estimate`` (``estimate.transformer_config``) can estimate a
    published model without downloading it. Empty: local model folders only."""

    active_parameter_share: float = 1.0
    """The share of the network's parameters one call runs (Wan 2.2 A14B: 0.5, one expert of two);
    ``estimate.step_time_range`` scales the step-time range by it."""

    expert_guidance: Callable[[float, float, Any], Any] | None = None
    """``expert_guidance(scale, scale_2, t) -> (B,)`` fp32: for a family whose network switches experts by timestep
    (Wan 2.2 A14B), each sample's CFG scale from a pair, as the stock pipeline takes it (``WanPipeline``'s
    ``guidance_scale`` where the first, high-noise expert runs, ``guidance_scale_2`` where the second does; the model
    card's call passes ``guidance_scale_2``). Read by ``guidance.teacher_scale``: DMD's real score and the teacher's
    ODE pairs (``real_score_guidance_scale_2``) and the Euler sampler given a pair (the reference host's teacher
    samples, ``validation_teacher_guidance_2``). ``None``: one network, one scale; a second scale is reported by name
    as having no effect."""

    boundary_ratio: float | None = None
    """For a family with ``expert_guidance``: where its experts switch, as ``WanPipeline``'s config names it (a step at
    ``t >= boundary_ratio · 1000`` runs the first expert), once ``load_network`` has read it (the model's
    ``model_index.json``, or the reference host's ``boundary_ratio`` key through ``configure``). The teacher's ODE
    pairs' cache key and the model card's stock-pipeline code read it. ``None``: no experts."""

    configure: Callable[[dict], None] | None = None
    """``configure(host)``: the reference host hands the family instance its validated config once, before anything
    loads, for the keys that set how the family builds its network (Wan 2.2 A14B: ``boundary_ratio``). ``None``:
    the family reads no host key."""

    routes_by_timestep: bool = False
    """True when one call may run different sub-networks by timestep (Wan 2.2 A14B): DCM's ``distill_setup`` refuses
    such a family by name (its discriminator reads one network's features)."""

    simpletuner_names: tuple[tuple[str, str | None], ...] = ()
    """The SimpleTuner ``(model_family, model_flavour)`` pairs (flavour ``None``: any) this family serves under the
    SimpleTuner bridge (``hosts/simpletuner/distiller.simpletuner_family_class``). Read from the class's own
    ``vars()``, *not* inherited: a subclass serves nothing unless it declares the pairs itself (a family derived from
    SD3's must not claim SD3's names). This default therefore claims nothing."""

    simpletuner_fallback: bool = False
    """True for the family the SimpleTuner bridge serves every *flow-matching* SimpleTuner family with that no family
    declares in ``simpletuner_names`` and no family is named like (``hosts/simpletuner/model_family.py``: SimpleTuner's
    own ``model_predict``). At most one installed family may set it (``simpletuner_family_class``)."""

    bind_simpletuner_model: Callable[[Any], None] | None = None
    """``bind_simpletuner_model(model)``: the SimpleTuner bridge hands the family instance SimpleTuner's model object
    (``PluginDistiller.__init__``, before any other call) — for a family that calls SimpleTuner's model itself.
    ``None``: the family calls the network directly."""

    block_causal: Callable[[Any], Any] | None = None
    """For a family with ``causal = True``: ``block_causal(network)``, the network's block-causal switch
    (``families.block_causal.BlockCausalWan``: ``frame_blocks``, ``new_cache``, ``tokens_per_frame``, ``masked``,
    ``cached``). DMD's and ode_init's Self-Forcing rollouts and ``fewstep_sampling``'s streaming sampler call it.
    ``None``: a bidirectional family."""

    gan_feature_module: Callable[[Any], tuple[Any, int]] | None = None
    """``gan_feature_module(network) -> (module, width)``: the submodule of ``network`` whose output ``(B, width)`` or
    ``(B, tokens, width)`` DMD2's GAN classifier reads (Wan: the last transformer block). DMD's ``distill_setup``
    calls it when ``gan_loss_weight`` > 0, and refuses by name when it is ``None``."""

    @staticmethod
    def block_features(output: Any) -> Any:
        """A transformer block's media tokens from the block's output; DCM's discriminator (``capture`` in
        ``methods/dcm/discriminator.py``) calls it on every block it reads. Default: the output itself, or the first
        element of a tuple (Wan); SD3's blocks return ``(text, image)`` and take the second."""
        return output[0] if isinstance(output, tuple) else output

    original_lora_state: Callable[[dict, Any], dict] | None = None
    """``original_lora_state(lora_state, peft_config) -> dict`` (or ``{tag: state}``, one file per tag): the adapter in
    the key layout of the model's original code (Wan: ``diffusion_model.blocks.N.self_attn.q.lora_down`` / ``lora_up``
    / ``alpha``, which ComfyUI and published LoRAs use), raising ValueError for a module that layout cannot name. The
    reference host's export writes it beside the diffusers file. ``None``: no original-layout file."""

    lora_parts: Mapping[str, str] = MappingProxyType({"transformer": ""})
    """The stock pipeline's parts a LoRA file may go into (``load_lora_weights``' ``transformer``, Wan 2.2's
    ``transformer_2``) → the prefix of that part's modules in the family's network. ``teacher_loras``' ``into`` names
    one (``teacher_loras.py``: the merge and the combined export). Default: one ``transformer``, the network itself."""

    lora_pipeline: Callable[[], Any] | None = None
    """``lora_pipeline()``: the pipeline class whose ``lora_state_dict`` reads a LoRA file for this family's network
    (``teacher_loras``: both layouts); the SimpleTuner bridge's family that drives SimpleTuner's model object names the
    one that object names. ``None``: diffusers' class named ``pipeline_class``."""

    read_lora: Callable[[Any], dict] | None = None
    """``read_lora(folder) -> peft state`` for a family whose student LoRA is more than one file (Wan 2.2 A14B: one per
    expert); ``lora_files.read_lora`` calls it (``sample``, resuming). ``None``: ``lora_files``' one-file default."""

    load_lora_into_pipeline: Callable[..., None] | None = None
    """``load_lora_into_pipeline(pipe, folder, *, adapter_name)`` for a many-file student; ``lora_files``'s
    ``load_into_pipeline`` calls it (``sample``). ``None``: ``pipe.load_lora_weights``."""

    lora_loading_code: Callable[[], list[str]] | None = None
    """``lora_loading_code() -> lines`` for a many-file student: the model card's lines that load it into ``pipe``
    (``lora_files.loading_code``). ``None``: one ``pipe.load_lora_weights`` line."""

    pipeline_setup_code: Callable[[], list[str]] | None = None
    """``pipeline_setup_code() -> lines``: the model card's lines after the student is loaded that set the stock
    pipeline up as the run had it (Wan 2.2 A14B: ``pipe.register_to_config(boundary_ratio=…)``, the experts' switch
    the student was trained with). ``None``: none."""

    @staticmethod
    def config_problems(host: dict) -> list[str]:
        """The host settings the family cannot run (Wan 2.2 A14B: ``model_type: full``), one message each; the
        reference host's ``run_config.family_key_problems`` reports them with the config's other problems, before
        anything loads. Default: none."""
        return []

    meta_network: Callable[[dict], Any] | None = None
    """``meta_network(config)``: the network on the meta device, which ``simpletuner-dmd estimate`` counts parameters
    of. ``None``: the family does not describe its memory, and ``estimate`` says so by name."""

    activation_shape: Callable[..., dict[str, int]] | None = None
    """``activation_shape(config, *, width, height, frames) -> {"tokens", "hidden", "ffn", "blocks"}`` per sample, for
    ``simpletuner-dmd estimate``. ``None``: as ``meta_network``."""

    make_tiny: Callable[..., Any] | None = None
    """``make_tiny(path, *, seed=0) -> path``: a tiny pipeline of the family built from config and saved offline;
    ``simpletuner-dmd make-tiny`` calls it. ``None``: the command refuses the family by name."""

    clip_condition: Callable[[Any, Any], dict[str, Any]] | None = None
    """``clip_condition(components, pixels) -> {name: tensor (B, ...)}``: what a family conditions on besides the
    caption, from each clip's own pixels ``(B, 3, F, H, W)`` in [-1, 1] (``wan-i2v``: the first frame's CLIP image
    embedding and its VAE latents). The caption's condition is cached per caption, so a condition that belongs to the
    clip travels separately: the reference host calls this when it caches a clip's latents (``latent_cache``), stores
    the tensors beside them, stacks them per batch (``batches.collate``) and builds ``Batch.cond`` with
    ``attach_clip_condition``; its validation calls it on ``validation_image`` (as a clip of that first frame followed
    by zero frames). ``None`` (every text-to-video and image family): the caption's condition is the whole
    condition, and the host's batches, cache files and validation are as they were."""

    attach_clip_condition: Callable[[Any, dict[str, Any]], Any] | None = None
    """``attach_clip_condition(text_cond (B, L, D), clip {name: (B, ...)}) -> cond``: the condition methods receive
    in ``Batch.cond`` (and validation samplers in ``cond``) when the family has ``clip_condition``; the reference host
    keeps its parts in ``Batch.extras`` (``text_cond``, ``clip_condition``) so caption dropout swaps text rows alone.
    Such a family's ``concat_conditions`` and ``repeat_condition`` handle its own type, and a text-only condition (the
    negative prompt as ``encode_prompts`` returns it) wherever methods mix it in. ``None``: as ``clip_condition``."""

    from_simpletuner_batch: Callable[[Mapping[str, Any]], tuple[Any, Any]] | None = None
    """``from_simpletuner_batch(prepared_batch) -> (latents (B, C, F, H, W), cond)``: SimpleTuner's prepared batch in
    this family's layout; the SimpleTuner bridge (``hosts/simpletuner/distiller.py``) calls it on every micro-batch.
    ``None``: SimpleTuner's ``latents`` and ``encoder_hidden_states`` as they are (Wan)."""

    from_simpletuner_text: Callable[[Any], Any] | None = None
    """``from_simpletuner_text(encoded) -> cond (1, ...)``: SimpleTuner's ``encode_text_batch`` output for one text
    (the negative prompt, the validation prompt) as this family's condition; the SimpleTuner bridge's
    ``as_condition`` calls it. ``None``: Wan's ``prompt_embeds`` as a ``(1, L, D)`` tensor."""


__all__ = ["FamilyBase"]
