"""The plugin's methods on SimpleTuner families no plugin family declares, through ``simpletuner train`` 4.10.1 and
SimpleTuner's own model object (``hosts/simpletuner/model_family.py``): Flux (FLUX.1-dev, with its guidance
embedding), Qwen-Image, LTX-Video and Wan 2.1 image-to-video, on tiny pipelines built offline
(``tiny_fixtures.py``). Test-only witnesses (``site/sitecustomize.py``) log every network call the method makes,
compare the family's prediction with SimpleTuner's own for the same batch, and record each validation pipeline call
(its arguments and output), which the family's stock diffusers pipeline then repeats with the exported LoRA and
``output_dir/scheduler`` (``stock_pipeline.py``, run by the venv's python)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import (SKIP_WITHOUT_VENV, assert_clean, image_backends, needs_v4, same, simpletuner_train, stock_sample,
                     student, venv_python)
from tiny_fixtures import plain_lora_config, tiny_family_backends

pytestmark = [*SKIP_WITHOUT_VENV, needs_v4]

# validation_seed 0 would fall to `seed` (SimpleTuner's `validation_seed or seed or 0`), which `seed: 0` makes the time
VALIDATION = dict(validation_disable=False, validation_prompt="a digit", validation_num_inference_steps=3,
                  validation_resolution="64x64", validation_guidance=1.0, num_validation_images=1, validation_seed=42)


def distil(name: str, model: Path, tmp_path: Path, tiny_dataset, method: str, steps: int, method_config: dict,
           *, folder: str = "run", backends: Path | None = None, **overrides) -> tuple[str, Path, list[dict]]:
    """``method`` on the tiny ``name`` for ``steps`` steps through ``simpletuner train``, with the call witness, the
    flow check and the validation record (``root/validation``) on; returns the log, the output folder
    (``root/out``) and the witnessed network calls. ``backends``: another run's data (and caches), as a resumed run
    needs them."""
    root = tmp_path / folder
    root.mkdir()
    backends = backends or tiny_family_backends(root, tiny_dataset, name)
    out = root / "out"
    config = plain_lora_config(name, model, backends, out, max_train_steps=steps, lora_dropout=0.0,
                               distillation_method=method, distillation_config=method_config,
                               validation_negative_prompt="blurry, low quality", **overrides)
    calls = root / "calls"
    code, text, seconds = simpletuner_train(root, config, HF_HUB_OFFLINE="1", SIMPLETUNER_DMD_TEST_CALLS=str(calls),
                                            SIMPLETUNER_DMD_TEST_FLOW_CHECK="1",
                                            SIMPLETUNER_DMD_TEST_VALIDATION_RECORD=str(root / "validation"))
    assert code == 0, text[-5000:]
    assert_clean(text, f"{method} on the tiny {name}")
    print(f"simpletuner train, {method} on the tiny {name}, {steps} steps: {seconds:.0f} s")
    witnessed = [json.loads(line) for line in calls.with_name("calls.rank0.jsonl").read_text().splitlines()]
    return text, out, witnessed


def flow_checks(text: str) -> list[float]:
    """The flow check's differences: the family's prediction against SimpleTuner's own for the same batch."""
    return [float(d) for d in re.findall(r"\[flow-check\] .* max_abs_diff=(\S+)", text)]


def teacher_and_critic_calls(calls: list[dict]) -> tuple[list[dict], list[dict]]:
    """The training step's calls with every adapter off (the teacher) and with the fake score's adapter."""
    teacher = [c for c in calls if not c["adapters_enabled"]]
    critic = [c for c in calls if c["adapters"] == ["fake_score"]]
    return teacher, critic


FLUX_DMD = {"generator_update_interval": 2, "real_score_guidance_scale": 2.0}
# Flux's validation hands validation_guidance to the same guidance input: the student is sampled as trained
FLUX_OPTIONS = dict(flux_guidance_mode="constant", flux_guidance_value=3.5, checkpoint_step_interval=2,
                    validation_step_interval=4, **{**VALIDATION, "validation_guidance": 3.5})


@pytest.fixture(scope="module")
def flux_dmd(tiny_flux, tiny_dataset, tmp_path_factory) -> SimpleNamespace:
    """DMD on the tiny FLUX.1-dev for 4 steps (checkpoints at 2 and 4, validation at 4), one run for the checks of
    the run itself and of its student in the stock pipeline."""
    root = tmp_path_factory.mktemp("flux-dmd")
    text, out, calls = distil("flux", tiny_flux, root, tiny_dataset, "dmd", 4, FLUX_DMD, **FLUX_OPTIONS)
    return SimpleNamespace(root=root, text=text, out=out, calls=calls)


