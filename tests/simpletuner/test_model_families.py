"""The plugin's methods on SimpleTuner families no plugin family declares, through ``simpletuner train`` 4.10.1 and
SimpleTuner's own model object (``hosts/simpletuner/model_family.py``): Flux (FLUX.1-dev, with its guidance
embedding), Qwen-Image, LTX-Video and Wan 2.1 image-to-video, on tiny pipelines built offline
(``tiny_fixtures.py``). Test-only witnesses (``site/sitecustomize.py``) log every network call the method makes and
compare the family's prediction with SimpleTuner's own for the same batch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from harness import (SKIP_WITHOUT_VENV, assert_clean, image_backends, needs_v4, same, simpletuner_train, student,
                     venv_python)
from tiny_fixtures import plain_lora_config, tiny_family_backends

pytestmark = [*SKIP_WITHOUT_VENV, needs_v4]

VALIDATION = dict(validation_disable=False, validation_prompt="a digit", validation_num_inference_steps=3,
                  validation_resolution="64x64", validation_guidance=1.0, num_validation_images=1, validation_seed=0)


def distil(name: str, model: Path, tmp_path: Path, tiny_dataset, method: str, steps: int, method_config: dict,
           *, folder: str = "run", backends: Path | None = None, **overrides) -> tuple[str, Path, list[dict]]:
    """``method`` on the tiny ``name`` for ``steps`` steps through ``simpletuner train``, with the call witness and
    the flow check on; returns the log, the output folder and the witnessed network calls. ``backends``: another
    run's data (and caches), as a resumed run needs them."""
    root = tmp_path / folder
    root.mkdir()
    backends = backends or tiny_family_backends(root, tiny_dataset, name)
    out = root / "out"
    config = plain_lora_config(name, model, backends, out, max_train_steps=steps, lora_dropout=0.0,
                               distillation_method=method, distillation_config=method_config,
                               validation_negative_prompt="blurry, low quality", **overrides)
    calls = root / "calls"
    code, text, seconds = simpletuner_train(root, config, HF_HUB_OFFLINE="1", SIMPLETUNER_DMD_TEST_CALLS=str(calls),
                                            SIMPLETUNER_DMD_TEST_FLOW_CHECK="1")
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


def test_dmd_on_flux_with_its_guidance_input_validation_and_resume(tiny_flux, tiny_dataset, tmp_path):
    """DMD on FLUX.1-dev: every network call — student, teacher (every adapter off) and fake score — gets SimpleTuner's
    ``flux_guidance_value`` as its distilled-guidance input; the family's prediction is SimpleTuner's own; validation
    samples with the student's schedule at steps 2 and 4 and leaves the student as it was; a run resumed from
    ``checkpoint-2`` ends with the LoRA the uninterrupted run ended with."""
    dmd = {"generator_update_interval": 2, "real_score_guidance_scale": 2.0}
    # Flux's validation hands validation_guidance to the same guidance input: the student is sampled as trained
    options = dict(flux_guidance_mode="constant", flux_guidance_value=3.5, checkpoint_step_interval=2,
                   validation_step_interval=4, **{**VALIDATION, "validation_guidance": 3.5})
    text, out, calls = distil("flux", tiny_flux, tmp_path, tiny_dataset, "dmd", 4, dmd, **options)

    assert {tuple(c["guidance_values"]) for c in calls} == {(3.5,)}, "every call sees flux_guidance_value"
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and all(not c["grad"] for c in teacher)
    assert {c["hidden_states"]["shape"][0] for c in teacher} == {2}  # CFG's cond and uncond halves in one batch
    assert critic and any(c["grad"] for c in critic)
    assert flow_checks(text) and max(flow_checks(text)) == 0.0
    assert "validation samples with dmd's own schedule: FewStepFlowScheduler" in text
    assert sorted(p.name for p in (out / "validation_images").glob("step_*_validation_*.png")) == [
        "step_4_validation_0_64x64.png"]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()

    # resume: the same job from checkpoint-2 (its later checkpoint and outputs removed) to step 4
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "out" / "checkpoint-2")
    text2, _, _ = distil("flux", tiny_flux, tmp_path, tiny_dataset, "dmd", 4, dmd, folder="resumed-run",
                         backends=tmp_path / "run" / "backends.json", output_dir=str(resumed / "out"),
                         resume_from_checkpoint="latest", **options)
    assert "restored dmd state from" in text2
    assert same(student(out), student(resumed / "out")), "resume ≡ the uninterrupted run"


def test_dmd_on_qwen_image(tiny_qwen_image, tiny_dataset, tmp_path):
    text, out, calls = distil("qwen_image", tiny_qwen_image, tmp_path, tiny_dataset, "dmd", 2,
                              {"generator_update_interval": 1}, checkpoint_step_interval=2)
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and critic and max(flow_checks(text)) == 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir()


def test_dmd_on_ltx_video_clips(tiny_ltxvideo, tiny_dataset, tmp_path):
    text, out, calls = distil("ltxvideo", tiny_ltxvideo, tmp_path, tiny_dataset, "dmd", 2,
                              {"generator_update_interval": 1}, checkpoint_step_interval=2)
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and critic and max(flow_checks(text)) == 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_dmd_on_wan_image_to_video_conditions_every_call_on_the_first_frame(tiny_wan_i2v, tiny_dataset, tmp_path):
    """Wan 2.1 I2V: every network call of the method — the student's rollout, the teacher's cond and uncond halves,
    the fake score — gets the image embedding and the first frame's latents (36 input channels: 16 noisy + 4 mask +
    16 first-frame), as SimpleTuner conditions its own training call."""
    text, out, calls = distil("wan-i2v", tiny_wan_i2v, tmp_path, tiny_dataset, "dmd", 2,
                              {"generator_update_interval": 1}, checkpoint_step_interval=2)
    assert calls and all("encoder_hidden_states_image" in c for c in calls)
    assert {c["hidden_states"]["shape"][1] for c in calls} == {36}
    teacher, critic = teacher_and_critic_calls(calls)
    assert teacher and critic and max(flow_checks(text)) == 0.0


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
