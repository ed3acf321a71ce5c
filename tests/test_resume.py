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
