"""``distill_setup`` refuses a context it cannot run with, in one clear line, before any training step."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.hosts.reference import trainer as T
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
from simpletuner_dmd.methods.dcm.method import DCM
from simpletuner_dmd.methods.dmd.method import DMD
from simpletuner_dmd.methods.lcm.method import LCM
from simpletuner_dmd.types import RunContext
from tests.tiny_methods import embed


@pytest.mark.parametrize("cls", [DMD, LCM, DCM], ids=lambda c: c.name)
def test_a_full_student_without_a_teacher_is_refused_at_setup(tiny_wan, cls):
    from accelerate import Accelerator

    cfg = {**HOST_SCHEMA.defaults(), "pretrained_model_name_or_path": str(tiny_wan), "model_type": "full"}
    method_cfg, problems, _ = cls.schema.validate({}, prefix="distillation_config")
    assert not problems
    family = WanFamily()
    network = T.frozen_base(cfg, family, torch.float32)
    run = RunContext(host_config=cfg, method_config=method_cfg, family=family, student=network,
                     accelerator=Accelerator(cpu=True), encode_prompts=embed, negative_prompt="", output_dir=None,
                     model_type="full", student_adapter=None, load_base=lambda: network, teacher=None)
    with pytest.raises(UserError, match=rf"distillation_method {cls.name}: model_type 'full' .*RunContext\.teacher"):
        cls(method_cfg).distill_setup(run=run)
