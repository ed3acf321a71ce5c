"""LCM and DCM on the real tiny Wan transformer with real peft adapters: the teacher is the base, each optimizer moves
only its own weights, gradient checkpointing changes nothing, the experts switch by timestep, nothing is sized to one
model."""

from __future__ import annotations


import pytest
import torch

from simpletuner_dmd.methods.dcm.method import DCM, DETAIL_ADAPTER
from simpletuner_dmd.methods.lcm import method as lcm_method
from simpletuner_dmd.methods.lcm.method import LCM
from simpletuner_dmd.types import Batch
from tests.tiny_methods import batch, build_method, perturb_adapters, snapshot, step_info


def build(tiny_wan, cls, method_cfg=None, *, host=None, new_network=None):
    return build_method(tiny_wan, cls, method_cfg, host=host, new_network=new_network)


def changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


# --------------------------------------------------------------------------- LCM


def test_lcm_teacher_is_the_base_and_the_target_is_the_student(tiny_wan, monkeypatch):
    run = build(tiny_wan, LCM, {"w_min": 3.0, "w_max": 3.0})
    net = run.models.network
    perturb_adapters(net)
    calls = []
    original = run.family.predict_flow

    def spy(network, x_t, t, cond):
        layer = run.method.nets.switch.layers[0]
        calls.append((x_t.shape[0], layer.disable_adapters, list(layer.active_adapters), torch.is_grad_enabled()))
        return original(network, x_t, t, cond)

    run.family.predict_flow = spy
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=None)
    # teacher: cond + uncond as one batch of 4, adapters disabled, no grad; target: student, no grad; then with grad
    assert calls == [(4, True, ["student"], False), (2, False, ["student"], False), (2, False, ["student"], True)]
    result.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.models.student_params.values())
    before = snapshot(net)
    run.optimizer.step()
    assert changed(before, snapshot(net)) and all(".student." in n for n in changed(before, snapshot(net)))
    assert set(result.logs) >= {"lcm_loss", "lcm_timestep", "lcm_guidance"}


def test_lcm_target_at_the_first_point_is_the_teachers_euler_step(tiny_wan, monkeypatch):
    """n = 1: the target's timestep is 0, where the boundary condition makes f the identity, so the target is exactly
    the teacher's ODE step — whatever the student predicts there."""
    run = build(tiny_wan, LCM, {"w_min": 1.0, "w_max": 1.0, "num_ddim_timesteps": 10})
    perturb_adapters(run.models.network)
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, **kw: torch.ones(size, dtype=torch.long))
    captured = {}
    real_loss = lcm_method.consistency_loss  # as the method calls it
    monkeypatch.setattr(lcm_method, "consistency_loss", lambda pred, target, **kw: captured.update(target=target) or
                        real_loss(pred, target, **kw))
    torch.manual_seed(3)
    b = batch()
    run.method.distill_loss(batch=b, step=step_info(), host_loss=None)
    torch.manual_seed(3)
    torch.rand(2)  # the method draws w first
    t1 = run.method.schedule[1].expand(2)
    x1 = (1 - t1.view(-1, 1, 1, 1, 1) / 1000) * b.latents + t1.view(-1, 1, 1, 1, 1) / 1000 * torch.randn_like(b.latents)
    with torch.no_grad():
        v = run.method.nets.teacher_flow(x1, t1, b.cond)
    expected = x1 - t1.view(-1, 1, 1, 1, 1) / 1000 * v  # Euler from σ_1 to 0
    assert torch.allclose(captured["target"], expected, atol=1e-5)


# --------------------------------------------------------------------------- DCM


def _detail_step(run):
    """A micro-batch in the detail phases (forced), then the method's turn after the optimizer step."""
    run.method._draw = lambda b, step: (False, torch.randint(run.method.edges[1], run.method.cfg["euler_timesteps"],
                                                             (b,)))
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=None)
    assert result.loss is None  # the host's student (the semantic expert) takes no step on a detail batch
    run.method.distill_after_optimizer_step(step=step_info())