def test_dmd_on_flux_with_its_guidance_input_validation_and_resume(flux_dmd, tiny_flux, tiny_dataset, tmp_path):
    """DMD on FLUX.1-dev: every network call — student, teacher (every adapter off) and fake score — gets SimpleTuner's
    ``flux_guidance_value`` as its distilled-guidance input; the family's prediction is SimpleTuner's own; validation
    samples with the student's schedule at steps 2 and 4 and leaves the student as it was; a run resumed from
    ``checkpoint-2`` ends with the LoRA the uninterrupted run ended with."""
    text, out, calls = flux_dmd.text, flux_dmd.out, flux_dmd.calls

    assert {tuple(c["guidance_values"]) for c in calls} == {(3.5,)}, "every call sees flux_guidance_value"
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and all(not c["grad"] for c in teacher)
    assert {c["hidden_states"]["shape"][0] for c in teacher} == {2}  # CFG's cond and uncond halves in one batch
    assert critic and any(c["grad"] for c in critic)
    assert flow_checks(text) and max(flow_checks(text)) == 0.0
    assert ("validation samples with dmd's own schedule: FewStepFlowScheduler, timesteps 1000, 757, 522; its "
            "re-noising seeded with validation_seed 42 at every call") in text
    assert sorted(p.name for p in (out / "validation_images").glob("step_*_validation_*.png")) == [
        "step_4_validation_0_64x64.png"]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()

    # resume: the same job from checkpoint-2 (its later checkpoint and outputs removed) to step 4
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "out" / "checkpoint-2")
    text2, _, _ = distil("flux", tiny_flux, tmp_path, tiny_dataset, "dmd", 4, FLUX_DMD, folder="resumed-run",
                         backends=flux_dmd.root / "run" / "backends.json", output_dir=str(resumed / "out"),
                         resume_from_checkpoint="latest", **FLUX_OPTIONS)
    assert "restored dmd state from" in text2
    assert same(student(out), student(resumed / "out")), "resume ≡ the uninterrupted run"


