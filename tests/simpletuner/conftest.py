"""Fixtures of the SimpleTuner integration tests (``harness.py`` holds the helpers): the plugin installed in the
SimpleTuner venv, and a tiny Wan job made once per session."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import PYTHON, REPO, image_backends, venv_python
from tiny_fixtures import tiny_flux, tiny_ltxvideo, tiny_qwen_image, tiny_st, tiny_wan_i2v  # noqa: F401


@pytest.fixture(scope="session")
def installed():
    """This checkout's plugin (and the example third-party method) installed in the venv as regular packages, so the
    runs test what is here, with the ``.pth`` hook a ``pip install`` puts in place (a few seconds)."""
    for package in (REPO, REPO / "examples" / "method_plugin"):
        proc = subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                               str(package)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="session")
def job(tmp_path_factory, tiny_dataset, installed):
    """A tiny Wan pipeline saved by the SimpleTuner venv's own diffusers/transformers (this project's newer versions
    write a tokenizer config SimpleTuner 3.1.6's transformers 4.57 cannot load), four captioned 64 px images, and a
    writer of SimpleTuner config files."""
    root = tmp_path_factory.mktemp("simpletuner-job")
    code, text, _ = venv_python("--make-tiny-wan", str(root / "tiny-wan"), log=root / "make-tiny-wan.log")
    assert code == 0 and (root / "tiny-wan" / "model_index.json").is_file(), text[-3000:]
    image_backends(root, tiny_dataset)
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
        path.write_text(json.dumps(config(**overrides), indent=1))
        return path

    def config(**overrides) -> dict:
        return {**base, **overrides}

    write.config = config
    return root, write

