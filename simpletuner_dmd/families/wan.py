"""The Wan 2.1 text-to-video family over diffusers' ``WanTransformer3DModel`` — a plugin like any third-party one.

Latents are ``(B, C, F, H, W)``; σ is ``t / 1000`` by value; the network predicts the flow ``ε − x0``; text conditions
are UMT5 embeddings ``(B, L, D)`` padded with zeros past each prompt (as ``WanPipeline`` does). The network is
bidirectional (every frame attends to every frame), so the block-causal self-forcing rollout does not apply.

diffusers, transformers and optimum-quanto are imported inside the methods that need them, so listing plugins stays
cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..family_base import FamilyBase
from ..hookspecs import hookimpl
from .common import autocast, euler_sampler, load_part, lora_metadata, peft_scale
from .wan_tiny import make_tiny_wan


@dataclass
class WanComponents:
    """What a host loads besides the network: the VAE and the text encoder (both frozen)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any


# Wan 2.1's published transformer configs (diffusers' WanTransformer3DModel), by hub id: `estimate` reads them
# without a download, and the cost benchmarks build random-weight networks from them.
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN21_14B = {**WAN21_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
PUBLISHED_CONFIGS = {"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": WAN21_1_3B, "Wan-AI/Wan2.1-T2V-14B-Diffusers": WAN21_14B}


_ORIGINAL_PARTS = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v",
                   "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img", "ffn.net.0.proj": "ffn.0",
                   "ffn.net.2": "ffn.2"}


def _original_name(module: str) -> str | None:
    """``blocks.3.attn1.to_out.0`` → ``blocks.3.self_attn.o``; ``blocks.3.ffn.net.0.proj`` → ``blocks.3.ffn.0``."""
    import re

    m = re.fullmatch(r"blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)", module)
    if m:
        return f"blocks.{m[1]}.{_ORIGINAL_PARTS[m[2]]}.{_ORIGINAL_PARTS[m[3]]}"
    m = re.fullmatch(r"blocks\.(\d+)\.(ffn\.net\.0\.proj|ffn\.net\.2)", module)
    if m:
        return f"blocks.{m[1]}.{_ORIGINAL_PARTS[m[2]]}"
    return None


