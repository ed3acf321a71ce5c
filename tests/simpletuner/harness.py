"""What the SimpleTuner integration tests share: where the SimpleTuner venv is, how a run is started (the launcher or
test entry point in that venv, or SimpleTuner's own ``simpletuner train``), and how its outputs are read. The fixtures
that build the tiny job are in ``conftest.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("SIMPLETUNER_VENV", REPO / "work" / "simpletuner-4.10.1")).resolve()  # runs use own cwd
PYTHON = VENV / "bin" / "python"
RUNNER = Path(__file__).resolve().parent / "run_simpletuner.py"
STOCK = Path(__file__).resolve().parent / "stock_pipeline.py"  # a run's student in the family's stock pipeline
SITE = Path(__file__).resolve().parent / "site"  # sitecustomize: the CPU shims in every `simpletuner train` process
MARKER = VENV / ".simpletuner-version"
VERSION = MARKER.read_text().strip() if MARKER.is_file() else ("3.1.6" if PYTHON.is_file() else "")
V4 = VERSION.startswith("4.")

SKIP_WITHOUT_VENV = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON.is_file(), reason=f"no SimpleTuner venv at {VENV}: run "
                       "scripts/install_simpletuner_env.sh (3-5 min) or set SIMPLETUNER_VENV"),
]
needs_v4 = pytest.mark.skipif(not V4, reason=f"SimpleTuner {VERSION}: this is a 4.x feature")


def venv_python(*args: str, log: Path, timeout: int = 600, **env: str) -> tuple[int, str, float]:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([str(PYTHON), str(RUNNER), *args], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **env})
    text = log.read_text(errors="replace").replace("\r", "\n")
    return proc.returncode, text, time.monotonic() - start


def simpletuner_train(folder: Path, config: dict, *, cwd: Path | None = None, timeout: int = 600, **env: str
                      ) -> tuple[int, str, float]:
    """SimpleTuner's own command, as a user runs it: ``folder/config.json``, ``simpletuner train`` run in ``folder``
    (or in ``cwd``, where SimpleTuner finds ``config/config.json``), which runs ``accelerate launch …/train.py``; the
    plugin's import hook does the rest. CPU: no mixed precision unless ``MIXED_PRECISION`` says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    log = folder / "simpletuner-train.log"
    start = time.monotonic()
    run_env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(SITE),
               "MIXED_PRECISION": "no", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **env}
    with open(log, "w") as out:
        proc = subprocess.run([str(VENV / "bin" / "simpletuner"), "train"], stdout=out, stderr=subprocess.STDOUT,
                              cwd=cwd or folder, timeout=timeout, env=run_env)
    return proc.returncode, log.read_text(errors="replace").replace("\r", "\n"), time.monotonic() - start


def stock_sample(family: str, base: Path, output_dir: Path, folder: Path, *, prompt: str, seed: int, size: str,
                 steps: int, guidance: float, **extra) -> dict:
    """The student of the run in ``output_dir`` (its LoRA and ``scheduler/``) sampled by the family's stock diffusers
    pipeline in the venv (``stock_pipeline.py``), as SimpleTuner's validation sampled it; ``folder`` gets
    ``seeded.npy``/``.png``, ``global-rng.npy``/``.png`` and ``result.json``, whose content is returned. ``extra``:
    more options of the script (``frames=9``, ``image=…``, ``negative_prompt=…``; ``""``: a flag)."""
    options = [f"--{k.replace('_', '-')}" + (f"={v}" if v != "" else "") for k, v in extra.items()]
    log = folder / "stock-pipeline.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([str(PYTHON), str(STOCK), family, str(base), str(output_dir),
                               str(folder / "result.json"), f"--prompt={prompt}", f"--seed={seed}", f"--size={size}",
                               f"--steps={steps}", f"--guidance={guidance}", *options], stdout=out,
                              stderr=subprocess.STDOUT, cwd=folder, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    print(f"{family}: stock pipeline run {time.monotonic() - start:.0f} s")
    return json.loads((folder / "result.json").read_text())


def assert_clean(text: str, what: str) -> None:
    assert "Traceback" not in text and "Failed to run training" not in text, f"{what} crashed:\n{text[-4000:]}"


def image_backends(root: Path, tiny_dataset) -> Path:
    """Four captioned 64 px images of the tiny dataset in ``root/data`` and SimpleTuner's backend file for them (an
    image backend and a text-embeds backend), ``root/backends.json``."""
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
    return root / "backends.json"



def scalars(out: Path, tag: str) -> dict[int, float]:
    """Every value SimpleTuner logged under ``tag`` to its tensorboard tracker, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(out.glob("logs/**/events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values



def student(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

