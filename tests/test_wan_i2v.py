"""The ``wan-i2v`` family (Wan 2.1 image-to-video): its condition is what ``WanImageToVideoPipeline`` builds (the
first frame's CLIP embedding and mask + latents), the negative prompt keeps the image, and through the reference host
(``config_examples/tiny-wan-i2v``) every network call of a DMD run gets the clip's first frame, and the stock I2V
pipeline with the exported LoRA and scheduler reproduces the validation sample."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.families.wan_i2v import WanI2VCondition, WanI2VFamily
from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    return WanI2VFamily.make_tiny(tmp_path_factory.mktemp("tiny-i2v") / "tiny-wan-i2v")


@pytest.fixture(scope="module")
def parts(tiny_i2v):
    family = WanI2VFamily()
    components = family.load_components(str(tiny_i2v), text_encoder_path=None, dtype=torch.float32)
    return family, components, family.load_network(str(tiny_i2v), dtype=torch.float32)


def _uint8_frame(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def test_the_condition_is_the_pipelines_and_the_negative_prompt_keeps_the_image(tiny_i2v, parts):
    from diffusers import WanImageToVideoPipeline

    family, components, network = parts
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 3, 9, 64, 64, generator=g) * 255).round() / 127.5 - 1  # 8-bit values, as media are
    clip = family.clip_condition(components, pixels)
    latents = family.encode_pixels(components, pixels)
    assert clip["image_embeds"].shape == (2, 17, 16) and clip["image_latents"].shape == latents.shape == (2, 16, 3, 8, 8)
    # latent frame 0 of the condition is the clip's own first latent frame (the VAE is causal)
    torch.testing.assert_close(clip["image_latents"][:, :, 0], latents[:, :, 0], rtol=0, atol=1e-6)

    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny_i2v))
    image = _uint8_frame(pixels[1, :, 0])
    torch.testing.assert_close(clip["image_embeds"][1:], pipe.encode_image(image, "cpu"), rtol=0, atol=1e-6)
    processed = pipe.video_processor.preprocess(image, height=64, width=64).float()
    _, condition = pipe.prepare_latents(processed, 1, 16, 64, 64, 9, torch.float32, "cpu", None, None)
    text = family.encode_prompts(components, ["a red digit 3 moving left", "a cat"], max_length=16)
    cond = family.attach_clip_condition(text, clip)
    assert cond.frames.shape == (2, 20, 3, 8, 8)
    torch.testing.assert_close(cond.frames[1:], condition, rtol=0, atol=1e-6)

    # CFG's [cond, uncond]: the negative prompt (text alone) takes the same image and first frame
    negative = family.encode_prompts(components, ["blurry"], max_length=16)
    both = family.concat_conditions([cond, family.repeat_condition(negative, 2)])
    assert isinstance(both, WanI2VCondition) and both.batch_size == 4
    assert torch.equal(both.image[2:], cond.image) and torch.equal(both.frames[2:], cond.frames)
    assert torch.equal(both.text[2:], negative.expand(2, -1, -1))

    seen = []
    network.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
    flow = family.predict_flow(network, torch.randn(4, 16, 3, 8, 8), torch.full((4,), 700.0), both)
    assert flow.shape == (4, 16, 3, 8, 8)
    assert seen[0]["hidden_states"].shape[1] == 36 and seen[0]["encoder_hidden_states_image"].shape == (4, 17, 16)
    with pytest.raises(UserError, match="no first frame"):
        family.predict_flow(network, torch.randn(1, 16, 3, 8, 8), torch.tensor([700.0]), negative)


def test_make_tiny_builds_the_stock_pipelines_folder_and_a_config_needs_a_first_frame(tmp_path):
    from simpletuner_dmd.cli import main

    assert main(["make-tiny", "wan-i2v", str(tmp_path / "tiny")]) == 0
    assert {"image_encoder", "image_processor", "transformer", "vae"} <= {p.name for p in (tmp_path / "tiny").iterdir()}
    assert json.loads((tmp_path / "tiny" / "transformer" / "config.json").read_text())["in_channels"] == 36
    assert WanI2VFamily.config_problems({"validation_disable": False, "validation_image": None}) == [
        ("config.validation_image: the wan-i2v family samples every validation prompt from a first frame; give an "
         "image file (or validation_disable: true)")]
    assert WanI2VFamily.config_problems({"validation_disable": True}) == []


def _config(root, tiny_i2v, tiny_dataset, **overrides):
    """``config_examples/tiny-wan-i2v`` in ``root``: its clips (the tiny dataset's), caches and output there."""
    data = root / "data"
    shutil.copytree(tiny_dataset, data)
    backends = json.loads((REPO / "config_examples/tiny-wan-i2v/multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(data)
        b["cache_dir"] = str(root / "cache" / b["id"])
    (root / "backends.json").write_text(json.dumps(backends))
    config = json.loads((REPO / "config_examples/tiny-wan-i2v/config.json").read_text())
    assert config["model_family"] == "wan-i2v"
    # the validation sample continues the first frame of one of the clips
    Image.open(data / "video_000.gif").convert("RGB").save(root / "first_frame.png")
    config.update(pretrained_model_name_or_path=str(tiny_i2v), pretrained_t5_model_name_or_path=str(tiny_i2v),
                  data_backend_config=str(root / "backends.json"), output_dir=str(root / "out"), report_to="none",
                  validation_image=str(root / "first_frame.png"), **overrides)
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json", config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_i2v, tiny_dataset):
    """A 2-step DMD run (batches of 2 clips, the teacher's CFG at 3) with every call of the transformer recorded."""
    from simpletuner_dmd.hosts.reference.trainer import train

    root = tmp_path_factory.mktemp("i2v-run")
    path, config = _config(root, tiny_i2v, tiny_dataset, max_train_steps=2, train_batch_size=2,
                           checkpoint_step_interval=0, validation_step_interval=0, base_model_precision="no_change",
                           mixed_precision="no", optimizer="adamw", use_ema=False, ema_validation="none",
                           validation_guidance=1.0, validation_seed=42, learning_rate=1e-2, lr_warmup_steps=0,
                           caption_dropout_probability=0.0)
    assert config["distillation_config"]["real_score_guidance_scale"] > 1  # the teacher's calls carry an uncond half
    calls: list[dict[str, torch.Tensor]] = []
    load = WanI2VFamily.load_network

    def recorded(self, *args, **kwargs):
        network = load(self, *args, **kwargs)
        network.register_forward_pre_hook(lambda _m, _a, kw: calls.append(
            {k: kw[k].detach().clone() for k in ("hidden_states", "encoder_hidden_states",
                                                  "encoder_hidden_states_image")}), with_kwargs=True)
        return network

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WanI2VFamily, "load_network", recorded)
        out = train(path)
    return out, config, calls, root


@pytest.mark.slow
def test_every_network_call_of_a_dmd_run_gets_the_clips_first_frame(trained, parts):
    _, config, calls, root = trained
    family, components, _ = parts
    # every clip's first-frame condition, as the host cached it beside the clip's latents
    cached = [load_file(str(f)) for f in sorted((root / "cache" / "tiny-digit-clips").glob("*.safetensors"))]
    assert len(cached) == 4 and all({"clip.image_latents", "clip.image_embeds"} <= set(c) for c in cached)
    known = {name: torch.stack([c[f"clip.{name}"] for c in cached]) for name in ("image_latents", "image_embeds")}
    for c in cached:  # latent frame 0 of the condition is the clip's own first latent frame
        torch.testing.assert_close(c["clip.image_latents"][:, 0], c["latents"][:, 0], rtol=0, atol=1e-6)
    negative = family.encode_prompts(components, [config["validation_negative_prompt"]], max_length=None)

    assert len(calls) > 10
    uncond_rows = 0
    for call in calls:
        hidden, image = call["hidden_states"], call["encoder_hidden_states_image"]
        assert hidden.shape[1] == 36 and image is not None and image.shape[0] == hidden.shape[0]
        mask = hidden[:, 16:20]
        assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)
        for row in range(hidden.shape[0]):
            first = hidden[row, 20:36]
            match = [i for i in range(len(cached))
                     if torch.allclose(first, known["image_latents"][i], atol=1e-5)]
            assert match, "a call's first-frame latents are no clip's"
            assert torch.allclose(image[row], known["image_embeds"][match[0]], atol=1e-5)
            uncond_rows += int(torch.allclose(call["encoder_hidden_states"][row], negative[0], atol=1e-6))
    assert uncond_rows > 0  # the teacher's unconditional half: negative text, and (above) the same image


@pytest.mark.slow
def test_the_stock_i2v_pipeline_reproduces_the_validation_sample(trained, tiny_i2v):
    from diffusers import WanImageToVideoPipeline

    out, config, _, root = trained
    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert info["family"] == "wan-i2v"
    expected = load_file(str(out / "validation" / "step-2" / "validation" / "student" / "latents.safetensors"))
    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny_i2v))
    pipe.load_lora_weights(str(out))
    # diffusers 0.42's WanImageToVideoPipeline cleans a prompt with ftfy whether or not it is installed (WanPipeline
    # checks), so the prompt goes in encoded, as WanPipeline encodes it (the wan family's encode_prompts, tested equal)
    family = WanI2VFamily()
    components = family.load_components(str(tiny_i2v), text_encoder_path=None, dtype=torch.float32)
    prompt_embeds = family.encode_prompts(components, [config["validation_prompt"]])
    pipe.scheduler = FewStepFlowScheduler.from_pretrained(str(out), subfolder="scheduler")
    generator = torch.Generator().manual_seed(42)  # the starting noise, then each re-noise: what validation draws
    pipe.scheduler.generator = generator
    latents = pipe(image=Image.open(root / "first_frame.png"), prompt_embeds=prompt_embeds, generator=generator,
                   guidance_scale=1.0, output_type="latent", width=64, height=64,
                   num_frames=config["validation_num_video_frames"],
                   num_inference_steps=len(pipe.scheduler.config.few_step_timesteps)).frames
    assert latents.shape == expected["latents"].shape == (1, 16, 3, 8, 8)
    torch.testing.assert_close(latents, expected["latents"], rtol=1e-4, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "WanImageToVideoPipeline" in card and 'image=load_image("first_frame.png")' in card
