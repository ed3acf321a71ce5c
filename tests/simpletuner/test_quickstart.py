"""The DMD quickstart's ``config.json`` as users write it, through SimpleTuner 4.10.1's own ``simpletuner train``.

``config_examples/wan-dmd-quickstart/config.json`` is the quickstart's config verbatim. The run below changes only
what ``QUICKSTART_CHANGES`` lists, each with its reason (paths, sizes, and what SimpleTuner itself refuses or a
machine without a network cannot do); every other key acts as SimpleTuner users expect: int8-quanto base and text
encoder, bf16 mixed precision, the ``adamw_bf16`` optimizer, EMA updated every 5 steps and validated ``ema_only``
with DMD's 3-step schedule, the user's prompt library, wandb (offline) with its videos, a webhook (a receiver on
loopback), checkpoints every N steps with ``checkpoints_total_limit`` 3, and ``resume_from_checkpoint: latest``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import (REPO, SKIP_WITHOUT_VENV, VENV, VERSION, assert_clean, needs_v4, same, simpletuner_train,
                     student)

pytestmark = [*SKIP_WITHOUT_VENV, needs_v4]

QUICKSTART = REPO / "config_examples" / "wan-dmd-quickstart" / "config.json"

# Every key of the quickstart this run changes, and why. Nothing else is touched.
QUICKSTART_CHANGES = {
    "pretrained_model_name_or_path": "no model hub here: a tiny Wan 2.1 saved locally",
    "pretrained_t5_model_name_or_path": "the same local folder",
    "data_backend_config": "the test's own backends: 6 captioned images and 4 nine-frame clips (an image and a video "
                           "backend together; the quickstart's data is video)",
    "user_prompt_library": "SimpleTuner 4.10.1 reads a file of one's own prompts from user_prompt_library; its "
                           "validation_prompt_library names a built-in library and refuses a path (the plugin says so "
                           "before launching: test_the_quickstart_as_written_is_refused_before_launch)",
    "validation_prompt_library": "moved to user_prompt_library (above)",
    "lr_scheduler": "SimpleTuner 4.10.1 refuses cosine_with_min_lr (the plugin says so before launching); cosine is "
                    "the nearest it accepts",
    "push_to_hub": "no model hub reachable from here",
    "push_checkpoints_to_hub": "no model hub reachable from here",
    "webhook_config": "the test's webhook file: a raw webhook to a receiver on loopback",
    "output_dir": "inside the test's folder",
    "resolution": "64 px (pixel_area) for a CPU",
    "validation_resolution": "64x64 for a CPU",
    "validation_num_video_frames": "9 frames for a CPU",
    "lr_warmup_steps": "1 of the run's 8 steps (the quickstart warms up over 100 of its 4000)",
    "max_train_steps": "6, then 8 after the resume (the quickstart: 4000)",
    "checkpoint_step_interval": "2, so the 8 steps write 4 checkpoints and checkpoints_total_limit 3 acts",
    "validation_step_interval": "3, so validation runs twice before the EMA moves (step 5) and after",
}


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _Receiver.received
    server.shutdown()


def _clips(folder: Path, tiny_dataset: Path) -> None:
    """The tiny dataset's nine-frame GIFs as mp4 clips (SimpleTuner reads a GIF as one image)."""
    import imageio.v3 as iio
    import numpy as np

    folder.mkdir(parents=True)
    for gif in sorted(tiny_dataset.glob("*.gif")):
        frames = np.asarray(iio.imread(gif))
        frames = np.repeat(frames[..., None], 3, -1) if frames.ndim == 3 else frames[..., :3]
        iio.imwrite(folder / f"{gif.stem}.mp4", frames, fps=8, codec="libx264", macro_block_size=1)
        shutil.copy(gif.with_suffix(".txt"), folder)


