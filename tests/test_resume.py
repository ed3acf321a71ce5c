"""Resume equals no interruption: 2N steps straight and N steps + crash + resume give bitwise-identical checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from simpletuner_dmd import hookimpl
from simpletuner_dmd.hosts.reference.trainer import train

N = 3


class Crash(Exception):
    pass


class CrashAfter:
    """Dies in the middle of the run: after step ``step`` has trained but before anything of it is saved."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def distill_metrics(self, step):
        if step.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


def _files(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            out[rel] = load_file(str(path))
        elif path.suffix == ".json" and path.name != "checkpoint.json":  # the marker holds the wall-clock time
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data.pop("state_id", None)  # a random id pairing a state's .json with its .safetensors
            out[rel] = data
    return out


def test_resume_equals_no_interruption(job, tmp_path):  # noqa: F811
    common = dict(max_train_steps=2 * N, checkpoint_step_interval=N, validation_step_interval=N,
                  gradient_accumulation_steps=2, lr_scheduler="cosine_with_min_lr", lr_warmup_steps=1, use_ema=True,
                  ema_update_interval=2, checkpoints_total_limit=None, resume_from_checkpoint="latest",
                  distillation_config={"generator_update_interval": 2, "fake_score_lr": 1e-4})
    straight = train(job(output_dir=str(tmp_path / "straight"), **common))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Crash):
        train(job(output_dir=str(interrupted), **common), plugins=(CrashAfter(N),))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == [f"checkpoint-{N}"]
    train(job(output_dir=str(interrupted), **common))

    a, b = _files(straight / f"checkpoint-{2 * N}"), _files(interrupted / f"checkpoint-{2 * N}")
    assert a.keys() == b.keys()
    for name in ("student.safetensors", "optimizer.safetensors", "ema.safetensors", "rng-0.safetensors",
                 "dmd/fake_score.safetensors", "dmd/fake_score_optimizer.safetensors", "trainer_state.json",
                 "scheduler.json", "dmd/state.json"):
        assert name in a, name
    for name, value in a.items():
        other = b[name]
        if isinstance(value, dict) and value and all(hasattr(v, "shape") for v in value.values()):
            assert value.keys() == other.keys(), name
            for key in value:
                assert value[key].dtype == other[key].dtype and value[key].equal(other[key]), (name, key)
        else:
            assert value == other, name
    assert json.loads((interrupted / f"checkpoint-{2 * N}" / "dmd" / "state.json").read_text())["critic_updates"] == 2 * N


def test_a_damaged_newest_checkpoint_is_refused_by_name_and_skipped_by_latest(job, tmp_path, capsys):  # noqa: F811
    """A truncated file in the newest checkpoint (the method's own state, written by ``distill_save_state``): named
    explicitly, the run stops with one error line naming the file (exit status 2) before loading anything;
    ``latest`` falls back to the checkpoint before it with one warning and the run completes."""
    from simpletuner_dmd.cli import main
    from simpletuner_dmd.hosts.reference.checkpoint import checkpoint_damage

    common = dict(max_train_steps=2, checkpoint_step_interval=1, validation_disable=True, use_ema=True,
                  checkpoints_total_limit=None, resume_from_checkpoint="latest")
    out = tmp_path / "out"
    train(job(**common))
    newest = out / "checkpoint-2"
    listed = json.loads((newest / "checkpoint.json").read_text())["files"]
    assert {"dmd/fake_score.safetensors", "ema.safetensors", "student.safetensors"} <= set(listed)
    damaged = newest / "dmd" / "fake_score.safetensors"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:100])
    what = f"dmd/fake_score.safetensors: size 100, expected {size}"

    capsys.readouterr()
    rc = main(["train", "--config", str(job(**{**common, "max_train_steps": 3,
                                                "resume_from_checkpoint": "checkpoint-2"}))])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and what in errors[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "method:" not in captured.out  # stopped before the models were loaded

    train(job(**{**common, "max_train_steps": 3}))
    text = capsys.readouterr().out
    mentions = [line for line in text.splitlines() if "is damaged" in line]
    assert mentions == [f"[simpletuner-dmd] warning: checkpoint-2 is damaged ({what}); resuming from checkpoint-1"]
    assert f"resumed from {(out / 'checkpoint-1').resolve()} at step 1" in text, text[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for step in (1, 2, 3):  # the damaged one was written again by the resumed run
        assert checkpoint_damage(out / f"checkpoint-{step}") is None, step
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