def test_dcm_each_optimizer_changes_only_its_own_weights(tiny_wan):
    run = build(tiny_wan, DCM, {"mode": "fine", "discriminator_head_stride": 1})
    net, method = run.models.network, run.method
    perturb_adapters(net)
    before, disc_before = snapshot(net), {k: v.clone() for k, v in method.discriminator.state_dict().items()}
    # semantic batch: the host's optimizer moves the student adapter only
    method._draw = lambda b, step: (True, torch.randint(0, method.edges[1], (b,)))
    result = method.distill_loss(batch=batch(), step=step_info(), host_loss=None)
    result.loss.backward()
    assert all(p.grad is None for p in method.detail_params)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    after_student = snapshot(net)
    assert changed(before, after_student) and all(".student." in n for n in changed(before, after_student))
    method.distill_after_optimizer_step(step=step_info())  # nothing pending: nothing moves
    assert not changed(after_student, snapshot(net))

    _detail_step(run)
    after_detail = snapshot(net)
    moved = changed(after_student, after_detail)
    assert moved and all(f".{DETAIL_ADAPTER}." in n for n in moved), sorted(moved)[:4]
    assert all(p.grad is None for p in run.models.student_params.values())  # nothing left for the host's step
    disc_after = method.discriminator.state_dict()
    assert any(not torch.equal(disc_before[k], disc_after[k]) for k in disc_before)
    assert all(torch.equal(before[n], after_detail[n]) for n in before if ".lora_" not in n)  # the base never moves
    logs = method.distill_metrics(step=step_info())
    assert {"dcm_detail_loss", "dcm_gan_g_loss", "dcm_gan_d_loss", "dcm_feature_matching"} <= set(logs)


def _detail_grads(tiny_wan, checkpointing):
    run = build(tiny_wan, DCM, {"mode": "fine", "discriminator_head_stride": 1},
                host={"gradient_checkpointing": checkpointing})
    perturb_adapters(run.models.network)
    captured = {}
    real_step = run.method.detail_optimizer.step
    run.method.detail_optimizer.step = lambda: captured.update(
        {i: p.grad.clone() for i, p in enumerate(run.method.detail_params)}) or real_step()
    torch.manual_seed(7)
    _detail_step(run)
    return captured


def test_dcm_detail_gradients_identical_with_and_without_gradient_checkpointing(tiny_wan):
    plain, ckpt = _detail_grads(tiny_wan, False), _detail_grads(tiny_wan, True)
    assert plain.keys() == ckpt.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for i in plain:
        assert torch.allclose(plain[i], ckpt[i], atol=1e-7, rtol=1e-5), i


def test_dcm_sampler_switches_experts_by_timestep(tiny_wan):
    run = build(tiny_wan, DCM, {"mode": "fine", "multiphase": 4})
    seen = []
    original = run.family.predict_flow
    layer = run.method.nets.switch.layers[0]

    def spy(network, x_t, t, cond):
        seen.append((round(float(t[0]), 1), list(layer.active_adapters)))
        return original(network, x_t, t, cond)

    run.family.predict_flow = spy
    out = run.method.distill_sampler()(torch.randn(1, 16, 3, 4, 4), torch.randn(1, 8, 32), None, 1.0, None)
    assert out.shape == (1, 16, 3, 4, 4) and len(seen) == 4
    assert seen[0] == (1000.0, ["student"])  # the semantic expert on the high-noise phase
    assert all(active == ["student", DETAIL_ADAPTER] for _, active in seen[1:])  # the detail expert below
    assert all(t <= run.method.boundary + 0.1 for t, _ in seen[1:])  # t rounded to 0.1
    assert list(layer.active_adapters) == ["student"]  # left as found


def test_dcm_runs_on_another_model_size(tiny_wan):
    """Nothing sized to one model: a wider, deeper Wan with other latent and text shapes."""
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16,
                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    def new_network():
        torch.manual_seed(0)
        return WanTransformer3DModel(**config).requires_grad_(False)

    run = build(tiny_wan, DCM, {"mode": "fine", "discriminator_head_stride": 2}, new_network=new_network)
    assert run.method.discriminator.width == 48 and len(run.method.discriminator.heads) == 2  # blocks 0 and 2
    run.method._draw = lambda b, step: (False, torch.randint(run.method.edges[1], 50, (b,)))
    g = torch.Generator().manual_seed(0)
    b = Batch(latents=torch.randn(1, 16, 2, 6, 8, generator=g), cond=torch.randn(1, 8, 32, generator=g))
    run.method.distill_loss(batch=b, step=step_info(), host_loss=None)
    run.method.distill_after_optimizer_step(step=step_info())
    assert run.method.discriminator_updates == 1


def test_dcm_fine_needs_a_lora_student(tiny_wan):
    from simpletuner_dmd.errors import UserError

    with pytest.raises(UserError, match="mode: 'fine' needs model_type 'lora'"):
        build(tiny_wan, DCM, {"mode": "fine"}, host={"model_type": "full"})