class WanFamily(FamilyBase):
    name = "wan"
    summary = "Wan 2.1 T2V (diffusers WanTransformer3DModel), bidirectional, flow matching"
    causal = False
    pipeline_class = "WanPipeline"  # the stock diffusers pipeline that loads the student (model cards name it)
    published_configs = PUBLISHED_CONFIGS  # hub id → transformer config, for `simpletuner-dmd estimate`
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    frame_stride = 4  # the VAE compresses time 4x: clips of 1 + 4k frames become 1 + k latent frames
    size_multiple = 16  # the VAE downsamples 8x and the transformer patches 2x2 latents
    context_parallel = True  # WanTransformer3DModel ships a _cp_plan (tests/test_context_parallel.py runs DMD split)
    max_sequence_length = 512

    def __init__(self, *, autocast_dtype: torch.dtype | None = None):
        # Each network call gets its own autocast region: one region around a no_grad and a grad call of the same
        # module can drop gradients (autocast's weight cache), so no outer region is ever held.
        self.autocast_dtype = autocast_dtype

    # ----------------------------------------------------------------------- what methods use

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
                     ) -> torch.Tensor:
        if timesteps.ndim != 1 or timesteps.shape[0] != x_t.shape[0]:
            raise ValueError(f"one timestep per sample expected, got {tuple(timesteps.shape)} for {tuple(x_t.shape)}")
        with self._autocast(x_t.device):
            out = network(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond, return_dict=False)[0]
        return out

    def _autocast(self, device: torch.device):
        return autocast(self.autocast_dtype, device)

    def frame_axis(self) -> int:
        return 2

    def gan_feature_module(self, network: torch.nn.Module) -> tuple[torch.nn.Module, int]:
        """The last transformer block: its output ``(B, tokens, heads·head_dim)`` feeds DMD2's GAN classifier."""
        return network.blocks[-1], network.config.num_attention_heads * network.config.attention_head_dim

    def concat_conditions(self, conds: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conds, dim=0)

    def repeat_condition(self, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        return cond.expand(batch_size, *cond.shape[1:])

    @staticmethod
    def make_tiny(path: str | Path, *, seed: int = 0) -> Path:
        """A tiny random-weight ``WanPipeline`` built from config and saved to ``path`` (offline)."""
        return make_tiny_wan(path, seed=seed)

    # ----------------------------------------------------------------------- what hosts that load models use

    def load_network(self, model_path: str, *, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return _load(WanTransformer3DModel, model_path, "transformer", dtype)

    def load_components(self, model_path: str, *, text_encoder_path: str | None, dtype: torch.dtype
                        ) -> WanComponents:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        te_path = text_encoder_path or model_path
        vae = _load(AutoencoderKLWan, model_path, "vae", torch.float32)  # the VAE stays fp32 (as WanPipeline)
        text_encoder = _load(UMT5EncoderModel, te_path, "text_encoder", dtype)
        tokenizer = _load(AutoTokenizer, te_path, "tokenizer", None)
        for module in (vae, text_encoder):
            module.requires_grad_(False).eval()
        return WanComponents(vae, text_encoder, tokenizer)

    @torch.no_grad()
    def encode_prompts(self, components: WanComponents, texts: list[str], *, max_length: int | None = None
                       ) -> torch.Tensor:
        """UMT5 embeddings ``(B, max_length, D)`` (default length: 512, as ``WanPipeline``), zeros past each prompt."""
        tok = components.tokenizer(
            [t.strip() for t in texts], padding="max_length", max_length=max_length or self.max_sequence_length,
            truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = next(components.text_encoder.parameters()).device
        mask = tok.attention_mask.to(device)
        hidden = components.text_encoder(tok.input_ids.to(device), mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).float()  # zeros past each prompt, like WanPipeline

    def _latent_stats(self, vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape).to(like.device)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_pixels(self, components: WanComponents, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1] → normalised latents ``(B, z, 1 + (F − 1)/4, H/8, W/8)``."""
        vae = components.vae
        pixels = pixels.to(next(vae.parameters()).device, torch.float32)
        latents = vae.encode(pixels).latent_dist.mode()
        mean, std = self._latent_stats(vae, latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, components: WanComponents, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → pixels ``(B, 3, F, H, W)`` in [0, 1]."""
        vae = components.vae
        latents = latents.to(next(vae.parameters()).device, torch.float32)
        mean, std = self._latent_stats(vae, latents)
        video = vae.decode(latents * std + mean, return_dict=False)[0]
        return ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def latent_shape(self, components: WanComponents, *, width: int, height: int, frames: int) -> tuple[int, ...]:
        cfg = components.vae.config  # Wan 2.1's VAE: 8x spatial, 4x temporal; Wan 2.2's: 16x, 4x, 48 channels
        spatial, temporal = cfg.scale_factor_spatial, cfg.scale_factor_temporal
        return (cfg.z_dim, 1 + (frames - 1) // temporal, height // spatial, width // spatial)

    @staticmethod
    def meta_network(transformer_config: dict) -> torch.nn.Module:
        """The network built on the ``meta`` device from its config: its parameters counted, nothing allocated."""
        from diffusers import WanTransformer3DModel

        import inspect

        known = set(inspect.signature(WanTransformer3DModel.__init__).parameters)
        with torch.device("meta"):
            return WanTransformer3DModel(**{k: v for k, v in transformer_config.items() if k in known})

    vae_spatial = 8  # the VAE's spatial compression (Wan 2.1's VAE: 8x), for `estimate`'s token count

    @classmethod
    def activation_shape(cls, transformer_config: dict, *, width: int, height: int, frames: int) -> dict[str, int]:
        """What one sample's activations scale with: ``tokens`` (latent frames 1 + (F − 1)/4, the VAE's spatial
        compression ``vae_spatial``, then the patch), the ``hidden`` width, the feed-forward width ``ffn`` and the
        ``blocks``."""
        p_t, p_h, p_w = transformer_config.get("patch_size", (1, 2, 2))
        latent_frames = 1 + (frames - 1) // 4
        f = cls.vae_spatial
        tokens = (latent_frames // p_t) * (height // f // p_h) * (width // f // p_w)
        hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
        return {"tokens": tokens, "hidden": hidden, "ffn": transformer_config["ffn_dim"],
                "blocks": transformer_config["num_layers"]}

    def save_lora(self, lora_state: dict[str, torch.Tensor], folder: Path, peft_config: Any) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``WanPipeline.load_lora_weights(folder)`` loads (rank and
        alpha travel in its metadata)."""
        from diffusers import WanPipeline

        WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=lora_state,
                                      transformer_lora_adapter_metadata=lora_metadata(peft_config))
        return Path(folder) / "pytorch_lora_weights.safetensors"

    def original_lora_state(self, lora_state: dict[str, torch.Tensor], peft_config: Any) -> dict[str, torch.Tensor]:
        """The adapter in the original Wan layout that ComfyUI and most published Wan LoRAs use:
        ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (a scalar, so
        that ``alpha / rank`` is peft's scale). diffusers converts it on load (``_convert_non_diffusers_wan_lora_to_
        diffusers``). A module with no original name (outside the blocks' attention and feed-forward layers) raises
        ``ValueError`` naming it."""
        scale = peft_scale(peft_config)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in lora_state.items():
            module, sep, tail = key.partition(".lora_A.") if ".lora_A." in key else key.partition(".lora_B.")
            if not sep or tail != "weight":
                raise ValueError(f"{key}: not a LoRA A/B weight; the original Wan layout has no name for it")
            original = _original_name(module)
            if original is None:
                raise ValueError(f"{module}: no original Wan name for this module (the original layout covers the "
                                 "blocks' attention and feed-forward layers)")
            if ".lora_A." in key:
                out[f"diffusion_model.{original}.lora_down.weight"] = tensor
                out[f"diffusion_model.{original}.alpha"] = torch.tensor(scale * tensor.shape[0], dtype=torch.float32)
            else:
                out[f"diffusion_model.{original}.lora_up.weight"] = tensor
        return out

    def euler_sampler(self, network: torch.nn.Module, *, steps: int, shift: float):
        """The host's default sampler (the teacher's): Euler on the flow ODE over ``steps`` shifted σs, standard CFG."""
        return euler_sampler(self, network, steps=steps, shift=shift)


def _load(cls: Any, path: str, subfolder: str, dtype: torch.dtype | None) -> Any:
    return load_part(cls, path, subfolder, dtype, "Wan pipeline")


@hookimpl
def register_model_families(register):
    register(WanFamily)
