"""Integration: the real SimpleTuner from PyPI — 4.10.1 (Python 3.12) or 3.1.6 (Python 3.11), whichever venv
``SIMPLETUNER_VENV`` points at — trains the plugin's methods through the bridge on CPU, with a tiny local Wan model
(and, on 4.x, DMD with SimpleTuner's ``sd3`` family on a tiny SD3.5 pipeline).

Each SimpleTuner release lives in its own venv, made by ``scripts/install_simpletuner_env.sh --version V`` (the plugin
installed there as a regular package, so its ``simpletuner train`` import hook is in place); ``scripts/
test_simpletuner.sh`` makes both and runs this file against each. These tests skip when the venv is absent. Runs go
through ``run_simpletuner.py`` in that venv (the launcher, or SimpleTuner's ``train`` module untouched) or through
SimpleTuner's own ``simpletuner train`` command; both apply the test-only CPU shims (``cpu_shims.py``) first.

SimpleTuner 3.1.6's own ``train.py`` exits 0 even when training crashed (4.10.1 re-raises), so the assertions are on
files and log markers, and on exit statuses only where they mean something.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
from pathlib import Path

import pytest

from harness import (SKIP_WITHOUT_VENV, PYTHON, REPO, SITE, V4, VERSION, assert_clean as _assert_clean,
                      image_backends as _image_backends, needs_v4, same as _same, scalars as _scalars,
                      simpletuner_train as _simpletuner_train, student as _student, venv_python as _venv_python)

pytestmark = SKIP_WITHOUT_VENV


def test_plain_lora_baseline_runs(job):
    root, write = job
    out = root / "out-plain"
    code, text, seconds = _venv_python("--plain", "--config", str(write("plain", output_dir=str(out),
                                                                        max_train_steps=3)),
                                       log=root / "plain.log", SIMPLETUNER_DMD_DISABLE="1")
    _assert_clean(text, "plain LoRA")
    assert "[simpletuner-dmd]" not in text  # SimpleTuner as installed: the hook is off
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir(), text[-3000:]
    assert _scalars(out, "train_loss"), "SimpleTuner logged no train_loss"
    print(f"plain LoRA, 3 steps: {seconds:.0f} s")



def _assert_three_dmd_steps(text: str, out: Path) -> None:
    """Three DMD steps inside SimpleTuner with ``generator_update_interval`` 2 and a checkpoint each: every step
    logged; the metrics reached SimpleTuner's own tracker (dmd_loss on the generator steps 1 and 3, fake_score_loss
    on every step, no NaN); step 2 is critic-only — through SimpleTuner's real loop (its AdamW steps every time) the
    student did not move at all, no momentum, no weight decay, while the fake score trained — and step 3 moved it."""
    from safetensors.torch import load_file

    for step in (1, 2, 3):
        assert f"[simpletuner-dmd] step {step}: " in text, text[-3000:]
    dmd_loss, fake_loss = _scalars(out, "dmd_loss"), _scalars(out, "fake_score_loss")
    assert sorted(dmd_loss) == [1, 3] and sorted(fake_loss) == [1, 2, 3], (dmd_loss, fake_loss)
    assert all(v == v for v in [*dmd_loss.values(), *fake_loss.values()])  # no NaN
    students = {n: _student(out / f"checkpoint-{n}") for n in (1, 2, 3)}
    fakes = {n: load_file(str(out / f"checkpoint-{n}" / "dmd" / "fake_score.safetensors")) for n in (1, 2)}
    assert _same(students[1], students[2]), "the student moved on a critic-only step"
    assert not _same(students[2], students[3]) and not _same(fakes[1], fakes[2])
    assert fakes[2] and all(".fake_score." in k for k in fakes[2])


def test_dmd_through_simpletuner_train_checkpoints_validates_and_resumes(job):
    """DMD through SimpleTuner's own ``simpletuner train`` (the import hook; no launcher): metrics in SimpleTuner's
    tensorboard, the fake score in its checkpoints, SimpleTuner's optimizer holding the student only, a critic-only step
    that leaves the student bit-identical, and — on 4.x — validation with DMD's own few-step schedule, samples saved by
    SimpleTuner. Then a resume: through ``simpletuner train`` again on 4.x; through the launcher on 3.1.6, whose own
    ``train.py`` exits 0 whatever happens (so there the first run's markers and files tell, and the launcher's exit
    status is checked on the resume).

    With the options SimpleTuner users set: ``train_batch_size`` 2, ``gradient_accumulation_steps`` 2 (the generator
    interval and the critic count optimizer steps: 2 critic updates by checkpoint-2, not 4), and EMA updated every
    step and validated in ``comparison`` mode (the student validated, then the EMA, and the student bit-identical
    after each validation)."""

    root, write = job
    run = root / "st-train-dmd"
    out = run / "out"
    dmd = "{'dmd': {'generator_update_interval': 2, 'fake_score_lr': 1e-3}}"  # a string: see docs/simpletuner.md
    validation = dict(validation_disable=False, validation_step_interval=3, validation_prompt="a digit",
                      validation_num_inference_steps=3, validation_resolution="64x64", validation_guidance=1.0,
                      num_validation_images=1, validation_num_video_frames=1, validation_seed=0) if V4 else {}
    options = dict(train_batch_size=2, gradient_accumulation_steps=2, use_ema=True, ema_update_interval=1,
                   ema_validation="comparison")
    config = write.config(output_dir=str(out), max_train_steps=3, checkpoint_step_interval=1, distillation_method="dmd",
                          distillation_config=dmd, **validation, **options)
    code, text, seconds = _simpletuner_train(run, config, SIMPLETUNER_DMD_TEST_VALIDATION_CHECK="1",
                                             SIMPLETUNER_DMD_TEST_FLOW_CHECK="1")
    _assert_clean(text, "simpletuner train, DMD")
    assert code == 0, text[-3000:]
    assert text.count("[simpletuner-dmd] serving distillation_method ") == 1  # the hook said so, once
    assert "[simpletuner-dmd] negative prompt encoded with SimpleTuner's text encoder" in text
    assert "student adapter 'default'" in text
    # SimpleTuner's optimizer was built from the student's 32 LoRA tensors only (determine_params_to_optimize)
    assert "[simpletuner-dmd] SimpleTuner's optimizer holds the student's 32 tensors; the method's own 32 are left" \
        in text, text[-3000:]
    _assert_three_dmd_steps(text, out)
    ckpt = out / "checkpoint-2"
    assert (ckpt / "dmd" / "fake_score_optimizer.json").is_file()
    assert json.loads((ckpt / "dmd" / "state.json").read_text())["critic_updates"] == 2
    assert json.loads((ckpt / "simpletuner_dmd_bridge.json").read_text())["global_step"] == 2
    student = _student(out)
    assert student and not any("fake_score" in k for k in student)  # SimpleTuner's LoRA is the student's only
    # two micro-batches of two samples per optimizer step
    shapes = re.findall(r"\[flow-check\] latents \((\d+), 16, 1, 8, 8\)", text)
    assert shapes and set(shapes) == {"2"} and len(shapes) == 6, shapes
    if V4:
        assert "[simpletuner-dmd] validation samples with dmd's own schedule: FewStepFlowScheduler, timesteps " \
               "1000, 757, 522" in text, text[-3000:]
        samples = [p for p in out.rglob("*") if p.suffix in (".png", ".mp4", ".gif") and "validation" in str(p).lower()]
        assert samples, f"SimpleTuner saved no validation sample under {out}"
        _assert_ema_validated(text)
        # the drift signal on SimpleTuner's own samples: every round against the first one, in its tracker
        drift = json.loads((out / "validation_images" / "drift.json").read_text())
        steps = [r["step"] for r in drift["rounds"]]
        assert steps[-1] == 3 and drift["reference"]["label"] == f"samples at step {steps[0]}", steps
        assert (out / "validation_images" / "drift.png").is_file()
        logged = _scalars(out, "drift/samples/brightness")
        assert logged and logged[3] == pytest.approx(drift["rounds"][-1]["values"]["samples"]["brightness"])
    print(f"simpletuner train ({VERSION}), DMD, 3 steps{' with validation' if V4 else ''}: {seconds:.0f} s")

    # resume from checkpoint-2 and train to step 4: the fake score's state is restored, its counters continue
    config.update(max_train_steps=4, checkpoint_step_interval=2, resume_from_checkpoint="checkpoint-2",
                  validation_disable=True)
    if V4:
        code, text, seconds = _simpletuner_train(run, config)
    else:
        code, text, seconds = _venv_python("--config", str(write("dmd-resume", **config)), log=run / "resume.log")
    _assert_clean(text, "DMD resume")
    assert code == 0, text[-3000:]
    assert f"[simpletuner-dmd] restored dmd state from {ckpt} at step 2" in text, text[-3000:]
    assert "[simpletuner-dmd] step 3: " in text and "[simpletuner-dmd] step 4: " in text
    state = json.loads((out / "checkpoint-4" / "dmd" / "state.json").read_text())
    assert state == {"generator_updates": 2, "critic_updates": 4, "fake_score_type": "lora",
                     "regression_latent_shape": None}  # the regression term is off
    print(f"DMD resume ({'simpletuner train' if V4 else 'launcher'}), 2 more steps: {seconds:.0f} s")


def _assert_ema_validated(text: str) -> None:
    """The test-only witness (``site/sitecustomize.py``): every validation left the student bit-identical, and the
    EMA's weights were the ones validated at least once (they differ from the student's once the EMA has moved)."""
    checks = re.findall(r"\[validation-check\] step=(\d+) student_unchanged=(True|False)", text)
    assert checks and all(ok == "True" for _, ok in checks), checks
    assert "[ema-check] swapped=True" in text, "the EMA's weights were never the ones validated"
    assert "EMA restore parameter count mismatch" not in text and "Error generating validation" not in text


def test_a_user_error_inside_simpletuner_is_a_failing_exit_status(job):
    root, write = job
    config = write("bad", output_dir=str(root / "out-bad"), max_train_steps=1, distillation_method="dmd",
                   distillation_config="{'dmd': {'fake_score_guidance_scale': -1.0}}")
    code, text, _ = _venv_python("--config", str(config), log=root / "bad.log")
    assert "distillation_config.fake_score_guidance_scale: must be in [0, inf], got -1.0" in text, text[-3000:]
    # found right after SimpleTuner parsed its config, before it loads a model (patch.py's check_parsed_config); the
    # `simpletuner train` command refuses it before it launches anything (test_quickstart.py)
    assert "Loading AutoencoderKLWan" not in text and "Loading UMT5" not in text, text[-3000:]
    if V4:  # 4.x re-raises: the launcher prints the plugin's user error as one line and exits 2, no traceback
        assert code == 2 and "Traceback" not in text, text[-3000:]
    else:  # 3.1.6's train.py swallows it; the launcher still fails
        assert code == 1 and "[simpletuner-dmd] error: SimpleTuner's training did not finish" in text, text[-3000:]


# --------------------------------------------------------------------------- SimpleTuner's own `simpletuner train`


def _result(proc: subprocess.CompletedProcess) -> dict:
    import re

    found = re.search(r"RESULT<(.*?)>RESULT", proc.stdout)
    assert found, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(found.group(1))


def test_the_import_hook_is_lazy_and_routes_only_the_plugins_names(job):
    """At interpreter start the hook imports nothing heavy; once SimpleTuner's trainer module is imported, the plugin's
    names (the example third-party method's included) are served by the bridge — SimpleTuner 4.x's class hooks too —
    and SimpleTuner's own names stay SimpleTuner's. (``SIMPLETUNER_DMD_DISABLE=1``, which leaves SimpleTuner untouched,
    is what the plain-LoRA baseline runs with.)"""
    root, _ = job
    probe = "import sys; print(sorted(m for m in ('torch', 'simpletuner', 'simpletuner_dmd') if m in sys.modules))"
    start = subprocess.run([str(PYTHON), "-c", probe], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0 and start.stdout.strip() == "[]", start.stdout + start.stderr
    check = """
import json
from simpletuner.helpers.training.trainer import Trainer
from simpletuner.helpers.distillation.factory import DistillerFactory as F
from simpletuner.simpletuner_sdk.server.services.field_registry.registry import field_registry
choices = [c.get("value") if isinstance(c, dict) else c for c in field_registry._fields["distillation_method"].choices]
out = {"choices": choices, "patched": bool(getattr(F.create_distiller, "_simpletuner_dmd_patched", False))}
if hasattr(F, "adapter_dropout_override") and out["patched"]:  # SimpleTuner 4.x, hook on
    out["dropout"] = {m: F.adapter_dropout_override(m) for m in ("dmd", "guidance_distill", "perflow")}
    out["requirements"] = {m: sorted(F.training_batch_requirements(m, {})) for m in ("dmd", "guidance_distill")}
    F.prepare_model_for_adapter("guidance_distill", None, {})
print("RESULT<" + json.dumps(out) + ">RESULT")
"""
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    served = subprocess.run([str(PYTHON), "-c", check], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    result = _result(served)
    assert result["patched"] and {"dmd", "lcm", "dcm", "guidance_distill"} <= set(result["choices"])
    assert served.stdout.count("[simpletuner-dmd] serving distillation_method ") == 1
    assert "guidance_distill (simpletuner-dmd-guidance-distill 0.1.0)" in served.stdout
    if V4:
        # the plugin leaves lora_dropout alone; SimpleTuner's own perflow still forces 0
        assert result["dropout"] == {"dmd": None, "guidance_distill": None, "perflow": 0.0}
        assert result["requirements"] == {"dmd": [], "guidance_distill": []}

QUICKSTART_DISTILLATION = json.loads((REPO / "config_examples/wan-dmd-quickstart/config.json").read_text())[
    "distillation_config"]  # the DMD quickstart's flat object: 21 DMD keys
METHOD_CONFIGS = {  # LCM and DCM: the quickstart's flat DMD config with only distillation_method changed
    "lcm": QUICKSTART_DISTILLATION,
    "dcm": QUICKSTART_DISTILLATION,
    "guidance_distill": "{'guidance_distill': {'guidance_scale': 3.0}}",
}
METHOD_EMA = {"lcm": "ema_only", "dcm": "none"}  # with the DMD tests' ema_only and comparison: every mode once
METHOD_STATE = {"lcm": "lcm", "dcm": "dcm", "guidance_distill": None}  # the folder each method saves, if any


@needs_v4
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_simpletuner_train_runs_every_plugin_method(job, method):
    """LCM, DCM and the example third-party method (installed as its own distribution) through ``simpletuner train``,
    two steps with a checkpoint each; then a resume through the launcher to step 3. LCM and DCM take the DMD
    quickstart's flat ``distillation_config`` with only ``distillation_method`` changed (one warning says the DMD keys
    do not apply) and validate at step 2 with EMA on (LCM ``ema_only``, DCM ``none``), the quickstart's 3 validation
    steps included (DCM's 4-phase student validates with its 4, said in one warning)."""
    root, write = job
    run = root / f"st-train-{method}"
    out = run / "out"
    ema = METHOD_EMA.get(method)
    extra = dict(use_ema=True, ema_update_interval=1, ema_validation=ema, validation_disable=False,
                 validation_step_interval=2, validation_prompt="a digit", validation_num_inference_steps=3,
                 validation_resolution="64x64", validation_guidance=1.0, num_validation_images=1,
                 validation_num_video_frames=1, validation_seed=0) if ema else {}
    config = write.config(output_dir=str(out), max_train_steps=2, checkpoint_step_interval=1,
                          distillation_method=method, distillation_config=METHOD_CONFIGS[method], **extra)
    code, text, seconds = _simpletuner_train(run, config, SIMPLETUNER_DMD_TEST_VALIDATION_CHECK="1")
    _assert_clean(text, f"simpletuner train, {method}")
    assert code == 0, text[-3000:]
    if ema:
        assert "[simpletuner-dmd] warning: distillation_config: 21 keys of method dmd (" in text, text[-3000:]
        samples = [p for p in out.rglob("*") if p.suffix in (".png", ".mp4") and "validation" in str(p).lower()]
        assert samples, f"SimpleTuner saved no validation sample under {out}"
        checks = re.findall(r"\[validation-check\] step=(\d+) student_unchanged=(True|False)", text)
        assert checks and all(ok == "True" for _, ok in checks), checks
        assert ("[ema-check] swapped=True" in text) == (ema == "ema_only"), ema
    assert f"[simpletuner-dmd] {method} serves SimpleTuner's distiller interface" in text, text[-3000:]
    assert "[simpletuner-dmd] step 2: " in text and f"{method}_loss=" in text.split("[simpletuner-dmd] step 2: ")[1]
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        assert json.loads((ckpt / "simpletuner_dmd_bridge.json").read_text())["method"] == method
        if METHOD_STATE[method]:
            assert (ckpt / METHOD_STATE[method] / "state.json").is_file()
    assert not _same(_student(out / "checkpoint-1"), _student(out / "checkpoint-2"))
    print(f"simpletuner train, {method}, 2 steps: {seconds:.0f} s")

    resume = write(f"{method}-resume", **{**config, "max_train_steps": 3, "resume_from_checkpoint": "latest",
                                          "validation_disable": True})
    code, text, seconds = _venv_python("--config", str(resume), log=run / "resume.log")
    _assert_clean(text, f"{method} resume")
    assert code == 0, text[-3000:]
    assert f"[simpletuner-dmd] restored {method} state from {out / 'checkpoint-2'} at step 2" in text, text[-3000:]
    assert "[simpletuner-dmd] step 3: " in text and (out / "checkpoint-3").is_dir()
    print(f"{method} resume through the launcher, 1 more step: {seconds:.0f} s")


@needs_v4
def test_two_processes_inside_simpletuner_train(job, tmp_path):
    """``simpletuner train`` with 2 CPU processes (accelerate's torchrun path with gloo): DMD through the bridge on
    each, the same weights on both ranks afterwards (student and fake score), checkpoints and metrics written once."""
    from safetensors.torch import load_file
    import torch

    root, write = job
    run = root / "st-train-2proc"
    out = run / "out"
    witness = tmp_path / "witness"
    config = write.config(output_dir=str(out), max_train_steps=2, checkpoint_step_interval=2,
                          distillation_method="dmd", distillation_config="{'dmd': {'fake_score_lr': 1e-3}}")
    code, text, seconds = _simpletuner_train(run, config, timeout=900, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                                             TRAINING_NUM_PROCESSES="2", ACCELERATE_EXTRA_ARGS="--multi_gpu",
                                             SIMPLETUNER_DMD_TEST_WITNESS=str(witness))
    _assert_clean(text, "simpletuner train, 2 processes")
    assert code == 0, text[-3000:]
    w0 = load_file(str(witness / "weights-rank0.safetensors"))
    w1 = load_file(str(witness / "weights-rank1.safetensors"))
    assert any(".fake_score." in k for k in w0) and any(".default." in k for k in w0)
    assert _same(w0, w1), [k for k in w0 if not torch.equal(w0[k], w1[k])][:5]
    assert any(w0[k].abs().sum() > 0 for k in w0 if "lora_B.default" in k)  # the student trained
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "dmd" / "fake_score.safetensors").is_file()
    assert text.count("[simpletuner-dmd] serving distillation_method ") == 1  # said once, by the main process
    assert text.count("[simpletuner-dmd] step 2: ") == 1
    assert text.count("[simpletuner-dmd] find_unused_parameters: true for DDP") == 1  # set for the fake score
    print(f"simpletuner train, DMD, 2 processes, 2 steps: {seconds:.0f} s")


