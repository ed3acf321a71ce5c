"""The ``wan-i2v`` family: Wan 2.1 image-to-video (``WanImageToVideoPipeline``), on the reference host.

What differs from Wan 2.1 text-to-video (the ``wan`` family), each as diffusers' ``WanImageToVideoPipeline`` builds it:

- **The condition** is a ``WanI2VCondition`` per batch: the caption's UMT5 embedding ``text`` ``(B, L, D)``; the
  first frame's CLIP image embedding ``image`` ``(B, N, d)`` (the penultimate hidden state of the pipeline's
  ``image_encoder``, on the ``image_processor``'s crop of the frame: ``encode_image``); and ``frames``
  ``(B, 4 + 16, F, h, w)``, the pipeline's ``condition``: the first-frame mask (4 channels, ones on latent frame 0,
  zeros after) and the normalised latents of the clip's first frame followed by black (zero) frames, the whole clip
  length through the VAE (``prepare_latents``: the VAE is causal, so the latents after frame 0 depend on the first
  frame too, and latent frame 0 is the clip's own first latent frame).
- **Every network call** gets ``hidden_states = cat(x_t, frames)`` (16 + 20 = 36 channels), ``encoder_hidden_states
  = text`` and ``encoder_hidden_states_image = image``; the output is the 16-channel flow.
- **Classifier-free guidance keeps the image**: the unconditional half is the negative prompt's text with the same
  image and first frame (the pipeline's ``noise_uncond``). The negative prompt is encoded as text alone
  (``encode_prompts``, a ``(1, L, D)`` tensor), and ``concat_conditions`` gives such a text-only condition the image
  part of the first full condition of the list with the same batch size: the ``[cond, uncond]`` pair of every guided
  batch (``networks.guided_batch``). A network call on text alone is an error naming what is missing.

How the reference host hands the family the clip's first frame (the first frame belongs to the clip, not to its
caption, so it cannot ride in the per-caption text cache): the family's ``clip_condition(components, pixels)``
(``FamilyBase``) computes ``{"image_embeds", "image_latents"}`` from each clip's pixels when the host caches its
latents, the host stores them beside the latents, stacks them per batch and builds ``Batch.cond`` with
``attach_clip_condition(text, clip)``; it keeps the text and the clip part in ``Batch.extras`` (``text_cond``,
``clip_condition``) so caption dropout swaps the text rows alone. Validation samples are conditioned on the host's
``validation_image`` (resized to ``validation_resolution``), which this family requires.

Teacher ODE pairs of the negative/validation prompt alone (``pair_source``) have no first frame and are refused. The
family serves no SimpleTuner name: SimpleTuner's ``wan`` ``i2v-14b-2.1`` goes through the bridge's generic route.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..hookspecs import hookimpl
from .wan import WAN21_14B, WanComponents, WanFamily, _load
from .wan_tiny import make_tiny_wan_i2v

# Wan 2.1 I2V-14B's transformer (diffusers' WanTransformer3DModel config): the 14B T2V one with 36 input channels and
# the CLIP image embedding (ViT-H/14, 1280 wide) through added key/value projections.
WAN21_I2V_14B = {**WAN21_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
PUBLISHED_CONFIGS = {"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": WAN21_I2V_14B,
                     "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": WAN21_I2V_14B}

MASK_CHANNELS = 4  # the pipeline's first-frame mask: the VAE's temporal factor of channels


@dataclass
class WanI2VComponents(WanComponents):
    """Wan's VAE and text encoder, and the CLIP image encoder with its processor."""

    image_encoder: Any = None
    image_processor: Any = None


@dataclass
class WanI2VCondition:
    """One batch's condition: ``text`` (B, L, D), ``image`` (B, N, d) and ``frames`` (B, 20, F, h, w): the mask and
    the first-frame latents, the 20 channels concatenated to the 16 noisy ones."""

    text: torch.Tensor
    image: torch.Tensor
    frames: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def to(self, device: Any) -> WanI2VCondition:
        return WanI2VCondition(self.text.to(device), self.image.to(device), self.frames.to(device))


