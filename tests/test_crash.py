"""Crash safety: SIGKILL at random moments — some in the middle of a checkpoint save — never leaves a checkpoint that
looks complete but is not; every restart resumes from the last complete one; the total limit holds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simpletuner_dmd.hosts.reference.checkpoint import MARKER

pytestmark = pytest.mark.slow  # SIGKILL ten real runs: `pytest -m slow` or .ci/run

KILLS = 10
REQUIRED = ("student.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json", "rng-0.json",
            "trainer_state.json", "dmd/fake_score.safetensors", "dmd/fake_score_optimizer.json", "dmd/state.json",
            "pytorch_lora_weights.safetensors", MARKER)


def _start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simpletuner_dmd", "train", "--config", str(config)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("the trainer did not reach the expected point")


def _published(out: Path) -> list[int]:
    """Steps of the checkpoint folders under their public name, read-only (list_checkpoints would also clean up the
    temporary folder a running trainer is writing)."""
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.is_dir())


def _complete(out: Path) -> list[int]:
    steps = _published(out)
    for step in steps:  # a checkpoint that looks complete has every file
        folder = out / f"checkpoint-{step}"
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        assert not missing, f"{folder} looks complete but lacks {missing}"
    return steps


def test_sigkill_at_random_moments(job, tmp_path):  # noqa: F811
    rng = random.Random(1234)
    config = job(max_train_steps=200, checkpoint_step_interval=1, checkpoints_total_limit=3,
                 validation_disable=True, report_to="none")
    out = Path(json.loads(config.read_text())["output_dir"])
    during_save = 0
    resumed_ok = 0
    for kill in range(KILLS):
        before = _complete(out) if out.exists() else []
        log = tmp_path / f"run-{kill}.log"
        proc = _start(config, log)
        # wait until the run has resolved its resume point (which also clears a killed save's temporary folder)
        started = _wait_for(lambda: any(m in log.read_text() for m in ("resumed from", "starting from step 0")), proc)
        assert started, log.read_text()[-3000:]
        if kill % 2:  # kill inside a checkpoint save: as soon as a temporary checkpoint folder appears
            _wait_for(lambda: any(out.glob(".checkpoint-*.tmp")), proc)
            during_save += any(out.glob(".checkpoint-*.tmp"))
        else:  # or at a random moment of training, once it has made progress
            _wait_for(lambda: max([0, *_published(out)]) > max([0, *before]), proc)
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = log.read_text()
        # the run resumed from the last complete checkpoint that existed when it started
        if before:
            assert f"resumed from {out / f'checkpoint-{max(before)}'}" in text, text[-2000:]
            resumed_ok += 1
        after = _complete(out)
        assert len(after) <= 3, after  # checkpoints_total_limit
    assert during_save >= KILLS // 2 - 1 and resumed_ok >= KILLS - 2, (during_save, resumed_ok)

    # and a last, uninterrupted run finishes from where the kills left it
    log = tmp_path / "final.log"
    proc = _start(config.with_name("config.json"), log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert _complete(out)[-1] == 200 and len(_complete(out)) == 3
    assert not list(out.glob(".checkpoint-*"))
