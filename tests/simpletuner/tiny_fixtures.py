"""Tiny pipelines of SimpleTuner's own flow-matching families (``hosts/simpletuner/tiny_models.py``), built once per
session by the SimpleTuner venv's python, and what a run on them needs: the SimpleTuner keys of each, a data backend
file (images, and 9-frame mp4 clips for the video families) and a plain LoRA config. ``conftest.py`` imports the
fixtures; tests import the helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import image_backends, venv_python

# name (a key of tiny_models.TINY_BUILDERS) -> SimpleTuner's keys for it, and its video backend's ``video`` entry
# (None: images only). SimpleTuner reads a GIF as one image, so video families train on mp4 clips.
TINY_FAMILIES = {
    "flux": ({"model_family": "flux", "model_flavour": "dev"}, None),
    "qwen_image": ({"model_family": "qwen_image", "model_flavour": "v1.0"}, None),
    "ltxvideo": ({"model_family": "ltxvideo", "model_flavour": "0.9.0"}, {}),
    "wan-i2v": ({"model_family": "wan", "model_flavour": "i2v-14b-2.1"}, {"is_i2v": True}),
}


def mp4_clips(folder: Path, tiny_dataset: Path, count: int = 2) -> Path:
    """The tiny dataset's first ``count`` nine-frame 64 px GIFs as mp4 clips with their captions, in ``folder``."""
    import imageio.v3 as iio
    import numpy as np

    folder.mkdir(parents=True)
    for gif in sorted(Path(tiny_dataset).glob("*.gif"))[:count]:
        frames = np.asarray(iio.imread(gif))
        frames = np.repeat(frames[..., None], 3, -1) if frames.ndim == 3 else frames[..., :3]
        iio.imwrite(folder / f"{gif.stem}.mp4", frames, fps=8, codec="libx264", macro_block_size=1)
        shutil.copy(gif.with_suffix(".txt"), folder)
    return folder


def tiny_family_backends(root: Path, tiny_dataset: Path, name: str) -> Path:
    """``root/backends.json`` for the tiny family ``name``: four captioned 64 px images (``harness.image_backends``)
    and, for a video family, two 9-frame mp4 clips in ``root/clips``."""
    backends = image_backends(root, tiny_dataset)
    video = TINY_FAMILIES[name][1]
    if video is not None:
        entries = json.loads(backends.read_text())
        entries.insert(1, {
            "id": "tiny-videos", "type": "local", "dataset_type": "video",
            "instance_data_dir": str(mp4_clips(root / "clips", tiny_dataset)), "caption_strategy": "textfile",
            "metadata_backend": "discovery", "cache_dir_vae": str(root / "cache/vae-video"), "resolution": 64,
            "resolution_type": "pixel", "minimum_image_size": 0, "repeats": 0, "crop": False,
            "video": {"num_frames": 9, "min_frames": 9, "max_frames": 9, **video}})
        backends.write_text(json.dumps(entries))
    return backends


def plain_lora_config(name: str, model: Path, backends: Path, out: Path, **overrides) -> dict:
    """SimpleTuner's own LoRA (rank 4, no distillation) on the tiny ``name`` for 2 steps at 64 px, on a CPU: fp32,
    torch AdamW, no validation, no tracker."""
    return {
        **TINY_FAMILIES[name][0], "model_type": "lora", "lora_type": "standard", "lora_rank": 4, "lora_alpha": 4,
        "pretrained_model_name_or_path": str(model), "data_backend_config": str(backends), "output_dir": str(out),
        "optimizer": "torch-adamw", "mixed_precision": "no", "base_model_precision": "no_change",
        "validation_disable": True, "report_to": "none", "disable_benchmark": True, "num_train_epochs": 0,
        "max_train_steps": 2, "train_batch_size": 1, "learning_rate": 1e-4, "lr_scheduler": "constant",
        "lr_warmup_steps": 0, "checkpoint_step_interval": 100, "seed": 0, "resolution": 64,
        "resolution_type": "pixel", **overrides,
    }


@pytest.fixture(scope="session")
def tiny_st(tmp_path_factory, installed):
    """``tiny_st(name)``: the folder of the tiny SimpleTuner pipeline ``name`` (a key of ``TINY_FAMILIES``), saved
    by the venv's own diffusers/transformers; built on first use, once per session."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny-st")

    def tiny(name: str) -> Path:
        if name not in built:
            folder = root / name
            code, text, _ = venv_python("--make-tiny-st", name, str(folder), log=root / f"make-{name}.log")
            assert code == 0 and (folder / "model_index.json").is_file(), text[-3000:]
            built[name] = folder
        return built[name]

    return tiny


@pytest.fixture(scope="session")
def tiny_flux(tiny_st) -> Path:
    return tiny_st("flux")


@pytest.fixture(scope="session")
def tiny_qwen_image(tiny_st) -> Path:
    return tiny_st("qwen_image")


@pytest.fixture(scope="session")
def tiny_ltxvideo(tiny_st) -> Path:
    return tiny_st("ltxvideo")


@pytest.fixture(scope="session")
def tiny_wan_i2v(tiny_st) -> Path:
    return tiny_st("wan-i2v")
