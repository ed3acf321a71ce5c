"""Tiny random-weight pipelines of SimpleTuner's flow-matching families, built offline, for tests of the bridge.

Each builder draws every weight from a seeded RNG, makes its tokenizers in memory (nothing is downloaded) and saves a
whole diffusers pipeline folder (``model_index.json`` and one subfolder per component) that SimpleTuner 4.10.1 loads
with ``pretrained_model_name_or_path`` set to it. Run them with the SimpleTuner venv's python, so the folder is written
by the diffusers/transformers that will read it. ``TINY_BUILDERS`` maps a name to its builder; the docstrings name the
SimpleTuner keys to use. The tiny Wan text-to-video pipeline is ``families/wan_tiny.py``'s ``make_tiny_wan``.

Tokenizers that load offline (the sizes recorded in ``shared/notes/simpletuner-host.md``): CLIP with one token per
character and no merges, T5 as a Unigram over a few words plus every character (both from ``families/sd3.py``), and
Qwen2 with the 256 byte-level symbols, no merges, plus its special and vision tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from simpletuner_dmd.families.wan_tiny import make_tiny_wan_i2v  # the wan-i2v family's tiny build too

# Qwen2's special tokens, after the 256 byte-level symbols (ids 256...): chat markers first, then the vision ones.
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_VOCAB = 320  # 256 bytes + the specials, rounded up: every id is an embedding row


def make_tiny_flux(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny FLUX.1-dev ``FluxPipeline`` saved to ``path``; returns ``path``.

    The parts: ``FluxTransformer2DModel`` with one double and one single block (2 heads x 16, rope axes (4, 6, 6)),
    ``guidance_embeds=True`` as dev has, joint attention width 32 and pooled width 16; an ``AutoencoderKL`` with 16
    latent channels, 8x downsampling and FLUX's ``scaling_factor`` 0.3611 / ``shift_factor`` 0.1159; a CLIP text
    encoder of width 16 (its pooled output) and a T5 encoder of width 32; FLUX-dev's dynamically shifted
    ``FlowMatchEulerDiscreteScheduler``. A 64 px image has 8x8 latents, packed to 16 tokens of 64 channels.

    SimpleTuner: ``model_family: flux``, ``model_flavour: dev``; the guidance the transformer is given comes from the
    config, not the batch: ``flux_guidance_mode`` (default ``constant``) with ``flux_guidance_value`` (default 1.0),
    or ``random-range`` between ``flux_guidance_min`` and ``flux_guidance_max``.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from simpletuner_dmd.families.sd3 import _tiny_clip_tokenizer, _tiny_t5_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096),
        vae=_tiny_autoencoder_kl(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
            eos_token_id=1, pad_token_id=1)),
        tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_t5_encoder(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return path


def make_tiny_qwen_image(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny Qwen-Image ``QwenImagePipeline`` saved to ``path``; returns ``path``.

    The parts: ``QwenImageTransformer2DModel`` with 2 blocks (2 heads x 16, patch 2, rope axes (8, 4, 4), joint
    attention width 32); ``AutoencoderKLQwenImage(base_dim=8, z_dim=16)`` (8x spatial compression, one frame); a
    ``Qwen2_5_VLForConditionalGeneration`` text model of width 32 with 2 layers, a 320-entry vocabulary and a one-block
    vision tower; a Qwen2 tokenizer of the 256 byte-level symbols (one token per byte, no merges) and the special and
    vision tokens. A 64 px image has 8x8 latents, packed to 16 tokens of 64 channels.

    SimpleTuner: ``model_family: qwen_image``, ``model_flavour: v1.0`` (the default ``v2.1`` switches to a Qwen3-VL
    encoder and fetches a VAE from the hub).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_qwen2_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _QWEN_VOCAB, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            # multimodal rope: the sections split head_dim / 2 = 8 rotary frequencies over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                       "fullatt_block_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    pipe = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(8, 4, 4)),
        # Qwen-Image's released scheduler: shifted by the image's token count, exponential time shift
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, time_shift_type="exponential", shift_terminal=0.02),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(path)
    return path


def make_tiny_ltxvideo(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny LTX-Video 0.9.0 ``LTXPipeline`` saved to ``path``; returns ``path``.

    The parts: ``LTXVideoTransformer3DModel`` with one block (2 heads x 8, 128 latent channels in and out, caption
    width 32); ``AutoencoderKLLTXVideo`` with 128 latent channels, widths 8 and patch 4: 32x spatial and 8x temporal
    compression (the first frame on its own), so a 64 px image has 2x2 latents of one frame and a 9-frame clip two
    latent frames; a T5 encoder of width 32; LTX-Video's dynamically shifted ``FlowMatchEulerDiscreteScheduler``.

    SimpleTuner: ``model_family: ltxvideo``, ``model_flavour: 0.9.0``. SimpleTuner 4.10.1 builds the pipeline it
    caches text embeds with without a scheduler, which ``LTXPipeline`` requires: the tests' ``cpu_shims`` give it one.
    """
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    from simpletuner_dmd.families.sd3 import _tiny_t5_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    t5_tokenizer = _tiny_t5_tokenizer()
    pipe = LTXPipeline(
        transformer=LTXVideoTransformer3DModel(
            in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
            num_layers=1, caption_channels=32),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
            max_image_seq_len=4096),
        vae=AutoencoderKLLTXVideo(
            latent_channels=128, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=4,
            patch_size_t=1),
        text_encoder=_tiny_t5_encoder(len(t5_tokenizer)),
        tokenizer=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return path


TINY_BUILDERS = {
    "flux": make_tiny_flux,
    "qwen_image": make_tiny_qwen_image,
    "ltxvideo": make_tiny_ltxvideo,
    "wan-i2v": make_tiny_wan_i2v,
}


# --------------------------------------------------------------------------- shared parts


def _tiny_autoencoder_kl(**config):
    """An ``AutoencoderKL`` with 16 latent channels, widths 8 and 8x downsampling (four blocks)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        **config)


def _tiny_t5_encoder(vocab_size: int):
    """A 2-layer T5 encoder of width 32 (pad = 0, eos = 1, as the tiny T5 tokenizer has them)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _tiny_qwen2_tokenizer():
    """Qwen2's byte-level BPE with no merges: one token per byte (the 256 byte-level symbols, ids 0-255), then the
    special and vision tokens; saved and reloaded as ``Qwen2Tokenizer``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL)})
    return tokenizer
