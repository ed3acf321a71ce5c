"""The student where users run it: stock diffusers with the saved scheduler reproduces the reference host's validation
sample, the original-layout LoRA loads through diffusers' own converter with the same outputs, and the model card's
code runs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
from simpletuner_dmd.hosts.reference.trainer import train

EXACT = dict(base_model_precision="no_change", mixed_precision="no", optimizer="adamw", validation_guidance=1.0,
             validation_seed=42)


def _train(root, tiny_wan, tiny_dataset, **overrides):
    """A 2-step DMD run of the tiny example config in ``root`` (its data, caches and output there), exported."""
    import shutil

    from tests.conftest import REPO

    shutil.copytree(tiny_dataset, root / "data")
    backends = json.loads((REPO / "config_examples/tiny-wan-dmd/multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(root / "data")
        b["cache_dir"] = str(root / "cache" / b["id"])
    (root / "backends.json").write_text(json.dumps(backends))
    config = json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())
    config.update(pretrained_model_name_or_path=str(tiny_wan), pretrained_t5_model_name_or_path=str(tiny_wan),
                  data_backend_config=str(root / "backends.json"), output_dir=str(root / "out"), report_to="none",
                  validation_num_video_frames=5, validation_resolution="32x32", max_train_steps=2,
                  checkpoint_step_interval=0, validation_step_interval=0)
    config.update(overrides)
    (root / "config.json").write_text(json.dumps(config))
    out = train(root / "config.json")
    return out, config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_wan, tiny_dataset):
    """One DMD run of 2 steps with EMA and a validation at the end (fp32 base, so the stock pipeline's base is the
    student's own)."""
    return _train(tmp_path_factory.mktemp("student"), tiny_wan, tiny_dataset, use_ema=True, ema_update_interval=1,
                  ema_validation="comparison", lr_warmup_steps=0, learning_rate=1e-2, **EXACT)


LIBRARY = {"digit-3": "a digit 3", "digit 7!": "a digit 7"}


@pytest.fixture(scope="module")
def trained_one_frame(tmp_path_factory, tiny_wan, tiny_dataset):
    """A one-frame (image) run of the tiny Wan model whose validation prompts come from a prompt library (no
    ``validation_prompt``), as the main job's: 2 steps, one validation at the end."""
    root = tmp_path_factory.mktemp("one-frame")
    (root / "prompts.json").write_text(json.dumps(LIBRARY))
    return _train(root, tiny_wan, tiny_dataset, validation_num_video_frames=1, validation_prompt=None,
                  validation_prompt_library=str(root / "prompts.json"), use_ema=False, disable_benchmark=True,
                  **EXACT)


def _pipe(tiny_wan):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(tiny_wan))


def test_stock_wan_pipeline_with_the_saved_scheduler_reproduces_the_validation_sample(trained, tiny_wan):
    out, config = trained
    folder = out / "validation" / "step-2" / "validation" / "student"
    expected = load_file(str(folder / "latents.safetensors"))["latents"]

    pipe = _pipe(tiny_wan)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = FewStepFlowScheduler.from_pretrained(str(out), subfolder="scheduler")
    generator = torch.Generator().manual_seed(config["validation_seed"])  # what the validation draws, in order:
    noise = torch.randn(expected.shape, generator=generator)  # the starting noise, then each re-noise
    pipe.scheduler.generator = generator
    kwargs = dict(prompt=config["validation_prompt"], guidance_scale=1.0, num_inference_steps=3, width=32, height=32,
                  num_frames=5)
    latents = pipe(latents=noise, output_type="latent", **kwargs).frames
    assert latents.shape == expected.shape
    assert torch.allclose(latents, expected, atol=1e-5, rtol=0), (latents - expected).abs().max()

    # decoded, it is the saved frames up to their 8-bit rounding
    generator = torch.Generator().manual_seed(config["validation_seed"])
    noise = torch.randn(expected.shape, generator=generator)
    pipe.scheduler.generator = generator
    video = pipe(latents=noise, output_type="np", **kwargs).frames[0]  # (F, H, W, 3) in [0, 1]
    saved = np.stack([np.asarray(Image.open(folder / f"frame-{i:03d}.png").convert("RGB")) for i in range(5)])
    assert np.abs(video * 255 - saved.astype(np.float64)).max() <= 0.5 + 1e-3

    # another step count is a clear error, never a silent guess
    with pytest.raises(ValueError, match="trained for 3 steps"):
        pipe(latents=noise, output_type="latent", **{**kwargs, "num_inference_steps": 50})


def _transformer_output(pipe):
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=cond,
                                return_dict=False)[0]


