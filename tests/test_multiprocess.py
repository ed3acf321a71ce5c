"""Two processes through ``accelerate launch`` (CPU, gloo): the plugin needs no change to run under several processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two accelerate launches: `pytest -m slow` or .ci/run

from tests.multiprocess import launch



@pytest.mark.parametrize("gan", [False, True], ids=["dmd", "dmd+gan"])
def test_two_processes_stay_identical_and_write_once(job, tmp_path, gan):  # noqa: F811
    config = job(max_train_steps=3, gradient_accumulation_steps=2, checkpoint_step_interval=2,
                 checkpoints_total_limit=None, validation_step_interval=0, report_to="tensorboard")
    if gan:  # DMD2's classifier head sits outside the DDP wrapper: its gradient must be averaged all the same
        raw = json.loads(config.read_text())
        raw["distillation_config"] = {**raw["distillation_config"], "gan_loss_weight": 0.5}
        config.write_text(json.dumps(raw))
    witness = tmp_path / "witness"
    logs = launch("job.py", config, witness, timeout=600)

    # the same trained weights on both ranks, and training really moved them
    w0 = load_file(str(witness / "weights-rank0.safetensors"))
    w1 = load_file(str(witness / "weights-rank1.safetensors"))
    assert w0.keys() == w1.keys() and any(".fake_score." in k for k in w0) and any(".student." in k for k in w0)
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert any(w0[k].abs().sum() > 0 for k in w0 if ".lora_B.fake_score." in k)
    assert any(w0[k].abs().sum() > 0 for k in w0 if ".lora_B.student." in k)
    assert any(k.startswith("gan_head") for k in w0) == gan

    # shared draws agree; the data differs between ranks (each takes its own share of batches)
    s0 = json.loads((witness / "seen-rank0.json").read_text())
    s1 = json.loads((witness / "seen-rank1.json").read_text())
    assert [(s["step"], s["micro"], s["generator_seed"]) for s in s0] == \
           [(s["step"], s["micro"], s["generator_seed"]) for s in s1]
    assert len(s0) == 6 and [s["latents_sum"] for s in s0] != [s["latents_sum"] for s in s1]

    # written once, by the main process
    out = Path(json.loads(config.read_text())["output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-3" / "rng-0.json").is_file() and (out / "checkpoint-3" / "rng-1.json").is_file()
    events = list(out.rglob("events.out.tfevents.*"))  # …<time>.<host>.<pid>.<n>; add_hparams adds a second file
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # all from one process
    assert len(list((out / "validation").glob("step-*"))) == 2  # the baseline (step-0) and the last step
    assert logs.count("student LoRA:") == 1 and logs.count("method: dmd;") == 1  # the host logs once