def first_frame_mask(latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's mask for image latents ``(B, C, F, h, w)``: ``(B, 4, F, h, w)``, ones on latent frame 0 (the
    given first frame's four temporal slots), zeros after."""
    b, _, f, h, w = latents.shape
    mask = torch.zeros(b, MASK_CHANNELS, f, h, w, dtype=latents.dtype, device=latents.device)
    mask[:, :, 0] = 1.0
    return mask


class WanI2VFamily(WanFamily):
    name = "wan-i2v"
    summary = "Wan 2.1 I2V (WanImageToVideoPipeline): the first frame's latents and CLIP embedding as the condition"
    causal = False
    context_parallel = True  # Wan's _cp_plan (tests/test_context_parallel.py: its network call split = unsplit)
    pipeline_class = "WanImageToVideoPipeline"
    published_configs = PUBLISHED_CONFIGS

    # ----------------------------------------------------------------------- the condition

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Any
                     ) -> torch.Tensor:
        if timesteps.ndim != 1 or timesteps.shape[0] != x_t.shape[0]:
            raise ValueError(f"one timestep per sample expected, got {tuple(timesteps.shape)} for {tuple(x_t.shape)}")
        if not isinstance(cond, WanI2VCondition):
            raise UserError("wan-i2v: a network call on a text condition alone (no first frame): this family needs "
                            "the clip's first frame, which the reference host's batches and validation_image give; "
                            "a prompt without a clip (teacher ODE pairs of a prompt) cannot be sampled")
        if cond.frames.shape[2:] != x_t.shape[2:] or cond.batch_size != x_t.shape[0]:
            raise ValueError(f"wan-i2v: first-frame condition {tuple(cond.frames.shape)} does not fit latents "
                             f"{tuple(x_t.shape)}")
        hidden = torch.cat([x_t, cond.frames.to(x_t.dtype)], dim=1)  # as the pipeline: noisy 16 + mask 4 + image 16
        with self._autocast(x_t.device):
            return network(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=cond.text,
                           encoder_hidden_states_image=cond.image, return_dict=False)[0]

    def concat_conditions(self, conds: list[Any]) -> Any:
        full = [c for c in conds if isinstance(c, WanI2VCondition)]
        if not full:
            return torch.cat(conds, dim=0)

        def completed(c: Any) -> WanI2VCondition:
            if isinstance(c, WanI2VCondition):
                return c
            # text alone (the negative prompt): negative text, same image, as the pipeline's unconditional half
            source = next((f for f in full if f.batch_size == c.shape[0]), None)
            if source is None:
                raise ValueError(f"wan-i2v: a text-only condition of batch {c.shape[0]} has no full condition of "
                                 "that batch to take its first frame from")
            return WanI2VCondition(c, source.image, source.frames)

        parts = [completed(c) for c in conds]
        return WanI2VCondition(torch.cat([p.text for p in parts]), torch.cat([p.image for p in parts]),
                               torch.cat([p.frames for p in parts]))

    def repeat_condition(self, cond: Any, batch_size: int) -> Any:
        if isinstance(cond, WanI2VCondition):
            return WanI2VCondition(*(t.expand(batch_size, *t.shape[1:]) for t in (cond.text, cond.image, cond.frames)))
        return cond.expand(batch_size, *cond.shape[1:])

    @staticmethod
    def attach_clip_condition(text: torch.Tensor, clip: dict[str, torch.Tensor]) -> WanI2VCondition:
        """The batch's condition from its text ``(B, L, D)`` and ``clip_condition``'s tensors (stacked per batch)."""
        latents = clip["image_latents"]
        frames = torch.cat([first_frame_mask(latents), latents], dim=1)
        return WanI2VCondition(text, clip["image_embeds"].to(text.device), frames.to(text.device))

    @torch.no_grad()
    def clip_condition(self, components: WanI2VComponents, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """From clips ``(B, 3, F, H, W)`` in [-1, 1] (their first frame and length are read): ``image_embeds``
        ``(B, N, d)``, the CLIP image encoder's penultimate hidden state on the first frame (the pipeline's
        ``encode_image``; the frame handed to the processor as 8-bit RGB, as a user's image is), and
        ``image_latents`` ``(B, 16, F', h, w)``: the first frame then ``F − 1`` zero frames through the VAE, normalised
        as the pipeline's ``prepare_latents`` does."""
        vae, encoder = components.vae, components.image_encoder
        device = next(vae.parameters()).device
        encoder.to(device)  # the host moves the VAE and text encoder to its device; the image encoder follows the VAE
        first = pixels[:, :, 0].float()
        rgb = ((first + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        inputs = components.image_processor(images=[np.asarray(x) for x in rgb], return_tensors="pt").to(device)
        embeds = encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()

        video = torch.zeros_like(pixels, dtype=torch.float32, device=device)
        video[:, :, 0] = first.to(device)
        raw = vae.encode(video).latent_dist.mode()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(raw.device, raw.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(raw.device, raw.dtype)
        return {"image_embeds": embeds, "image_latents": ((raw - mean) * inv_std).float()}

    @staticmethod
    def config_problems(host: dict) -> list[str]:
        if host.get("validation_disable") or host.get("validation_image"):
            return []
        return [("config.validation_image: the wan-i2v family samples every validation prompt from a first frame; "
                 "give an image file (or validation_disable: true)")]

    @staticmethod
    def make_tiny(path: str | Path, *, seed: int = 0) -> Path:
        """A tiny ``WanImageToVideoPipeline`` (``wan_tiny.make_tiny_wan_i2v``) saved to ``path``."""
        return make_tiny_wan_i2v(path, seed=seed)

    # ----------------------------------------------------------------------- loading

    def load_components(self, model_path: str, *, text_encoder_path: str | None, dtype: torch.dtype
                        ) -> WanI2VComponents:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        base = super().load_components(model_path, text_encoder_path=text_encoder_path, dtype=dtype)
        encoder = _load(CLIPVisionModel, model_path, "image_encoder", torch.float32)  # fp32, as the pipeline's
        encoder.requires_grad_(False).eval()
        processor = _load(CLIPImageProcessor, model_path, "image_processor", None)
        return WanI2VComponents(base.vae, base.text_encoder, base.tokenizer, encoder, processor)


@hookimpl
def register_model_families(register):
    register(WanI2VFamily)
