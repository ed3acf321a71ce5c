"""The tiny offline Wan pipeline and dataset: they reload, run, and the VAE compresses as documented."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner_dmd.families.wan_tiny import make_tiny_wan


def test_pipeline_reloads_and_runs_offline(tiny_wan):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan, local_files_only=True)
    out = pipe(
        prompt="a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        num_frames=5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, 5, 64, 64, 3)
    assert np.isfinite(out.frames).all()
    assert pipe.scheduler.config.shift == 5.0


def test_tokenizer_reloads_with_autotokenizer(tiny_wan):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_wan / "tokenizer", local_files_only=True)
    ids = tokenizer("a red digit 3 moving left").input_ids
    assert ids[-1] == tokenizer.eos_token_id  # T5-style: eos appended, which the pipeline relies on
    assert tokenizer.pad_token_id == 0
    assert len(tokenizer) <= 256 and max(ids) < 256  # every id is a row of the text encoder's embedding


@pytest.mark.parametrize("frames, latent_frames", [(1, 1), (5, 2), (9, 3)])
def test_vae_compresses_8x_in_space_and_4x_in_time(tiny_wan, frames, latent_frames):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_wan / "vae", local_files_only=True)
    pixels = torch.rand(1, 3, frames, 64, 48) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, latent_frames, 8, 6)
    assert decoded.shape == pixels.shape


def test_same_seed_gives_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_wan(tmp_path / "a", seed=3)
    b = make_tiny_wan(tmp_path / "b", seed=3)
    wa = load_file(a / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "transformer" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer" / "tokenizer.json").read_text() == (b / "tokenizer" / "tokenizer.json").read_text()


def test_tiny_dataset_holds_captioned_images_and_gifs(tiny_dataset):
    import imageio.v3 as iio

    pngs, gifs = sorted(tiny_dataset.glob("*.png")), sorted(tiny_dataset.glob("*.gif"))
    assert len(pngs) == 6 and len(gifs) == 4
    for png in pngs:
        assert Image.open(png).size == (64, 64)
        assert re.fullmatch(r"an? \w+ digit \d on a black background", png.with_suffix(".txt").read_text().strip())
    for gif in gifs:
        frames = iio.imread(gif, index=None)
        assert frames.shape[:3] == (9, 64, 64)
        assert not np.array_equal(frames[0], frames[-1])  # the digit moves
        caption = gif.with_suffix(".txt").read_text().strip()
        assert re.fullmatch(r"an? \w+ digit \d moving (left|right|up|down)", caption)