@pytest.fixture(scope="module")
def quickstart(job, tiny_dataset, tmp_path_factory, webhook):
    """A user's folder with the quickstart's layout: ``config/config.json`` and ``config/wan/*`` files."""
    job_root, _ = job
    root = tmp_path_factory.mktemp("quickstart")
    (root / "config" / "wan").mkdir(parents=True)
    images, videos = root / "images", root / "videos"
    images.mkdir()
    for png in sorted(tiny_dataset.glob("*.png")):
        shutil.copy(png, images)
        shutil.copy(png.with_suffix(".txt"), images)
    _clips(videos, tiny_dataset)
    common = {"type": "local", "caption_strategy": "textfile", "metadata_backend": "discovery", "resolution": 64,
              "resolution_type": "pixel", "minimum_image_size": 0, "repeats": 0, "crop": False}
    (root / "config/wan/multidatabackend.json").write_text(json.dumps([
        {"id": "images", "dataset_type": "image", "instance_data_dir": str(images), "cache_dir_vae": "cache/vae-i",
         **common},
        {"id": "videos", "dataset_type": "video", "instance_data_dir": str(videos), "cache_dir_vae": "cache/vae-v",
         "video": {"num_frames": 9, "min_frames": 9}, **common},
        {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local", "default": True,
         "cache_dir": "cache/text"},
    ]))
    (root / "config/wan/validation_prompts_dmd.json").write_text(json.dumps({"cow": "a cow", "mouse": "a mouse"}))
    server, _ = webhook
    (root / "config/wan/webhook.json").write_text(json.dumps({
        "webhook_type": "raw", "callback_url": f"http://127.0.0.1:{server.server_address[1]}/hook",
        "log_level": "info"}))
    config = json.loads(QUICKSTART.read_text())
    tiny = str(job_root / "tiny-wan")
    changed = {
        "pretrained_model_name_or_path": tiny, "pretrained_t5_model_name_or_path": tiny,
        "user_prompt_library": config["validation_prompt_library"], "lr_scheduler": "cosine",
        "push_to_hub": False, "push_checkpoints_to_hub": False,
        "output_dir": "output/wan-dmd", "resolution": 64, "validation_resolution": "64x64",
        "validation_num_video_frames": 9, "lr_warmup_steps": 1, "max_train_steps": 6, "checkpoint_step_interval": 2,
        "validation_step_interval": 3,
    }
    config.pop("validation_prompt_library")
    config.update(changed)
    # the keys kept by name with a file of the test's own under the same path
    assert config["data_backend_config"] == "config/wan/multidatabackend.json"
    assert config["webhook_config"] == "config/wan/webhook.json"
    assert set(changed) | {"validation_prompt_library", "data_backend_config", "webhook_config"} == set(
        QUICKSTART_CHANGES), "every change is listed with its reason"
    return root, config


def _run(root: Path, config: dict, log: str, **env: str) -> tuple[int, str, float]:
    """``simpletuner train`` in the user's folder (config in ``config/config.json``, as the quickstart has it), with
    bf16 mixed precision as written and wandb offline."""
    folder = root / "config"
    code, text, seconds = simpletuner_train(folder, config, MIXED_PRECISION="bf16", WANDB_MODE="offline",
                                            HF_HUB_OFFLINE="1", SIMPLETUNER_DMD_TEST_VALIDATION_CHECK="1",
                                            SIMPLETUNER_DMD_TEST_FLOW_CHECK="1", cwd=root, **env)
    (root / log).write_text(text)
    return code, text, seconds


def _ema_state(checkpoint: Path) -> dict:
    import torch

    state = torch.load(checkpoint / "transformer_ema" / "ema_model.pt", map_location="cpu", weights_only=False)
    return {k: v for k, v in state.items() if k.startswith("shadow_params.")}


