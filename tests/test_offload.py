"""Activation offload: the same gradients, bit for bit, and the checkpointed block inputs are what it moves."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from simpletuner_dmd.hosts.reference.trainer import train
from simpletuner_dmd.offload import ActivationOffload
from tests.tiny_methods import batch, build_method, perturb_adapters, step_info


def test_a_dmd_step_has_bit_identical_gradients_with_and_without_offload(tiny_wan):
    from simpletuner_dmd.methods.dmd.method import DMD

    grads = []
    for offload in (False, True):
        run = build_method(tiny_wan, DMD, {"last_step_only": True}, host={"gradient_checkpointing": True})
        perturb_adapters(run.models.network)
        torch.manual_seed(5)
        hooks = ActivationOffload(min_bytes=0) if offload else None
        with hooks if hooks is not None else torch.enable_grad():
            loss = run.method.distill_loss(batch=batch(), step=step_info(0), host_loss=lambda: None).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in run.models.network.named_parameters() if p.grad is not None})
        if offload:
            assert hooks.offloaded_bytes > 0  # the pack/unpack path really ran (on a CPU it moves nothing)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_parameters_and_small_tensors_stay_where_they_are():
    layer = torch.nn.Linear(512, 512)
    hooks = ActivationOffload(min_bytes=1 << 10)
    with hooks:
        x = torch.randn(64, 512, requires_grad=True)
        y = layer(x).square().sum()
    y.backward()
    # the input (128 KiB) and the matmul output are counted; the 1 MiB weight (a Parameter) is not
    assert 0 < hooks.offloaded_bytes < 512 * 512 * 4


def test_a_training_run_with_offload_writes_the_same_student(job, tmp_path):
    students = []
    for offload in (False, True):
        out = train(job(max_train_steps=2, checkpoint_step_interval=0, validation_disable=True, use_ema=False,
                        gradient_checkpointing=True, activation_offload=offload, output_dir=str(tmp_path / str(offload)),
                        base_model_precision="no_change", mixed_precision="no"))
        students.append(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