def pixels(png: Path):
    """An 8-bit PNG as an int16 array (H, W, 3), so differences do not wrap."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def reproduce_validation(name: str, base: Path, out: Path, folder: Path, **options) -> dict:
    """SimpleTuner's last validation call of the run in ``out`` (``root/validation``: its arguments and 8-bit output),
    repeated by the family's stock pipeline with the run's LoRA and ``out/scheduler``: the same prompt, generator seed,
    size, steps and guidance (``options`` add to or replace the script's arguments). Returns the stock script's
    result with ``diff`` (max |stock − SimpleTuner| in 8-bit levels, the stock output rounded as diffusers rounds
    it), ``before_rounding`` (the same with the stock output unrounded: ≤ 0.5 when they agree to the level) and
    ``global_rng_diff`` (the stock pipeline with its re-noising left to torch's global RNG)."""
    import numpy as np

    record = out.parent / "validation"
    calls = [json.loads(line) for line in (record / "calls.jsonl").read_text().splitlines()]
    call, theirs = calls[-1], np.load(record / f"output-{len(calls) - 1}.npy").astype(np.float64)
    assert call["scheduler"] == "FewStepFlowScheduler"
    assert call["generator_seed"] is not None and call["scheduler_generator_seed"] == call["generator_seed"]
    args = {**dict(prompt=call["_validation_prompt_text"], seed=call["generator_seed"],
                   size=f"{call['width']}x{call['height']}", steps=call["num_inference_steps"],
                   guidance=call["guidance_scale"]), **({"image": call["image"]} if "image" in call else {}),
            **options}
    folder.mkdir(parents=True, exist_ok=True)
    result = stock_sample(name, base, out, folder, **args)
    ours = {k: np.load(folder / f"{k}.npy")[0].astype(np.float64) * 255 for k in ("seeded", "global-rng")}
    result.update(call=call, theirs=theirs, diff=float(np.abs(np.round(ours["seeded"]) - theirs).max()),
                  before_rounding=float(np.abs(ours["seeded"] - theirs).max()),
                  global_rng_diff=float(np.abs(np.round(ours["global-rng"]) - theirs).max()))
    print(f"{name}: stock {result['pipeline']} vs SimpleTuner's validation output {theirs.shape}: max |diff| "
          f"{result['diff']:g} levels (8-bit), {result['before_rounding']:.3f} before rounding; re-noised from the "
          f"global RNG: {result['global_rng_diff']:g}; stock pipeline {result['seconds']} s")
    assert theirs.std() > 1, "a sample with some structure"
    return result


def test_the_flux_student_in_the_stock_flux_pipeline_reproduces_its_validation_sample(flux_dmd, tiny_flux, tmp_path):
    """The student where users run it: diffusers' own ``FluxPipeline`` with the LoRA SimpleTuner exported and the
    scheduler the bridge wrote to ``output_dir/scheduler`` (also in each checkpoint), sampled with the validation's
    prompt, seed, size, steps and guidance, and the scheduler's ``generator`` seeded like the pipeline's, gives
    SimpleTuner's validation PNG; left to torch's global RNG its re-noising does not."""
    out = flux_dmd.out
    assert f"dmd's scheduler for stock pipelines written to {out / 'scheduler'}" in flux_dmd.text
    assert all((folder / "scheduler" / "scheduler_config.json").is_file()
               for folder in (out, out / "checkpoint-2", out / "checkpoint-4"))
    result = reproduce_validation("flux", tiny_flux, out, tmp_path)
    assert result["call"]["guidance_scale"] == 3.5 and result["call"]["generator_seed"] == 42
    assert result["pipeline"] == "FluxPipeline" and result["scheduler"] == "FewStepFlowScheduler"
    assert result["timesteps"] == [1000.0, 757.0, 522.0]
    # the saved PNG: the output recorded, with SimpleTuner's caption band ("Prompt: a digit") below it
    png = pixels(out / "validation_images" / "step_4_validation_0_64x64.png")
    assert png.shape[0] > 64 and (png[:64] == result["theirs"]).all()
    assert result["diff"] <= 1
    assert result["global_rng_diff"] > 8, "the re-noising matters to the sample"


def test_dmd_on_qwen_image_and_its_student_in_the_stock_pipeline(tiny_qwen_image, tiny_dataset, tmp_path):
    """DMD on Qwen-Image, validated at its last step; the student in diffusers' ``QwenImagePipeline`` reproduces the
    validation sample. SimpleTuner's Qwen validation hands the pipeline the negative prompt's embedding and leaves
    ``true_cfg_scale`` at the pipeline's default 4.0 (``validation_guidance_real`` only raises it): true CFG, which
    the stock call repeats."""
    text, out, calls = distil("qwen_image", tiny_qwen_image, tmp_path, tiny_dataset, "dmd", 2,
                              {"generator_update_interval": 1}, checkpoint_step_interval=2,
                              validation_step_interval=2, **VALIDATION)
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and critic and max(flow_checks(text)) == 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    call = json.loads((tmp_path / "run" / "validation" / "calls.jsonl").read_text().splitlines()[-1])
    assert "negative_prompt_embeds" in call["tensors"] and "true_cfg_scale" not in call
    result = reproduce_validation("qwen_image", tiny_qwen_image, out, tmp_path / "stock", guidance=4.0,
                                  negative_prompt=call["_validation_negative_prompt_text"])
    assert result["pipeline"] == "QwenImagePipeline" and result["diff"] <= 1


def test_dmd_on_ltx_video_clips_and_its_student_in_the_stock_pipeline(tiny_ltxvideo, tiny_dataset, tmp_path):
    """DMD on LTX-Video (images and 9-frame clips), validated on 9 frames at its last step; the student in
    diffusers' ``LTXPipeline`` reproduces every frame SimpleTuner's validation produced (before its mp4 encoding)."""
    text, out, calls = distil("ltxvideo", tiny_ltxvideo, tmp_path, tiny_dataset, "dmd", 2,
                              {"generator_update_interval": 1}, checkpoint_step_interval=2,
                              validation_step_interval=2, validation_num_video_frames=9, **VALIDATION)
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and critic and max(flow_checks(text)) == 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    result = reproduce_validation("ltxvideo", tiny_ltxvideo, out, tmp_path / "stock", frames=9)
    assert result["pipeline"] == "LTXPipeline" and result["theirs"].shape[0] == 9 and result["diff"] <= 1


def test_dmd_on_wan_image_to_video_conditions_every_call_on_the_first_frame(tiny_wan_i2v, tiny_dataset, tmp_path):
    """Wan 2.1 I2V: every network call of the method — the student's rollout, the teacher's cond and uncond halves,
    the fake score — gets the image embedding and the first frame's latents (36 input channels: 16 noisy + 4 mask +
    16 first-frame), as SimpleTuner conditions its own training call. Validated on a first frame
    (``validation_input``); diffusers' ``WanImageToVideoPipeline`` reproduces that sample only with SimpleTuner's
    attention processor swapped in (below)."""
    first_frame = min(Path(tiny_dataset).glob("*.png"))
    text, out, calls = distil("wan-i2v", tiny_wan_i2v, tmp_path, tiny_dataset, "dmd", 2,
                              {"generator_update_interval": 1}, checkpoint_step_interval=2,
                              validation_step_interval=2, validation_num_video_frames=9,
                              validation_input=json.dumps([{"path": str(first_frame), "prompt": "a digit"}]),
                              # 4.10.1 stitches the input image left of the output, which fails for a video
                              # ('list' object has no attribute 'size'); it implements "left" only: "right" skips it
                              validation_stitch_input_location="right", **VALIDATION)
    assert calls and all("encoder_hidden_states_image" in c for c in calls)
    assert {c["hidden_states"]["shape"][1] for c in calls} == {36}
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and critic and max(flow_checks(text)) == 0.0
    # The student in diffusers' WanImageToVideoPipeline, on the first frame SimpleTuner's validation gave it, does NOT
    # reproduce the sample: SimpleTuner 4.10.1's own Wan transformer (training and validation) takes a fixed 513
    # tokens of the cross-attention context as the image's (wan/transformer.py, WanAttnProcessor2_0), diffusers'
    # all but the last 512 (the text's): 17 here, 257 for Wan 2.1's CLIP ViT-H. With SimpleTuner's processor swapped
    # into the stock transformer's cross-attention, the stock pipeline reproduces it: that split is the difference.
    stock = reproduce_validation("wan-i2v", tiny_wan_i2v, out, tmp_path / "stock", frames=9)
    assert stock["pipeline"] == "WanImageToVideoPipeline" and stock["theirs"].shape[0] == 9
    assert stock["diff"] > 8, "SimpleTuner's Wan I2V transformer is diffusers' again: update docs/simpletuner.md"
    split = reproduce_validation("wan-i2v", tiny_wan_i2v, out, tmp_path / "split", frames=9,
                                 simpletuner_wan_attention="")
    assert split["diff"] <= 1


def test_lcm_and_dcm_semantic_on_flux(tiny_flux, tiny_dataset, tmp_path):
    for method, config in (("lcm", {}), ("dcm", {"mode": "semantic"})):
        text, out, calls = distil("flux", tiny_flux, tmp_path, tiny_dataset, method, 2, config, folder=method)
        assert calls and max(flow_checks(text)) == 0.0
        assert (out / "pytorch_lora_weights.safetensors").is_file()


def _dmd_twice(run_root: Path, config: dict, tiny_dataset) -> tuple[dict, dict, str]:
    """``config`` through ``simpletuner train`` twice: with the family the bridge picks, and with the generic family
    forced (test-only, ``site/sitecustomize.py``); returns both students and the generic run's log. Each run caches
    its own latents (a VAE that samples its latents draws from the RNG while caching: a shared cache would leave the
    second run's RNG elsewhere)."""
    students = []
    for family in ("", "simpletuner-model"):
        run = run_root / (family or "dedicated")
        run.mkdir(parents=True)
        out = run / "out"
        own = {**config, "output_dir": str(out), "data_backend_config": str(image_backends(run, tiny_dataset))}
        code, text, seconds = simpletuner_train(run, own, HF_HUB_OFFLINE="1", SIMPLETUNER_DMD_TEST_FAMILY=family)
        assert code == 0, text[-5000:]
        assert_clean(text, f"DMD with {family or 'the dedicated family'}")
        picked = re.search(r"dmd serves SimpleTuner's distiller interface; family (\S+);", text).group(1)
        assert picked == (family or config["model_family"])
        print(f"simpletuner train, DMD on {config['model_family']} through {picked}: {seconds:.0f} s")
        students.append(student(out))
    return students[0], students[1], text


def test_the_generic_route_trains_wan_and_sd3_as_their_dedicated_families(job, tiny_dataset, tmp_path):
    """On SimpleTuner's ``wan`` and ``sd3``, DMD through SimpleTuner's own ``model_predict`` (the generic family) and
    through the plugin's own family (its ``predict_flow`` on the same transformer) end with bit-identical students:
    the same DMD losses and gradients, the critic's updates and the teacher's CFG (scale 3: the negative prompt's
    condition batched with each sample's) step for step, over two steps, one of them critic-only."""
    dmd = {"generator_update_interval": 2, "real_score_guidance_scale": 3.0, "fake_score_lr": 1e-3}
    # seed 0 is SimpleTuner's "the current time": a fixed seed makes the two runs draw alike
    common = dict(lora_dropout=0.0, max_train_steps=2, checkpoint_step_interval=100, report_to="none", seed=42,
                  distillation_method="dmd", distillation_config=dmd)
    root, write = job
    dedicated, generic, _ = _dmd_twice(tmp_path / "wan", write.config(**common), tiny_dataset)
    assert dedicated.keys() == generic.keys() and same(dedicated, generic)

    code, text, _ = venv_python("--make-tiny", "sd3", str(tmp_path / "tiny-sd3"), log=tmp_path / "make-sd3.log")
    assert code == 0, text[-3000:]
    sd3 = {**write.config(**common), "model_family": "sd3", "model_flavour": "medium",
           "pretrained_model_name_or_path": str(tmp_path / "tiny-sd3")}
    sd3.pop("pretrained_t5_model_name_or_path", None)
    dedicated, generic, _ = _dmd_twice(tmp_path / "sd3", sd3, tiny_dataset)
    assert same(dedicated, generic)