def test_the_quickstart_trains_validates_with_ema_and_resumes_inside_simpletuner(quickstart, webhook):
    root, config = quickstart
    code, text, seconds = _run(root, config, "run-1.log")
    assert_clean(text, "the quickstart")
    assert code == 0, text[-3000:]
    assert "EMA restore parameter count mismatch" not in text and "Error generating validation" not in text
    out = root / "output" / "wan-dmd"

    # int8-quanto and the method's own schedule, as written
    assert "Quantising WanTransformer3DModel. Using int8-quanto." in text
    assert "Quantising UMT5EncoderModel. Using int8-quanto." in text
    assert "[simpletuner-dmd] validation samples with dmd's own schedule: FewStepFlowScheduler, timesteps " \
           "1000, 757, 522" in text, text[-3000:]
    # both backends trained: one-frame images and nine-frame clips (3 latent frames)
    shapes = set(re.findall(r"\[flow-check\] latents \((\d+, 16, \d+), 8, 8\)", text))
    assert {"1, 16, 1", "1, 16, 3"} <= shapes, shapes

    # validation: ema_only swaps the EMA in (once the EMA has moved) and leaves the student bit-identical after it
    checks = re.findall(r"\[validation-check\] step=(\d+) student_unchanged=(True|False)", text)
    assert checks and all(ok == "True" for _, ok in checks), checks
    assert "[ema-check] swapped=True" in text, "the EMA weights were never the ones validated"
    for step in (3, 6):
        for name in ("cow", "mouse", "validation"):
            assert (out / "validation_images" / f"step_{step}_{name}_0_64x64.mp4").is_file(), name

    # EMA every 5 steps: unchanged between checkpoints 2 and 4, moved by step 6; checkpointed each time
    ema = {n: _ema_state(out / f"checkpoint-{n}") for n in (2, 4, 6)}
    assert len(ema[2]) == 32  # the student's LoRA tensors only: SimpleTuner's EMA does not hold the fake score
    assert same(ema[2], ema[4]) and not same(ema[4], ema[6])
    # wandb (offline) has the validation videos; the webhook receiver heard the run
    videos = list((root / "wandb").glob("offline-run-*/files/media/videos/*.mp4"))
    assert len(videos) >= 6, videos
    _, received = webhook
    assert received, "the webhook receiver got nothing"

    # resume latest to step 8: the fake score's state and SimpleTuner's EMA come back; checkpoints_total_limit 3
    code, text, resumed = _run(root, {**config, "max_train_steps": 8}, "run-2.log")
    assert_clean(text, "the quickstart's resume")
    assert code == 0, text[-3000:]
    assert re.search(r"\[simpletuner-dmd\] restored dmd state from \S*output/wan-dmd/checkpoint-6 at step 6", text), \
        text[-3000:]
    assert "[simpletuner-dmd] step 7: " in text and "[simpletuner-dmd] step 8: " in text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    # SimpleTuner's EMA came back from checkpoint-6 (no update at steps 7 and 8: one every 5 steps)
    assert same(_ema_state(out / "checkpoint-6"), _ema_state(out / "checkpoint-8"))
    assert not same(student(out / "checkpoint-6"), student(out / "checkpoint-8"))
    print(f"the quickstart through simpletuner train {VERSION}: 6 steps {seconds:.0f} s, resume to 8 {resumed:.0f} s")


def test_the_quickstart_as_written_is_refused_before_launch_with_the_values_simpletuner_accepts(quickstart):
    """The quickstart unchanged but for paths, with a misspelt key, reversed steps and a LyCORIS adapter added:
    ``simpletuner train`` launches nothing; the ``error:`` lines (every problem at once) are the last thing printed."""
    root, config = quickstart
    written = json.loads(QUICKSTART.read_text())
    bad = {**written, **{k: config[k] for k in ("pretrained_model_name_or_path", "pretrained_t5_model_name_or_path")},
           "lora_type": "lycoris",
           "distillation_config": {**written["distillation_config"], "fake_score_lrr": 1e-5,
                                   "dmd_denoising_steps": "522,757,1000"}}
    folder = root / "refused"
    code, text, seconds = simpletuner_train(folder / "config", bad, cwd=folder)
    assert code == 2, text[-3000:]
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert lines[-len(errors):] == errors, lines[-10:]  # the error lines are the last thing printed
    assert "Traceback" not in text and "accelerate" not in text.split("nothing was launched")[-1]
    expected = [
        "error: lr_scheduler: SimpleTuner 4.10.1 refuses 'cosine_with_min_lr'; it accepts linear, sine, cosine",
        "error: validation_prompt_library: SimpleTuner 4.10.1 refuses 'config/wan/validation_prompts_dmd.json'",
        "error: lora_type: 'lycoris' is not served by distillation_method dmd",
        "error: distillation_config.fake_score_lrr: unknown key (did you mean 'fake_score_lr'?)",
        "error: distillation_config.dmd_denoising_steps: timesteps must be strictly decreasing",
    ]
    for start in expected:
        assert any(e.startswith(start) for e in errors), (start, errors)
    assert not (folder / "output").exists()  # nothing ran
    print(f"refused before launch in {seconds:.1f} s")

    # the same verdict from the validator in SimpleTuner's environment, without SimpleTuner's command
    path = folder / "config" / "config.json"
    proc = subprocess.run([str(VENV / "bin" / "simpletuner-dmd"), "validate-config", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    found = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(found) == sorted(errors), (found, errors)
