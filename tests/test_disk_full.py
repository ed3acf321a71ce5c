"""A full disk during a checkpoint or the final export is one clear line, and nothing is lost: the last complete
checkpoint stays intact, and a run with space again resumes from it. ``output_dir`` is a small tmpfs (CI runs as
root); where mounting is not allowed the test skips, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # three real runs on the tiny model


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()

    def resize(size: str) -> Path:
        option = "remount,size=" + size if os.path.ismount(mount) else "size=" + size
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", option, "tmpfs", str(mount)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): not verified")
        return mount

    yield resize
    if os.path.ismount(mount):
        subprocess.run(["umount", str(mount)], check=False)


def _train(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simpletuner_dmd", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "offline"})


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def _size_of(folder: Path) -> int:
    """Bytes on disk (whole blocks, as tmpfs counts them) of the files under ``folder``."""
    return sum(max(p.stat().st_blocks * 512, 4096) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(job, small_disk, where):  # noqa: F811
    # how much one checkpoint takes, from a run on the ordinary disk
    probe = Path(json.loads(job(max_train_steps=1, checkpoint_step_interval=1, validation_disable=True)
                            .read_text())["output_dir"])
    assert _train(probe.parent / "config.json").returncode == 0
    one = _size_of(probe / "checkpoint-1")
    export = _size_of(probe) - one  # the LoRA files, its scheduler, the card: far smaller than a checkpoint
    # room for exactly two checkpoints (and, for the export case, three but not the export beside them)
    room = 2 * one + one // 2 if where == "checkpoint" else 3 * one + export // 3
    out = small_disk(f"{room}")
    config = job(output_dir=str(out), max_train_steps=3 if where == "export" else 4, checkpoint_step_interval=1,
                 checkpoints_total_limit=None, validation_disable=True, report_to="none")
    proc = _train(config)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no space left" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    kept = _checkpoints(out)
    assert kept == (["checkpoint-1", "checkpoint-2"] if where == "checkpoint" else
                    ["checkpoint-1", "checkpoint-2", "checkpoint-3"]), kept
    assert ("while writing the final export" if where == "export" else "while writing checkpoint-3") in errors[0]
    assert errors[0].endswith(f"resume from checkpoint-{len(kept)}")  # the line names what a resume starts from
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no half-written export under the final name

    # with space again, the same command resumes from the last complete checkpoint and finishes
    small_disk(f"{room * 4}")
    proc = _train(config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from {out / kept[-1]}" in proc.stdout + proc.stderr
    assert (out / "pytorch_lora_weights.safetensors").is_file()
