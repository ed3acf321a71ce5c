"""The tiny pipelines of SimpleTuner's flow-matching families (``hosts/simpletuner/tiny_models.py``) load and train in
SimpleTuner 4.x: its own plain LoRA, 2 steps at 64 px through ``simpletuner train``, offline (about 30-50 s each on
a CPU). The video families train on images and 9-frame mp4 clips; Wan 2.1 I2V with ``is_i2v``."""

from __future__ import annotations

import pytest

from harness import SKIP_WITHOUT_VENV, assert_clean, needs_v4, simpletuner_train
from tiny_fixtures import TINY_FAMILIES, plain_lora_config, tiny_family_backends

pytestmark = [*SKIP_WITHOUT_VENV, needs_v4]


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_simpletuners_plain_lora_trains_on_the_tiny_pipeline(name, request, tiny_dataset, tmp_path):
    model = request.getfixturevalue("tiny_" + name.replace("-", "_"))
    backends = tiny_family_backends(tmp_path, tiny_dataset, name)
    config = plain_lora_config(name, model, backends, tmp_path / "out")
    code, text, _ = simpletuner_train(tmp_path / "run", config, HF_HUB_OFFLINE="1")
    assert code == 0, text[-4000:]
    assert_clean(text, f"SimpleTuner's LoRA on the tiny {name}")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
