"""The ``wan2.2-ti2v`` family (Wan 2.2 TI2V-5B as text-to-video): the 48-channel 16x VAE's latent layout and
normalisation, per-token timesteps as ``WanPipeline(expand_timesteps=True)`` passes them, and the family end to end
through the reference host with the stock pipeline reproducing the student's validation sample."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_dmd.families.wan_ti2v import WanTI2VFamily
from simpletuner_dmd.hosts.reference import trainer as T
from tests.tiny_methods import stock_student_latents


@pytest.fixture(scope="module")
def tiny_ti2v(tmp_path_factory):
    return WanTI2VFamily.make_tiny(tmp_path_factory.mktemp("tiny-ti2v") / "tiny-wan22-ti2v")


def test_latent_layout_and_per_token_timesteps(tiny_ti2v):
    family = WanTI2VFamily()
    components = family.load_components(str(tiny_ti2v), text_encoder_path=None, dtype=torch.float32)
    assert family.latent_shape(components, width=64, height=32, frames=9) == (48, 3, 2, 4)
    pixels = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    latents = family.encode_pixels(components, pixels)
    assert latents.shape == (1, 48, 2, 4, 4)
    assert family.decode_latents(components, latents).shape == (1, 3, 5, 64, 64)

    network = family.load_network(str(tiny_ti2v), dtype=torch.float32)
    seen = []
    network.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x, cond = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 8, 32)
    family.predict_flow(network, x, torch.tensor([700.0, 300.0]), cond)
    assert seen[0].shape == (2, 2 * 2 * 2)  # F · H/2 · W/2 tokens, each sample's timestep on every one
    assert torch.equal(seen[0], torch.tensor([[700.0] * 8, [300.0] * 8]))


@pytest.mark.slow
def test_ti2v_trains_resumes_exports_and_the_stock_pipeline_reproduces_it(job, tiny_ti2v, capsys):
    from diffusers import WanPipeline


    common = dict(model_family="wan2.2-ti2v", pretrained_model_name_or_path=str(tiny_ti2v),
                  pretrained_t5_model_name_or_path=str(tiny_ti2v), checkpoint_step_interval=1,
                  validation_step_interval=0, base_model_precision="no_change", mixed_precision="no",
                  optimizer="adamw", use_ema=False, ema_validation="none", validation_guidance=1.0, validation_seed=7,
                  learning_rate=1e-2, lr_warmup_steps=0, validation_resolution="64x32")
    T.train(job(max_train_steps=1, **common))
    out = T.train(job(max_train_steps=2, **common))
    assert "resumed from" in capsys.readouterr().out
    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert info["family"] == "wan2.2-ti2v" and (out / info["original_lora"]).is_file()

    expected = load_file(str(out / "validation" / "step-2" / "validation" / "student" / "latents.safetensors"))
    assert expected["latents"].shape[1:] == (48, 2, 2, 4)
    pipe = WanPipeline.from_pretrained(str(tiny_ti2v))
    assert pipe.config.expand_timesteps
    pipe.load_lora_weights(str(out))
    latents = stock_student_latents(pipe, out, info["validation_prompt"], 7, width=64, height=32, num_frames=5)
    torch.testing.assert_close(latents, expected["latents"], rtol=1e-4, atol=1e-4)