@needs_v4  # 3.1.6's `simpletuner train` has no check before its launch (its trainer refuses, then exits 0)
def test_simpletuners_fsdp_with_dmd_is_refused_before_the_launch(job):
    """SimpleTuner's FSDP2 (``fsdp_enable``, ``fsdp_version: 2``) with DMD: ``simpletuner train`` launches nothing and
    says why in one line (``docs/simpletuner-multi-gpu.md``: its prepare would leave the fake score's optimizer on
    replaced tensors). On CPU accelerate would in fact run DDP instead of FSDP (it enables FSDP only on GPU-like
    devices), so the refusal is what there is to test here."""
    root, write = job
    run = root / "st-train-fsdp2"
    config = write.config(output_dir=str(run / "out"), max_train_steps=2, fsdp_enable=True, fsdp_version=2,
                          distillation_method="dmd", distillation_config="{'dmd': {'fake_score_lr': 1e-3}}")
    code, text, _ = _simpletuner_train(run, config, timeout=300, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                                       TRAINING_NUM_PROCESSES="2", ACCELERATE_EXTRA_ARGS="--multi_gpu")
    assert code == 2, text[-3000:]
    assert "[simpletuner-dmd] " in text and "nothing was launched" in text
    last = [line for line in text.replace("\x1b[0m", "").splitlines() if line.strip()][-1]
    assert last.startswith("error: fsdp_enable: SimpleTuner's FSDP is not served with distillation_method dmd"), last
    assert not (run / "out").exists()


