"""The Stable Diffusion 3 / 3.5 text-to-image family over diffusers' ``SD3Transformer2DModel`` — a plugin like any
third-party one.

**Layout.** The host contract is latents ``(B, C, F, H, W)``; an SD3 image is ``F = 1``, so latents are
``(B, 16, 1, H/8, W/8)`` and ``predict_flow`` drops the frame axis around the network's ``(B, C, H, W)`` call and puts
it back. Latents are normalised as ``StableDiffusion3Pipeline`` does: ``(z − shift_factor)·scaling_factor`` after
encoding, the inverse before decoding. Clips of several frames are refused (``UserError``): the family is image-only.

**Condition: one tensor.** SD3 is conditioned on two things, the joint prompt embeddings ``(B, 77 + L, D)`` (CLIP-L
and CLIP-G penultimate hidden states concatenated along the features and zero-padded to T5's width ``D``, then the
``L`` T5 tokens, exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them) and the pooled projection
``(B, P)`` (CLIP-L's and CLIP-G's ``text_embeds`` concatenated; ``P`` = the transformer's ``pooled_projection_dim``).
Hosts cache, pad, collate, move and drop out (``torch.where`` row-wise against the empty prompt) a single
``(B, L', D)`` tensor, so the two are packed into one ``(B, 1 + 77 + L, D)`` tensor:

- row 0: the pooled projection, its ``P`` values followed by ``D − P`` zeros (``P ≤ D``: SD3.5 has 2048 ≤ 4096);
- rows 1…: the joint prompt embeddings as the pipeline gives them.

``pack_condition`` / ``unpack_condition`` convert; ``predict_flow`` unpacks with ``P`` read from
``network.config.pooled_projection_dim``. Every prompt packs to the same length, so hosts' zero-padding in collation
never applies, and a row-wise ``torch.where`` swaps both parts of a condition together.

**Schedule.** σ is ``t / 1000`` by value; the network predicts the flow ``ε − x0`` and is called with
``timestep = t`` (the scheduler's ``1000·σ``, what the pipeline passes). The published SD3 and SD3.5 scheduler
configs are ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` without ``use_dynamic_shifting``: a static shift of 3, the
same at every resolution (no ``mu``). ``euler_sampler`` steps the host's grid (the shifted uniform grid from 1 to 0
that every family uses); the stock scheduler's default grid for N steps is another one (``linspace(1, σ_min, N)``,
shifted), and ``StableDiffusion3Pipeline(..., sigmas=linspace(1, 0, N + 1)[:-1])`` reproduces the family's sampler
exactly.

**Components.** ``load_components`` returns ``SD3Components``: the VAE (fp32) and ``text_encoder``, a
``torch.nn.ModuleList`` of the three text encoders (CLIP-L, CLIP-G, T5), so that a host's ``.to(device)``, int8
quantization and ``components.text_encoder = None`` act on all three at once; ``tokenizers`` holds the three
tokenizers in the same order.

**LoRA files.** ``save_lora`` writes ``pytorch_lora_weights.safetensors`` with
``StableDiffusion3Pipeline.save_lora_weights`` (rank and alpha in its metadata). ``original_lora_state`` writes the
file ComfyUI reads: ComfyUI loads SD3 LoRAs in diffusers' key layout (``transformer.transformer_blocks.N.attn.to_q.
lora_A.weight`` …, mapped onto MMDiT's fused ``qkv`` by its ``mmdit_to_diffusers``) but ignores the safetensors
metadata where diffusers keeps alpha, so that file carries peft's scale ``alpha / r`` folded into ``lora_B`` and no
alpha (scale 1 in ComfyUI and in diffusers alike). diffusers has no converter of its own for SD3 LoRAs.

diffusers, transformers and optimum-quanto are imported inside the methods that need them, so listing plugins stays
cheap.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..family_base import FamilyBase
from ..hookspecs import hookimpl
from .common import autocast, euler_sampler, load_part, lora_metadata, peft_scale


@dataclass
class SD3Components:
    """What a host loads besides the network. ``text_encoder``: ``ModuleList([CLIP-L, CLIP-G, T5])``;
    ``tokenizers``: their three tokenizers, same order. Everything frozen."""

    vae: Any
    text_encoder: Any
    tokenizers: tuple


def pack_condition(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, S, D)`` joint prompt embeddings and ``(B, P)`` pooled projections → ``(B, 1 + S, D)`` (fp32): row 0 the
    pooled values zero-padded to ``D``, then the embeddings."""
    width = prompt_embeds.shape[-1]
    if pooled.shape[-1] > width:
        raise UserError(f"the pooled projection ({pooled.shape[-1]} values) is wider than the prompt embeddings "
                        f"({width}); the sd3 family packs it into one row of them")
    row = torch.nn.functional.pad(pooled.float(), (0, width - pooled.shape[-1])).unsqueeze(1)
    return torch.cat([row.to(prompt_embeds.device), prompt_embeds.float()], dim=1)


