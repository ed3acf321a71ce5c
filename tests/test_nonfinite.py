"""Non-finite values: an update with a NaN loss or gradient is skipped and counted; too many in a row stop the run with
one line naming the turn (exit status 3), and the last good checkpoint stays the latest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_dmd import hookimpl
from simpletuner_dmd.cli import main
from simpletuner_dmd.hosts.reference.trainer import train
from simpletuner_dmd.methods.dmd import method as dmd_method
from simpletuner_dmd.nonfinite import NonFiniteError


class Logs:
    """Keeps what the host logs each step (the metrics hook runs before the host adds its own keys, so read the
    method's metrics here and the student's weights to see what moved)."""

    def __init__(self):
        self.metrics: list[dict] = []

    @hookimpl
    def distill_setup(self, run):
        self.run = run

    @hookimpl(trylast=True)
    def distill_metrics(self, step):
        weights = {n: p.detach().clone() for n, p in self.run.student.named_parameters() if ".lora_B.student." in n}
        self.metrics.append({"step": step.global_step, "weights": weights})


def _nan_at(monkeypatch, module_attr: str, steps: set[int], calls: list[int]):
    """Make DMD's loss function ``module_attr``, as the method calls it, return NaN on the given call numbers
    (0-based), to inject a fault where it would arise."""
    original = getattr(dmd_method, module_attr)

    def faulty(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        return out * float("nan") if len(calls) - 1 in steps else out

    monkeypatch.setattr(dmd_method, module_attr, faulty)


def test_a_nan_student_loss_skips_that_update_only(job, monkeypatch):  # noqa: F811
    calls: list[int] = []
    _nan_at(monkeypatch, "dmd_loss", {1}, calls)  # the second optimizer step's DMD loss is NaN
    logs = Logs()
    out = train(job(max_train_steps=4, checkpoint_step_interval=0, nonfinite_skip_limit=2), plugins=(logs,))
    w = [m["weights"] for m in logs.metrics]
    assert all(torch.equal(w[1][k], w[0][k]) for k in w[0])  # step 1 skipped: the student did not move
    assert any(not torch.equal(w[2][k], w[1][k]) for k in w[0])  # and training went on afterwards
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint-4" / "student.safetensors")).values())


def test_nan_critic_stops_the_run_naming_the_turn_and_keeps_the_last_checkpoint(job, monkeypatch, capsys):  # noqa: F811
    calls: list[int] = []
    _nan_at(monkeypatch, "critic_flow_loss", set(range(2, 100)), calls)  # from the third critic turn on
    config = job(max_train_steps=8, checkpoint_step_interval=2, nonfinite_skip_limit=3, checkpoints_total_limit=None)
    with pytest.raises(NonFiniteError, match=r"fake score \(critic\) turn: non-finite .* 3 optimizer steps in a row"):
        train(config)
    out = Path(json.loads(config.read_text())["output_dir"])
    # NaN from step 2 on; the run stops at the third bad step (step 4), before the checkpoint of step 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".checkpoint-*"))
    fake = load_file(str(out / "checkpoint-4" / "dmd" / "fake_score.safetensors"))
    assert all(torch.isfinite(v).all() for v in fake.values())  # the skipped updates never reached the weights

    # through the CLI: one line, exit status 3, no traceback
    calls.clear()
    for folder in out.glob("checkpoint-*"):
        import shutil

        shutil.rmtree(folder)
    assert main(["train", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "error: fake score (critic) turn" in err and "Traceback" not in err