# --------------------------------------------------------------------------- SimpleTuner's sd3 model family


FLOW_CHECK = re.compile(r"\[flow-check\] latents (\([^)]*\)) cond (\([^)]*\)) max_abs_diff=([-+.\deE]+) "
                        r"max_abs_pred=([-+.\deE]+)")  # SimpleTuner's console colours follow the numbers


@needs_v4
def test_dmd_through_simpletuner_train_with_sd3(tmp_path_factory, tiny_dataset, installed):
    """DMD inside SimpleTuner's own ``simpletuner train`` with SimpleTuner's ``sd3`` model family on a tiny SD3.5
    pipeline: the bridge picks the plugin's ``sd3`` family (its ``simpletuner_names``), turns SimpleTuner's 4-D latents
    and its two text tensors (``encoder_hidden_states`` and the pooled ``add_text_embeds``) into the family's one-frame
    clip and packed condition (``from_simpletuner_batch``), and the family's ``predict_flow`` on SimpleTuner's trained
    transformer (its own ``SD3Transformer2DModel`` with its LoRA) gives what SimpleTuner's ``model_predict`` gave for
    the same batch (the test-only flow check in ``site/sitecustomize.py``). Three steps with a checkpoint each (step 2
    critic-only: the student stays bit-identical), the negative prompt encoded by SimpleTuner's three text encoders,
    and validation in SimpleTuner's SD3 pipeline with DMD's own schedule."""

    root = tmp_path_factory.mktemp("simpletuner-sd3")
    code, text, make_seconds = _venv_python("--make-tiny", "sd3", str(root / "tiny-sd3"), log=root / "make-tiny.log")
    assert code == 0 and (root / "tiny-sd3" / "model_index.json").is_file(), text[-3000:]
    _image_backends(root, tiny_dataset)
    run = root / "st-train-sd3-dmd"
    out = run / "out"
    config = {
        "model_family": "sd3", "model_type": "lora", "lora_type": "standard", "lora_rank": 4, "lora_alpha": 4,
        "lora_dropout": 0.0,  # the flow check compares two forwards of the student: no dropout draw between them
        "pretrained_model_name_or_path": str(root / "tiny-sd3"), "data_backend_config": str(root / "backends.json"),
        "optimizer": "torch-adamw", "mixed_precision": "no", "base_model_precision": "no_change",
        "report_to": "tensorboard", "disable_benchmark": True, "num_train_epochs": 0, "train_batch_size": 1,
        "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0, "seed": 0, "resolution": 64,
        "resolution_type": "pixel", "output_dir": str(out), "max_train_steps": 3, "checkpoint_step_interval": 1,
        "distillation_method": "dmd",
        "distillation_config": "{'dmd': {'generator_update_interval': 2, 'fake_score_lr': 1e-3}}",
        "validation_negative_prompt": "blurry, low quality", "validation_disable": False,
        "validation_step_interval": 3, "validation_prompt": "a digit", "validation_num_inference_steps": 3,
        "validation_resolution": "64x64", "validation_guidance": 1.0, "num_validation_images": 1,
        "validation_seed": 0,
    }
    code, text, seconds = _simpletuner_train(run, config, SIMPLETUNER_DMD_TEST_FLOW_CHECK="1")
    _assert_clean(text, "simpletuner train, sd3, DMD")
    assert code == 0, text[-3000:]
    assert "[simpletuner-dmd] negative prompt encoded with SimpleTuner's text encoder" in text, text[-3000:]
    assert "[simpletuner-dmd] dmd serves SimpleTuner's distiller interface; family sd3; student adapter 'default'" \
        in text, text[-3000:]
    # SimpleTuner's sd3 LoRA targets (to_q/k/v/out.0 of both attentions of the tiny model's 2 blocks): 24 tensors
    assert "[simpletuner-dmd] SimpleTuner's optimizer holds the student's 24 tensors; the method's own 24 are left" \
        in text, text[-3000:]
    # the family's call on SimpleTuner's transformer is SimpleTuner's own: one check per micro-batch
    checks = FLOW_CHECK.findall(text)
    assert len(checks) == 3, text[-3000:]
    for latents, cond, diff, pred in checks:
        # (B, 16, 1, h, w); 1 pooled row + 77 CLIP + 154 T5 rows (SimpleTuner's sd3 tokenizer_max_length), T5 width
        assert (latents, cond) == ("(1, 16, 1, 8, 8)", "(1, 232, 48)")
        assert float(diff) <= 1e-5 * max(1.0, float(pred)), checks
    _assert_three_dmd_steps(text, out)
    assert json.loads((out / "checkpoint-3" / "simpletuner_dmd_bridge.json").read_text())["global_step"] == 3
    assert json.loads((out / "checkpoint-3" / "dmd" / "state.json").read_text())["critic_updates"] == 3
    student = _student(out)
    assert student and not any("fake_score" in k for k in student)
    assert "[simpletuner-dmd] validation samples with dmd's own schedule: FewStepFlowScheduler, timesteps " \
           "1000, 757, 522" in text, text[-3000:]
    assert list(out.glob("validation_images/step_3_*.png")), f"SimpleTuner saved no validation image under {out}"
    print(f"simpletuner train, sd3, DMD, 3 steps with validation: {seconds:.0f} s (tiny SD3 made in "
          f"{make_seconds:.0f} s)")
