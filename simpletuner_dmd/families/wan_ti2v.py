"""The ``wan2.2-ti2v`` family: Wan 2.2 TI2V-5B as a text-to-video model.

What differs from Wan 2.1 (the ``wan`` family), each as diffusers' ``WanPipeline`` does it for this model:

- **The Wan 2.2 VAE**: 48 latent channels, 16× spatial compression (a 2×2 patchify inside the VAE on top of its
  8×), 4× temporal; latents normalised with its own 48 ``latents_mean`` / ``latents_std`` (the same formula as
  Wan 2.1's, read from the VAE's config). A pixel side is a multiple of 32 (the VAE's 16 × the transformer's patch 2).
- **Per-token timesteps** (the pipeline's ``expand_timesteps``): the transformer gets a timestep for every token,
  ``(B, F · H/2 · W/2)`` — the sample's timestep on every token for text-to-video (image-to-video would hold the
  first frame's tokens at 0; that conditioning is not built here).

The student and the fake score are LoRAs on the one transformer, as with ``wan``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..hookspecs import hookimpl
from .wan import WAN21_1_3B, WanFamily
from .wan_tiny import make_tiny_wan

# Wan 2.2 TI2V-5B's transformer (diffusers' WanTransformer3DModel config): 3072 wide (24 heads × 128), 30 layers.
WAN22_TI2V_5B = {**WAN21_1_3B, "num_attention_heads": 24, "in_channels": 48, "out_channels": 48, "ffn_dim": 14336}
PUBLISHED_CONFIGS = {"Wan-AI/Wan2.2-TI2V-5B-Diffusers": WAN22_TI2V_5B}


def token_timesteps(timesteps: torch.Tensor, x_t: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B,)`` → ``(B, tokens)``: each sample's timestep on every token of its ``(F/p_t) · (H/p_h) · (W/p_w)`` grid
    (``WanPipeline`` with ``expand_timesteps``, text-to-video: its mask is all ones)."""
    p_t, p_h, p_w = patch
    _, _, f, h, w = x_t.shape
    tokens = (f // p_t) * (h // p_h) * (w // p_w)
    return timesteps.reshape(-1, 1).expand(-1, tokens)


class WanTI2VFamily(WanFamily):
    name = "wan2.2-ti2v"
    summary = "Wan 2.2 TI2V-5B as text-to-video: the 48-channel 16x VAE, per-token timesteps"
    causal = False
    context_parallel = True  # Wan's _cp_plan (tests/test_context_parallel.py: its network call split = unsplit)
    size_multiple = 32  # the VAE's 16x and the transformer's 2x2 patch
    vae_spatial = 16
    published_configs = PUBLISHED_CONFIGS
    # SimpleTuner serves TI2V-5B as a flavour of its ``wan`` family (per-token timesteps, the Wan 2.2 VAE); its
    # batch (latents (B, 48, F, h, w), UMT5 ``encoder_hidden_states``) and text encoding are Wan's.
    simpletuner_names = (("wan", "ti2v-5b-2.2"),)

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
                     ) -> torch.Tensor:
        if timesteps.ndim != 1 or timesteps.shape[0] != x_t.shape[0]:
            raise ValueError(f"one timestep per sample expected, got {tuple(timesteps.shape)} for {tuple(x_t.shape)}")
        bare = getattr(network, "module", network)
        per_token = token_timesteps(timesteps, x_t, tuple(bare.config.patch_size))
        with self._autocast(x_t.device):
            return network(hidden_states=x_t, timestep=per_token, encoder_hidden_states=cond, return_dict=False)[0]

    @staticmethod
    def make_tiny(path: str | Path, *, seed: int = 0) -> Path:
        """A tiny TI2V ``WanPipeline``: the tiny Wan parts with a 48-channel residual VAE (16x) and
        ``expand_timesteps``, saved to ``path``."""
        vae = dict(z_dim=48, is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        return make_tiny_wan(path, seed=seed, transformer={"in_channels": 48, "out_channels": 48}, vae=vae,
                             expand_timesteps=True)


@hookimpl
def register_model_families(register):
    register(WanTI2VFamily)