@pytest.mark.parametrize("variant", ["", "ema"])
def test_the_original_layout_loads_through_diffusers_with_the_same_outputs(trained, tiny_wan, variant):
    out, config = trained
    folder = out / variant if variant else out
    name = f"wan_dmd_3step_lora_rank{config['lora_rank']}.safetensors"
    original = load_file(str(folder / name))
    assert original and all(k.startswith("diffusion_model.blocks.") for k in original)
    assert any(k.endswith(".self_attn.q.lora_down.weight") for k in original)
    assert all(original[k].item() == config["lora_alpha"] for k in original if k.endswith(".alpha"))

    base = _transformer_output(_pipe(tiny_wan))
    outputs = {}
    for weight_name in ("pytorch_lora_weights.safetensors", name):
        pipe = _pipe(tiny_wan)
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        outputs[weight_name] = _transformer_output(pipe)
    diffusers_out, original_out = outputs.values()
    assert not torch.allclose(diffusers_out, base, atol=1e-4)  # the LoRA does something
    assert torch.allclose(original_out, diffusers_out, atol=1e-6, rtol=0), (original_out - diffusers_out).abs().max()


def test_the_model_card_has_hub_metadata_and_code_that_runs(trained, tiny_wan):
    import yaml

    out, config = trained
    card = (out / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    meta = yaml.safe_load(front)
    assert meta["base_model"] == str(tiny_wan) and meta["library_name"] == "diffusers"
    assert {"lora", "distillation", "dmd", "text-to-video"} <= set(meta["tags"])
    for text in ("| steps | 3", "| timesteps | 1000, 757, 522 |", "| σ list | 1, 0.757, 0.522, 0 |",
                 "| guidance | 1", "| LoRA strength | 1.0 |", "wan_dmd_3step_lora_rank16.safetensors", "sampler `lcm`",
                 "![validation sample](validation/step-2/validation/student/sample.gif)", "| dmd.dmd_denoising_steps |"):
        assert text in body, text
    assert (out / "validation/step-2/validation/student/sample.gif").is_file()

    assert f'Prompt: {json.dumps(config["validation_prompt"])}, seed 42.' in body

    scope = _run_card_code(body, out)
    assert scope["frames"].shape == (5, 32, 32, 3)


def _run_card_code(body: str, out) -> dict:
    """Execute the card's python block as a user would (its base model is the config's, here the tiny model's local
    folder), with ``path/to/this/folder`` pointing at the output."""
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1).replace("path/to/this/folder", str(out))
    scope: dict = {}
    exec(compile(code, "model-card", "exec"), scope)  # noqa: S102 — the card's own example, on the tiny model
    return scope


def test_the_model_card_of_a_one_frame_run_with_a_prompt_library_runs_and_names_its_prompt(trained_one_frame,
                                                                                           tiny_wan):
    out, config = trained_one_frame
    body = (out / "README.md").read_text().split("---\n", 2)[2]
    assert "null" not in body
    # the validation sample is the library's first prompt's, and the card names that prompt and where it came from
    assert "![validation sample](validation/step-2/digit-3/student/frame-000.png)" in body
    assert 'Prompt: "a digit 3" (from `validation_prompt_library`), seed 42.' in body
    assert "prompt=\"a digit 3\"," in body and "num_frames=1," in body and ".images[0]" not in body

    scope = _run_card_code(body, out)
    image = scope["image"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert sorted(p.parent.parent.name for p in (out / "validation" / "step-2").glob("*/student/frame-000.png")) == [
        "digit-3", "digit_7_"]


def test_sample_command_writes_frames_gif_mp4_and_a_sheet_beside_the_teacher(trained, tiny_wan, tmp_path, capsys):
    import imageio.v3 as iio

    from simpletuner_dmd.cli import main

    out, config = trained
    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert (info["family"], info["steps"], info["width"], info["frames"]) == ("wan", 3, 32, 5)
    samples = tmp_path / "samples"
    code = main(["sample", "--base", str(tiny_wan), "--student", str(out), "--out", str(samples),
                 "--seeds", f"{config['validation_seed']},7", "--teacher-steps", "4", "--teacher-guidance", "3"])
    assert code == 0, capsys.readouterr().err
    for seed in (config["validation_seed"], 7):
        for variant in ("student", "teacher"):
            folder = samples / "validation" / f"seed-{seed}" / variant
            assert len(list(folder.glob("frame-*.png"))) == 5 and (folder / "sample.gif").is_file()
            assert iio.imread(folder / "sample.mp4").shape[0] == 5  # an mp4 a player opens
    sheet = Image.open(samples / "validation" / "sheet.png")
    assert sheet.size == (2 * 32, 2 * 32)  # rows: seeds; columns: teacher | student

    # the validation prompt at the validation seed is the reference host's validation sample, frame for frame
    ours = samples / "validation" / f"seed-{config['validation_seed']}" / "student"
    theirs = out / "validation" / "step-2" / "validation" / "student"
    for i in range(5):
        a = np.asarray(Image.open(ours / f"frame-{i:03d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(theirs / f"frame-{i:03d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_sample_refuses_a_folder_that_is_not_a_student_output(tiny_wan, tmp_path, capsys):
    from simpletuner_dmd.cli import main

    assert main(["sample", "--base", str(tiny_wan), "--student", str(tmp_path), "--out", str(tmp_path / "s"),
                 "--prompt", "x"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert "not a student LoRA output folder (no pytorch_lora_weights.safetensors)" in line
