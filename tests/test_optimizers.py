"""optimizer ao-adamw8bit: 8-bit moments for the student and the method's own networks, saved without pickle, and a
resume that continues exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_dmd.hosts.reference.trainer import train

pytest.importorskip("torchao")  # a test dependency; the line below says what a user without it sees

EIGHT_BIT = dict(optimizer="ao-adamw8bit", validation_disable=True, use_ema=False, base_model_precision="no_change",
                 mixed_precision="no", lora_rank=256, lora_alpha=256)  # rank 256: tensors past torchao's 4,096 minimum


@pytest.mark.slow
def test_8bit_moments_train_checkpoint_and_resume_exactly(job, tmp_path):
    from simpletuner_dmd.state_io import load_state

    whole = train(job(max_train_steps=2, checkpoint_step_interval=1, output_dir=str(tmp_path / "whole"), **EIGHT_BIT))
    state = json.loads((whole / "checkpoint-1" / "optimizer.json").read_text())
    assert '"$subclass": "torchao.optim.subclass_8bit.OptimState8bit"' in json.dumps(state)  # the student's moments
    fake = load_state(whole / "checkpoint-1" / "dmd" / "fake_score_optimizer")
    assert any(type(v).__name__ == "OptimState8bit" for s in fake["state"].values() for v in s.values())

    part = tmp_path / "part"
    train(job(max_train_steps=1, checkpoint_step_interval=1, output_dir=str(part), **EIGHT_BIT))
    train(job(max_train_steps=2, checkpoint_step_interval=1, output_dir=str(part), resume_from_checkpoint="latest",
              **EIGHT_BIT))
    a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_torchao_the_config_is_refused_in_one_line(monkeypatch, pm_and_config):
    from simpletuner_dmd import optimizers
    from simpletuner_dmd.errors import ConfigError
    from simpletuner_dmd.hosts.reference.run_config import validate_config

    pm, raw = pm_and_config
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as info:
        validate_config({**raw, "optimizer": "ao-adamw8bit"}, pm, check_paths=False)
    assert info.value.problems == ["config.optimizer ao-adamw8bit: needs torchao (pip install torchao, or pip install "
                                   "'simpletuner-dmd[lowbit]')"]


@pytest.fixture()
def pm_and_config():
    from simpletuner_dmd.plugins import get_plugin_manager
    from tests.conftest import REPO

    return get_plugin_manager(), json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())