def unpack_condition(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_condition``: ``(prompt_embeds (B, S, D), pooled (B, pooled_dim))``."""
    return cond[:, 1:], cond[:, 0, :pooled_dim]


# The modules ComfyUI's SD3 key map (comfy.utils.mmdit_to_diffusers) names: the joint blocks' attention projections
# (attn2: SD3.5 Medium's second image attention) and feed-forward layers.
_COMFY_MODULE = re.compile(
    r"transformer_blocks\.\d+\.(?:attn2?\.(?:to_q|to_k|to_v|to_out\.0)|attn\.(?:add_q_proj|add_k_proj|add_v_proj|"
    r"to_add_out)|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)")


# SD3.5's published transformer configs (diffusers' SD3Transformer2DModel), by hub id, for `estimate`: Large is 38
# blocks 2432 wide (38 heads x 64), Medium 24 blocks 1536 wide with a second image attention in blocks 0-12.
_SD35 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
             joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")
PUBLISHED_CONFIGS = {
    "stabilityai/stable-diffusion-3.5-large": {**_SD35, "num_layers": 38, "num_attention_heads": 38,
                                               "caption_projection_dim": 2432, "pos_embed_max_size": 192},
    "stabilityai/stable-diffusion-3.5-medium": {**_SD35, "num_layers": 24, "num_attention_heads": 24,
                                                "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                                                "dual_attention_layers": tuple(range(13))},
}


class SD3Family(FamilyBase):
    name = "sd3"
    summary = "Stable Diffusion 3/3.5 text-to-image (diffusers SD3Transformer2DModel), flow matching, static shift 3"
    causal = False
    pipeline_class = "StableDiffusion3Pipeline"  # the stock diffusers pipeline that loads the student
    # The joint blocks' attention: image-stream projections (also attn2's, in SD3.5 Medium's dual-attention blocks)
    # and the context stream's (the last block has no to_add_out: its context output is unused).
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    frame_stride = 1  # images: one frame
    video = False  # image-only: hosts refuse video datasets and frame counts other than 1
    size_multiple = 16  # the VAE downsamples 8x and the transformer patches 2x2 latents
    max_sequence_length = 256  # T5 tokens, StableDiffusion3Pipeline's default
    published_configs = PUBLISHED_CONFIGS  # hub id → transformer config, for `simpletuner-dmd estimate`
    card_notes = (("The ComfyUI file keeps diffusers' key names (`transformer.transformer_blocks.N.attn.to_q…`), "
                   "which ComfyUI maps onto SD3's fused qkv itself; the LoRA scale is folded into its weights."),)

    def __init__(self, *, autocast_dtype: torch.dtype | None = None):
        # One autocast region per network call (as the Wan family): never one region around several calls.
        self.autocast_dtype = autocast_dtype

    # ----------------------------------------------------------------------- what methods use

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
                     ) -> torch.Tensor:
        """``x_t`` ``(B, C, 1, H, W)``, one timestep ``t = 1000·σ`` per sample, the packed condition → the flow
        ``(B, C, 1, H, W)``."""
        if timesteps.ndim != 1 or timesteps.shape[0] != x_t.shape[0]:
            raise ValueError(f"one timestep per sample expected, got {tuple(timesteps.shape)} for {tuple(x_t.shape)}")
        if x_t.ndim != 5 or x_t.shape[2] != 1:
            raise ValueError(f"latents (B, C, 1, H, W) expected (the sd3 family is image-only), got {tuple(x_t.shape)}")
        prompt_embeds, pooled = unpack_condition(cond, _bare(network).config.pooled_projection_dim)
        with self._autocast(x_t.device):
            out = network(hidden_states=x_t[:, :, 0], encoder_hidden_states=prompt_embeds,
                          pooled_projections=pooled, timestep=timesteps, return_dict=False)[0]
        return out.unsqueeze(2)

    def _autocast(self, device: torch.device):
        return autocast(self.autocast_dtype, device)

    def frame_axis(self) -> int:
        return 2

    def gan_feature_module(self, network: torch.nn.Module) -> tuple[torch.nn.Module, int]:
        """The final norm (``norm_out``): its output, the image tokens' last hidden state ``(B, tokens, width)``
        before the output projection, feeds DMD2's GAN classifier. (A joint block returns a ``(context, image)``
        pair, and the last one no context.)"""
        return network.norm_out, network.config.num_attention_heads * network.config.attention_head_dim

    @staticmethod
    def block_features(output: tuple) -> torch.Tensor:
        """The image tokens of a joint block's output ``(context, image)`` (DCM's discriminator reads them)."""
        return output[1]

    def concat_conditions(self, conds: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conds, dim=0)

    def repeat_condition(self, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        return cond.expand(batch_size, *cond.shape[1:])

    # ----------------------------------------------------------------------- what hosts that load models use

    def load_network(self, model_path: str, *, dtype: torch.dtype) -> torch.nn.Module:
        """``SD3Transformer2DModel`` from ``transformer/``, in ``dtype``, frozen."""
        from diffusers import SD3Transformer2DModel

        return _load(SD3Transformer2DModel, model_path, "transformer", dtype).requires_grad_(False)

    def load_components(self, model_path: str, *, text_encoder_path: str | None, dtype: torch.dtype
                        ) -> SD3Components:
        """The VAE (fp32, from ``model_path``) and the three text encoders in ``dtype`` with their tokenizers (from
        ``text_encoder_path`` when given — a folder with the same ``text_encoder*/`` and ``tokenizer*/`` — else
        ``model_path``)."""
        from diffusers import AutoencoderKL
        from transformers import (
            AutoTokenizer,
            CLIPTextModelWithProjection,
            T5EncoderModel,
        )

        te_path = text_encoder_path or model_path
        vae = _load(AutoencoderKL, model_path, "vae", torch.float32)  # fp32 VAE, as the Wan family
        encoders = torch.nn.ModuleList([_load(CLIPTextModelWithProjection, te_path, "text_encoder", dtype),
                                        _load(CLIPTextModelWithProjection, te_path, "text_encoder_2", dtype),
                                        _load(T5EncoderModel, te_path, "text_encoder_3", dtype)])
        tokenizers = tuple(_load(AutoTokenizer, te_path, sub, None) for sub in ("tokenizer", "tokenizer_2",
                                                                                 "tokenizer_3"))
        for module in (vae, encoders):
            module.requires_grad_(False).eval()
        return SD3Components(vae, encoders, tokenizers)

    @torch.no_grad()
    def encode_prompts(self, components: SD3Components, texts: list[str], *, max_length: int | None = None
                       ) -> torch.Tensor:
        """The packed condition ``(B, 1 + 77 + max_length, D)`` (module docstring; T5 length default 256), built as
        ``StableDiffusion3Pipeline.encode_prompt`` builds its two tensors (texts as given, no clip skip)."""
        clip_l, clip_g, t5 = components.text_encoder
        tok_l, tok_g, tok_t5 = components.tokenizers
        device = next(components.text_encoder.parameters()).device
        texts = list(texts)
        clip_length = tok_l.model_max_length  # the pipeline pads both CLIP prompts to CLIP-L's length
        hidden_l, pooled_l = _clip_embeds(tok_l, clip_l, texts, clip_length, device)
        hidden_g, pooled_g = _clip_embeds(tok_g, clip_g, texts, clip_length, device)
        ids = tok_t5(texts, padding="max_length", max_length=max_length or self.max_sequence_length,
                     truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        t5_embeds = t5(ids.to(device))[0].float()  # no attention mask, as the pipeline
        clip = torch.cat([hidden_l.float(), hidden_g.float()], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        prompt_embeds = torch.cat([clip, t5_embeds], dim=-2)
        return pack_condition(prompt_embeds, torch.cat([pooled_l, pooled_g], dim=-1))

    @torch.no_grad()
    def encode_pixels(self, components: SD3Components, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 1, H, W)`` in [-1, 1] → normalised latents ``(B, 16, 1, H/8, W/8)`` (the posterior's mode)."""
        _one_frame(pixels.shape[2])
        vae = components.vae
        pixels = pixels[:, :, 0].to(next(vae.parameters()).device, torch.float32)
        latents = vae.encode(pixels).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).unsqueeze(2)

    @torch.no_grad()
    def decode_latents(self, components: SD3Components, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, 16, 1, h, w)`` → pixels ``(B, 3, 1, 8h, 8w)`` in [0, 1]."""
        _one_frame(latents.shape[2])
        vae = components.vae
        latents = latents[:, :, 0].to(next(vae.parameters()).device, torch.float32)
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0).unsqueeze(2)

    def latent_shape(self, components: SD3Components, *, width: int, height: int, frames: int) -> tuple[int, ...]:
        """``(C, 1, H/f, W/f)`` with ``f`` the pipeline's ``vae_scale_factor`` (8 for SD3's VAE)."""
        _one_frame(frames)
        cfg = components.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        return (cfg.latent_channels, 1, height // factor, width // factor)

    @staticmethod
    def config_problems(host: dict) -> list[str]:
        """The reference host's keys this image-only family cannot run: validation clips of several frames."""
        frames = host.get("validation_num_video_frames", 1)
        if frames != 1:
            return [f"config.validation_num_video_frames: the sd3 family is image-only (1 frame), got {frames}"]
        return []

    @staticmethod
    def meta_network(transformer_config: dict) -> torch.nn.Module:
        """The network built on the ``meta`` device from its config (``estimate`` counts its parameters)."""
        import inspect

        from diffusers import SD3Transformer2DModel

        known = set(inspect.signature(SD3Transformer2DModel.__init__).parameters)
        with torch.device("meta"):
            return SD3Transformer2DModel(**{k: v for k, v in transformer_config.items() if k in known})

    @classmethod
    def activation_shape(cls, transformer_config: dict, *, width: int, height: int, frames: int) -> dict[str, int]:
        """What one sample's activations scale with: ``tokens``, the image's (8x VAE, then the patch) plus the text's
        77 + 256 (the joint blocks carry both streams), the ``hidden`` width, the feed-forward width ``ffn`` (4x)
        and the ``blocks``."""
        _one_frame(frames)
        patch = transformer_config.get("patch_size", 2)
        tokens = (height // 8 // patch) * (width // 8 // patch) + 77 + cls.max_sequence_length
        hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
        return {"tokens": tokens, "hidden": hidden, "ffn": 4 * hidden, "blocks": transformer_config["num_layers"]}

    def save_lora(self, lora_state: dict[str, torch.Tensor], folder: Path, peft_config: Any) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusion3Pipeline.load_lora_weights(folder)``
        loads (rank and alpha travel in its metadata)."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=lora_state,
                                                   transformer_lora_adapter_metadata=lora_metadata(peft_config))
        return Path(folder) / "pytorch_lora_weights.safetensors"

    def original_lora_state(self, lora_state: dict[str, torch.Tensor], peft_config: Any) -> dict[str, torch.Tensor]:
        """The adapter as ComfyUI reads SD3 LoRAs: diffusers' keys with the ``transformer.`` prefix
        (``transformer.transformer_blocks.N.attn.to_q.lora_A.weight`` / ``lora_B.weight``), peft's scale folded into
        ``lora_B`` and no alpha key (module docstring). A module ComfyUI's SD3 key map does not name (outside the
        joint blocks' attention and feed-forward layers) raises ``ValueError`` naming it."""
        scale = peft_scale(peft_config)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in lora_state.items():
            module, sep, tail = key.partition(".lora_A.") if ".lora_A." in key else key.partition(".lora_B.")
            if not sep or tail != "weight":
                raise ValueError(f"{key}: not a LoRA A/B weight; ComfyUI's SD3 LoRA layout has no name for it")
            if not _COMFY_MODULE.fullmatch(module):
                raise ValueError(f"{module}: ComfyUI's SD3 LoRA key map has no name for this module (it covers the "
                                 "joint blocks' attention and feed-forward layers)")
            out[f"transformer.{key}"] = tensor * scale if ".lora_B." in key else tensor
        return out

    def euler_sampler(self, network: torch.nn.Module, *, steps: int, shift: float):
        """The host's default sampler (the teacher's): Euler on the flow ODE over ``steps`` σs of the shifted uniform
        grid from 1 to 0 (static shift: SD3 has no resolution-dependent ``mu``), standard CFG ``u + s·(c − u)``."""
        return euler_sampler(self, network, steps=steps, shift=shift)

    # ----------------------------------------------------------------------- what the SimpleTuner bridge uses

    # SimpleTuner's ``model_family: sd3``, every flavour (``medium``, ``large``): its ``SD3`` model trains the same
    # ``SD3Transformer2DModel`` (SimpleTuner's own subclass, called with the same keywords as diffusers').
    simpletuner_names = (("sd3", None),)

    @staticmethod
    def from_simpletuner_batch(prepared_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """SimpleTuner's prepared ``sd3`` batch → ``(latents (B, 16, 1, h, w), packed condition)``. SimpleTuner's
        latents are ``(B, 16, h, w)`` (already ``(z − shift)·scale``, as this family's); its condition is
        ``encoder_hidden_states`` ``(B, 77 + L, D)`` (the joint prompt embeddings) and ``add_text_embeds`` ``(B, P)``
        (the pooled projections), what its ``model_predict`` passes as ``pooled_projections``."""
        latents = prepared_batch["latents"]
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        prompt_embeds = prepared_batch["encoder_hidden_states"]
        pooled = prepared_batch["add_text_embeds"].to(prompt_embeds.device)
        return latents, pack_condition(prompt_embeds, pooled.reshape(prompt_embeds.shape[0], -1))

    @staticmethod
    def from_simpletuner_text(encoded: dict) -> torch.Tensor:
        """SimpleTuner's ``encode_text_batch([text])`` for ``sd3`` (``{"prompt_embeds" (1, 77 + L, D),
        "pooled_prompt_embeds" (P,)}``: its ``_format_text_embedding`` squeezes the batch axis of the pooled one) →
        the packed condition ``(1, 1 + 77 + L, D)``."""
        prompt_embeds = encoded["prompt_embeds"]
        if prompt_embeds.ndim == 2:
            prompt_embeds = prompt_embeds.unsqueeze(0)
        pooled = encoded["pooled_prompt_embeds"].reshape(prompt_embeds.shape[0], -1)
        return pack_condition(prompt_embeds, pooled)

    # ----------------------------------------------------------------------- a tiny model for tests

    @staticmethod
    def make_tiny(path: str | Path, *, seed: int = 0) -> Path:
        """Build a complete tiny ``StableDiffusion3Pipeline`` offline (seeded random weights, tokenizers made in
        memory), save it to ``path`` and return ``path``; it reloads with ``StableDiffusion3Pipeline.from_pretrained``.

        The parts: a 2-block ``SD3Transformer2DModel`` (width 16, 16 latent channels, patch 2, RMS qk-norm as SD3.5,
        block 0 with SD3.5 Medium's second attention), an ``AutoencoderKL`` with 16 latent channels, 8x downsampling
        and SD3's ``scaling_factor`` 1.5305 / ``shift_factor`` 0.0609, two CLIP text encoders with projection (widths
        16 and 24: pooled 40), a T5 encoder of width 48 (the joint attention width), and
        ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. A 64x64 image has 8x8 latents and 16 tokens.
        """
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
        from transformers import (
            CLIPTextConfig,
            CLIPTextModelWithProjection,
            T5Config,
            T5EncoderModel,
        )

        path = Path(path)
        torch.manual_seed(seed)
        clip_tokenizers = (_tiny_clip_tokenizer(), _tiny_clip_tokenizer())
        t5_tokenizer = _tiny_t5_tokenizer()

        def clip(width: int):
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(clip_tokenizers[0]), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
                bos_token_id=0, eos_token_id=1, pad_token_id=1))

        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
                out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=clip(16), tokenizer=clip_tokenizers[0],
            text_encoder_2=clip(24), tokenizer_2=clip_tokenizers[1],
            text_encoder_3=T5EncoderModel(T5Config(
                vocab_size=len(t5_tokenizer), d_model=48, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
            tokenizer_3=t5_tokenizer,
        )
        pipe.save_pretrained(path)
        return path


# --------------------------------------------------------------------------- helpers


def _one_frame(frames: int) -> None:
    if frames != 1:
        raise UserError(f"the sd3 family is image-only: one frame per sample, got {frames} (use images, and "
                        "validation_num_video_frames: 1)")


def _bare(network: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper: the one with ``config``."""
    while not hasattr(network, "config"):
        inner = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        network = inner
    return network


def _clip_embeds(tokenizer, encoder, texts: list[str], length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP encoder's penultimate hidden states ``(B, length, width)`` and its projected pooled output ``(B, P)``
    (``StableDiffusion3Pipeline._get_clip_prompt_embeds`` without clip skip)."""
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def _load(cls: Any, path: str, subfolder: str, dtype: torch.dtype | None) -> Any:
    return load_part(cls, path, subfolder, dtype, "StableDiffusion3Pipeline")


# The tiny tokenizers' character set: printable ASCII without the space (CLIP's pre-tokenizer drops whitespace).
_CHARS = [c for c in string.printable if not c.isspace()]
_T5_WORDS = ("a", "an", "the", "of", "on", "in", "at", "photo", "cat", "dog", "digit", "red", "green", "blue",
             "black", "background", "city", "night", "room", "empty", "world", "hello")


def _tiny_clip_tokenizer():
    """A CLIP tokenizer (byte-level BPE, no merges: one token per character, ``</w>`` marking a word's last one)
    with bos = 0, eos = pad = 1 and CLIP's 77-token length; saved and reloaded as ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARS:  # printable ASCII maps to itself under the byte-level alphabet
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_t5_tokenizer():
    """A T5 Unigram tokenizer (pad = 0, eos = 1, unk = 2, eos appended, no sentinel tokens) over a fixed vocabulary
    of a few whole words and every printable character; saved and reloaded as ``T5Tokenizer``."""
    from transformers import T5Tokenizer

    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -8.0}
    scores.update({f"▁{word}": -5.0 for word in _T5_WORDS})
    for char in _CHARS:
        scores.setdefault(f"▁{char}", -9.0)
        scores.setdefault(char, -10.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=512)


@hookimpl
def register_model_families(register):
    register(SD3Family)
