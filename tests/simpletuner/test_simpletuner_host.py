"""Integration: the real SimpleTuner 3.1.6 from PyPI trains DMD through the bridge on CPU, with a tiny local Wan model.

SimpleTuner needs older diffusers/transformers than this project's environment, so it lives in its own venv, made by
``scripts/install_simpletuner_env.sh`` (about 2.5 minutes, 2.8 GB). These tests skip when that venv is absent; point
``SIMPLETUNER_VENV`` at another one to use it. Each run goes through ``run_simpletuner.py`` in that venv, which applies
the test-only CPU shims (``cpu_shims.py``) first.

SimpleTuner's own ``train.py`` exits 0 even when training crashed, so every assertion is on files and log markers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("SIMPLETUNER_VENV", REPO / "work" / "simpletuner-venv")).resolve()  # runs use their own cwd
PYTHON = VENV / "bin" / "python"
RUNNER = Path(__file__).resolve().parent / "run_simpletuner.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON.is_file(), reason=f"no SimpleTuner venv at {VENV}: run "
                       "scripts/install_simpletuner_env.sh (about 2.5 min, 2.8 GB) or set SIMPLETUNER_VENV"),
]


def _venv_python(*args: str, log: Path, timeout: int = 600) -> tuple[int, str, float]:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([str(PYTHON), str(RUNNER), *args], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    text = log.read_text(errors="replace").replace("\r", "\n")
    return proc.returncode, text, time.monotonic() - start


def _assert_clean(text: str, what: str) -> None:
    assert "Traceback" not in text and "Failed to run training" not in text, f"{what} crashed:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_dataset):
    """A tiny Wan pipeline saved by the SimpleTuner venv's own diffusers/transformers (this project's newer versions
    write a tokenizer config SimpleTuner's transformers 4.57 cannot load), four captioned 64 px images, and a writer
    of SimpleTuner config files."""
    root = tmp_path_factory.mktemp("simpletuner-job")
    code, text, _ = _venv_python("--make-tiny-wan", str(root / "tiny-wan"), log=root / "make-tiny-wan.log")
    assert code == 0 and (root / "tiny-wan" / "model_index.json").is_file(), text[-3000:]
    data = root / "data"
    data.mkdir()
    for png in sorted(Path(tiny_dataset).glob("*.png"))[:4]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    (root / "backends.json").write_text(json.dumps([
        {"id": "tiny-images", "type": "local", "dataset_type": "image", "instance_data_dir": str(data),
         "caption_strategy": "textfile", "metadata_backend": "discovery", "cache_dir_vae": str(root / "cache/vae"),
         "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 0, "repeats": 0, "crop": False},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(root / "cache/text")},
    ]))
    base = {
        "model_family": "wan", "model_type": "lora", "lora_type": "standard", "lora_rank": 4, "lora_alpha": 4,
        "pretrained_model_name_or_path": str(root / "tiny-wan"),
        "pretrained_t5_model_name_or_path": str(root / "tiny-wan"), "data_backend_config": str(root / "backends.json"),
        # CPU: fp32 weights and torch AdamW (adamw_bf16 forces bf16 weights), no validation, tensorboard as tracker
        "optimizer": "torch-adamw", "mixed_precision": "no", "base_model_precision": "no_change",
        "validation_disable": True, "report_to": "tensorboard", "disable_benchmark": True,
        "num_train_epochs": 0, "train_batch_size": 1, "learning_rate": 1e-4, "lr_scheduler": "constant",
        "lr_warmup_steps": 0, "checkpoint_step_interval": 2, "seed": 0, "resolution": 64, "resolution_type": "pixel",
        "validation_negative_prompt": "blurry, low quality",
    }

    def write(name: str, **overrides) -> Path:
        path = root / f"{name}.json"
        path.write_text(json.dumps({**base, **overrides}, indent=1))
        return path

    return root, write


def _scalars(out: Path, tag: str) -> dict[int, float]:
    """Every value SimpleTuner logged under ``tag`` to its tensorboard tracker, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(out.glob("logs/**/events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_plain_lora_baseline_runs(job):
    root, write = job
    out = root / "out-plain"
    code, text, seconds = _venv_python("--plain", "--config", str(write("plain", output_dir=str(out),
                                                                        max_train_steps=3)),
                                       log=root / "plain.log")
    _assert_clean(text, "plain LoRA")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir(), text[-3000:]
    assert _scalars(out, "train_loss"), "SimpleTuner logged no train_loss"
    print(f"plain LoRA, 3 steps: {seconds:.0f} s")


def test_dmd_through_the_bridge_checkpoints_and_resumes(job):
    from safetensors.torch import load_file

    root, write = job
    out = root / "out-dmd"
    dmd = "{'dmd': {'generator_update_interval': 2, 'fake_score_lr': 1e-3}}"  # a string: SimpleTuner drops objects
    config = write("dmd", output_dir=str(out), max_train_steps=3, distillation_method="dmd", distillation_config=dmd)
    code, text, seconds = _venv_python("--config", str(config), log=root / "dmd.log")
    _assert_clean(text, "DMD through the bridge")
    assert code == 0, text[-3000:]  # the launcher's exit status is meaningful (SimpleTuner's is always 0)
    assert "[simpletuner-dmd] negative prompt encoded with SimpleTuner's text encoder" in text
    assert "student adapter 'default'" in text
    for step in (1, 2, 3):
        assert f"[simpletuner-dmd] step {step}: " in text, text[-3000:]
    # the metrics reached SimpleTuner's own tracker: dmd_loss on generator steps, fake_score_loss on every step
    dmd_loss, fake_loss = _scalars(out, "dmd_loss"), _scalars(out, "fake_score_loss")
    assert sorted(dmd_loss) == [1, 3] and sorted(fake_loss) == [1, 2, 3], (dmd_loss, fake_loss)
    assert all(v == v for v in [*dmd_loss.values(), *fake_loss.values()])  # no NaN
    # SimpleTuner's checkpoint holds the fake score's state next to its own
    ckpt = out / "checkpoint-2"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    fake = load_file(str(ckpt / "dmd" / "fake_score.safetensors"))
    assert fake and all(".fake_score." in k for k in fake)
    assert (ckpt / "dmd" / "fake_score_optimizer.json").is_file()
    assert json.loads((ckpt / "dmd" / "state.json").read_text())["critic_updates"] == 2
    assert json.loads((ckpt / "simpletuner_dmd_bridge.json").read_text())["global_step"] == 2
    student = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert student and not any("fake_score" in k for k in student)  # SimpleTuner's LoRA is the student's only
    print(f"DMD through the bridge, 3 steps: {seconds:.0f} s")

    # resume from checkpoint-2 and train to step 4: the fake score's state is restored, its counters continue
    config = write("dmd-resume", output_dir=str(out), max_train_steps=4, distillation_method="dmd",
                   distillation_config=dmd, resume_from_checkpoint="checkpoint-2")
    code, text, seconds = _venv_python("--config", str(config), log=root / "dmd-resume.log")
    _assert_clean(text, "DMD resume")
    assert code == 0, text[-3000:]
    assert f"[simpletuner-dmd] restored dmd state from {ckpt} at step 2" in text, text[-3000:]
    assert "[simpletuner-dmd] step 3: " in text and "[simpletuner-dmd] step 4: " in text
    state = json.loads((out / "checkpoint-4" / "dmd" / "state.json").read_text())
    assert state == {"generator_updates": 2, "critic_updates": 4, "fake_score_type": "lora"}
    print(f"DMD resume, 2 more steps: {seconds:.0f} s")


def test_a_crash_inside_simpletuner_is_a_failing_exit_status(job):
    root, write = job
    config = write("bad", output_dir=str(root / "out-bad"), max_train_steps=1, distillation_method="dmd",
                   distillation_config="{'dmd': {'fake_score_guidance_scale': -1.0}}")
    code, text, _ = _venv_python("--config", str(config), log=root / "bad.log")
    assert code == 1, text[-3000:]
    assert "fake_score_guidance_scale" in text and "[simpletuner-dmd] error: SimpleTuner's training did not finish" in text
