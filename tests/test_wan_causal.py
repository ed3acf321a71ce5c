"""The ``wan-causal`` family end to end through the reference host: DMD's Self-Forcing rollout and streaming
sampler, every block key in effect (none warns as inert), checkpoint and resume."""

from __future__ import annotations

import json

import pytest

from simpletuner_dmd.hosts.reference.run_config import load_config
from simpletuner_dmd.hosts.reference.trainer import train
from simpletuner_dmd.plugins import get_plugin_manager, registered_families

BLOCK_KEYS = {"num_frame_per_block": 1, "independent_first_frame": True, "same_step_across_blocks": True,
              "context_noise": 100, "num_training_frames": 2, "last_step_only": False}


def test_the_causal_family_is_listed_and_its_block_keys_do_not_warn(job):
    pm = get_plugin_manager()
    assert registered_families(pm)["wan-causal"].cls.causal is True
    config = json.loads(job().read_text())
    config["distillation_config"].update(BLOCK_KEYS)
    path = job(model_family="wan-causal", distillation_config=config["distillation_config"])
    rc = load_config(path, pm)
    assert not [w for w in rc.warnings if "no effect" in w]
    wan = load_config(job(distillation_config=config["distillation_config"]), pm)
    assert {w.split(":")[0] for w in wan.warnings if "no effect" in w} == {
        "distillation_config.num_frame_per_block", "distillation_config.independent_first_frame",
        "distillation_config.same_step_across_blocks", "distillation_config.context_noise"}


@pytest.mark.slow
def test_a_causal_student_trains_validates_checkpoints_and_resumes(job, tmp_path, capsys):
    config = json.loads(job().read_text())
    dmd = {**config["distillation_config"], **BLOCK_KEYS, "generator_update_interval": 1}
    path = job(model_family="wan-causal", distillation_config=dmd, max_train_steps=2, checkpoint_step_interval=1,
               validation_step_interval=0, disable_benchmark=True, use_ema=False, ema_validation="none")
    out = train(path)
    assert (out / "checkpoint-2").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "step-2").is_dir()
    log = capsys.readouterr().out
    assert "family: wan-causal" in log and "no effect" not in log
    path = job(model_family="wan-causal", distillation_config=dmd, max_train_steps=3, checkpoint_step_interval=1,
               validation_step_interval=0, disable_benchmark=True, use_ema=False, ema_validation="none")
    train(path)
    assert "resumed from" in capsys.readouterr().out and (out / "checkpoint-3").is_dir()
