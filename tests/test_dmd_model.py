"""DMD on the real tiny Wan transformer with real peft adapters: isolation of the three networks, gradients,
the negative prompt, the fake score's two forms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from simpletuner_dmd.hosts.reference import trainer as T
from simpletuner_dmd.methods.dmd.method import DMD
from tests.tiny_methods import batch, build_method, embed, perturb_adapters, snapshot, step_info


def build(tiny_wan, *, host=None, dmd=None, negative="ugly, blurry"):
    return build_method(tiny_wan, DMD, dmd, host=host, negative=negative)


def host_loss():
    raise AssertionError("DMD proper must not ask for the host's loss")


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto"])
def test_teacher_is_bit_identical_to_the_frozen_base(tiny_wan, precision):
    run = build(tiny_wan, host={"base_model_precision": precision})
    perturb_adapters(run.models.network)
    base = T.frozen_base(run.cfg, run.family, torch.float32)
    T.quantize_frozen(base, precision, "reference base")
    x, t, cond = torch.randn(2, 16, 3, 4, 4), torch.tensor([900.0, 300.0]), torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = run.family.predict_flow(base, x, t, cond)
        teacher = run.method.nets.teacher_flow(x, t, cond)
        student = run.family.predict_flow(run.models.network, x, t, cond)
        fake = run.method.fake_score_flow(x, t, cond)
    assert torch.equal(teacher, expected)
    assert not torch.equal(student, expected) and not torch.equal(fake, expected) and not torch.equal(fake, student)


def test_each_optimizer_changes_only_its_own_parameters(tiny_wan):
    run = build(tiny_wan)
    net = run.models.network
    perturb_adapters(net)
    before = snapshot(net)
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss)
    result.loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    after_student = snapshot(net)
    changed = {n for n in before if not torch.equal(before[n], after_student[n])}
    assert changed and all(".student." in n for n in changed), sorted(changed)[:5]

    run.method.distill_after_optimizer_step(step=step_info())
    after_critic = snapshot(net)
    changed = {n for n in before if not torch.equal(after_student[n], after_critic[n])}
    assert changed and all(".fake_score." in n for n in changed), sorted(changed)[:5]
    assert run.method.critic_updates == 1 and "fake_score_loss" in run.method.distill_metrics(step=step_info())
    # the base never moves
    assert all(torch.equal(before[n], after_critic[n]) for n in before if ".lora_" not in n)


def _student_and_critic_grads(tiny_wan, checkpointing: bool, dmd=None):
    run = build(tiny_wan, host={"gradient_checkpointing": checkpointing}, dmd=dmd)
    perturb_adapters(run.models.network)
    torch.manual_seed(42)
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss)
    result.loss.backward()
    student = {n: p.grad.clone() for n, p in run.models.student_params.items()}
    # the critic's backward, captured before its optimizer step clears it
    captured = {}
    real_step = run.method.fake_optimizer.step
    run.method.fake_optimizer.step = lambda: captured.update(
        {i: p.grad.clone() for i, p in enumerate(run.method.fake_params)}) or real_step()
    run.method.distill_after_optimizer_step(step=step_info())
    return student, captured


def test_gradients_identical_with_and_without_gradient_checkpointing(tiny_wan):
    plain_s, plain_c = _student_and_critic_grads(tiny_wan, checkpointing=False)
    ckpt_s, ckpt_c = _student_and_critic_grads(tiny_wan, checkpointing=True)
    assert plain_s.keys() == ckpt_s.keys() and len(plain_s) > 0
    assert all(g.abs().sum() > 0 for g in plain_s.values())  # the student really gets a gradient
    for name in plain_s:
        assert torch.allclose(plain_s[name], ckpt_s[name], atol=1e-7, rtol=1e-5), name
    assert len(plain_c) == len(ckpt_c) > 0 and any(g.abs().sum() > 0 for g in plain_c.values())
    for i in plain_c:
        assert torch.allclose(plain_c[i], ckpt_c[i], atol=1e-7, rtol=1e-5), i


def test_gan_term_reaches_the_student_the_same_with_and_without_gradient_checkpointing(tiny_wan):
    # The generator's GAN gradient is taken inside the fake score's adapter context: a checkpointed recompute in the
    # host's later backward would otherwise run the student's adapter and silently change it.
    gan = {"gan_loss_weight": 0.5, "gan_classifier_loss_weight": 0.1}
    plain_s, plain_c = _student_and_critic_grads(tiny_wan, checkpointing=False, dmd=gan)
    ckpt_s, ckpt_c = _student_and_critic_grads(tiny_wan, checkpointing=True, dmd=gan)
    without_s, without_c = _student_and_critic_grads(tiny_wan, checkpointing=False)
    for name in plain_s:
        assert torch.allclose(plain_s[name], ckpt_s[name], atol=1e-7, rtol=1e-5), name
    assert any(not torch.allclose(plain_s[n], without_s[n]) for n in plain_s)  # the term is not a no-op
    assert len(plain_c) == len(without_c) + 6  # the classifier head joins the critic (LayerNorm, two Linears)
    for i in plain_c:
        assert torch.allclose(plain_c[i], ckpt_c[i], atol=1e-6, rtol=1e-5), i


def test_gan_generator_turn_leaves_no_gradient_on_the_fake_score_or_the_classifier(tiny_wan):
    run = build(tiny_wan, dmd={"gan_loss_weight": 1.0})
    perturb_adapters(run.models.network)
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss)
    result.loss.backward()
    assert "gan_generator_loss" in result.logs
    assert all(p.grad is None or not p.grad.any() for p in run.method.fake_params)
    head = {n: p.detach().clone() for n, p in run.method.gan_head.named_parameters()}
    run.method.distill_after_optimizer_step(step=step_info())
    metrics = run.method.distill_metrics(step=step_info())
    assert {"gan_classifier_loss", "gan_real_prob", "gan_fake_prob"} <= metrics.keys()
    assert all(not torch.equal(head[n], p) for n, p in run.method.gan_head.named_parameters())  # the critic trains D


def test_gan_term_is_off_before_gan_start_step(tiny_wan):
    # Before gan_start_step the step is DMD alone: no GAN part in the student's loss, the classifier neither sees
    # the real batch nor moves; from that step on both run.
    run = build(tiny_wan, dmd={"gan_loss_weight": 1.0, "gan_start_step": 3})
    head = {n: p.detach().clone() for n, p in run.method.gan_head.named_parameters()}
    for step in (0, 2):
        result = run.method.distill_loss(batch=batch(), step=step_info(step), host_loss=host_loss)
        assert "gan_generator_loss" not in result.logs and "dmd_loss" in result.logs
        result.loss.backward()
        run.method.distill_after_optimizer_step(step=step_info(step))
        assert not {"gan_classifier_loss", "gan_real_prob"} & run.method.distill_metrics(step=step_info(step)).keys()
        assert all(torch.equal(head[n], p) for n, p in run.method.gan_head.named_parameters())
    result = run.method.distill_loss(batch=batch(), step=step_info(3), host_loss=host_loss)
    assert "gan_generator_loss" in result.logs
    result.loss.backward()
    run.method.distill_after_optimizer_step(step=step_info(3))
    assert "gan_classifier_loss" in run.method.distill_metrics(step=step_info(3))
    assert all(not torch.equal(head[n], p) for n, p in run.method.gan_head.named_parameters())
    assert DMD.config_warnings({**DMD.schema.defaults(), "gan_start_step": 3}, type(run.family), {}) == [
        "distillation_config.gan_start_step: 3 has no effect while gan_loss_weight is 0 (the GAN term is off)"]
    assert DMD.config_warnings({**DMD.schema.defaults(), "gan_start_step": 3, "gan_loss_weight": 0.1},
                               type(run.family), {}) == []


def test_gan_head_travels_with_the_fake_score_in_checkpoints(tiny_wan, tmp_path):
    run = build(tiny_wan, dmd={"gan_loss_weight": 1.0})
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss)
    result.loss.backward()
    run.method.distill_after_optimizer_step(step=step_info())
    run.method.distill_save_state(checkpoint_dir=tmp_path)
    fresh = build(tiny_wan, dmd={"gan_loss_weight": 1.0})
    fresh.method.distill_load_state(checkpoint_dir=tmp_path)
    for (name, a), b in zip(run.method.gan_head.state_dict().items(), fresh.method.gan_head.state_dict().values()):
        assert torch.equal(a, b), name


def test_gan_needs_a_family_that_names_its_features(tiny_wan, monkeypatch):
    from simpletuner_dmd.errors import UserError
    from simpletuner_dmd.families.wan import WanFamily

    monkeypatch.setattr(WanFamily, "gan_feature_module", None)
    with pytest.raises(UserError, match="gan_loss_weight.*gan_feature_module"):
        build(tiny_wan, dmd={"gan_loss_weight": 1.0})


def _record_calls(run):
    calls = []
    original = run.family.predict_flow

    def spy(network, x_t, timesteps, cond):
        calls.append(SimpleNamespace(batch=x_t.shape[0], cond=cond.detach().clone(), grad=torch.is_grad_enabled()))
        return original(network, x_t, timesteps, cond)

    run.family.predict_flow = spy
    return calls


def test_negative_prompt_is_really_the_unconditional_branch(tiny_wan):
    run = build(tiny_wan, dmd={"real_score_guidance_scale": 3.0, "last_step_only": True}, negative="ugly, blurry")
    perturb_adapters(run.models.network)
    calls = _record_calls(run)
    b = batch()
    run.method.distill_loss(batch=b, step=step_info(), host_loss=host_loss)
    # 3 student steps (exit at the last), one fake-score pass, one batched teacher pass (cond + uncond)
    assert [c.batch for c in calls] == [2, 2, 2, 2, 4]
    teacher = calls[-1]
    assert torch.equal(teacher.cond[:2], b.cond)
    assert torch.equal(teacher.cond[2:], embed(["ugly, blurry"]).expand(2, -1, -1))
    assert not teacher.grad and not calls[-2].grad and calls[-3].grad and not calls[0].grad

    # the negative prompt changes the DMD gradient (it is not cond twice)
    def dmd_grad(negative):
        other = build(tiny_wan, dmd={"real_score_guidance_scale": 3.0, "last_step_only": True}, negative=negative)
        perturb_adapters(other.models.network)
        torch.manual_seed(5)
        loss = other.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss).loss
        loss.backward()
        return torch.cat([p.grad.flatten() for p in other.models.student_params.values()])

    assert not torch.allclose(dmd_grad("ugly, blurry"), dmd_grad("a completely different negative prompt"))


def test_guidance_off_skips_the_unconditional_pass(tiny_wan):
    run = build(tiny_wan, dmd={"real_score_guidance_scale": 1.0, "last_step_only": True})
    calls = _record_calls(run)
    run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss)
    assert [c.batch for c in calls] == [2, 2, 2, 2, 2]


def test_guidance_interval_guides_only_inside_it(tiny_wan):
    """real_score_guidance_interval: outside it the teacher is cond only, with no uncond pass and exactly the
    gradient of guidance 1; an interval holding every DMD timestep is the plain guided teacher."""
    def run_once(dmd):
        run = build(tiny_wan, dmd={"last_step_only": True, **dmd})
        perturb_adapters(run.models.network)
        calls = _record_calls(run)
        torch.manual_seed(5)
        loss = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss).loss
        loss.backward()
        return [c.batch for c in calls], torch.cat([p.grad.flatten() for p in run.models.student_params.values()])

    # DMD timesteps are clamped to >= min_timestep_ratio·1000 = 20: an interval below that guides nothing
    outside, grad_outside = run_once({"real_score_guidance_scale": 3.0, "real_score_guidance_interval": "0,10"})
    unguided, grad_unguided = run_once({"real_score_guidance_scale": 1.0})
    assert outside == unguided == [2, 2, 2, 2, 2] and torch.equal(grad_outside, grad_unguided)
    everywhere, grad_everywhere = run_once({"real_score_guidance_scale": 3.0, "real_score_guidance_interval": [0, 1000]})
    guided, grad_guided = run_once({"real_score_guidance_scale": 3.0})
    assert everywhere == guided == [2, 2, 2, 2, 4] and torch.equal(grad_everywhere, grad_guided)
    assert not torch.allclose(grad_guided, grad_unguided)


def test_fake_score_guidance_batches_the_fake_pass(tiny_wan):
    run = build(tiny_wan, dmd={"fake_score_guidance_scale": 1.5, "real_score_guidance_scale": 1.0,
                               "last_step_only": True})
    calls = _record_calls(run)
    run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss)
    assert [c.batch for c in calls] == [2, 2, 2, 4, 2]


def test_critic_reuses_the_generator_sample_and_interval_counts_optimizer_steps(tiny_wan):
    run = build(tiny_wan, dmd={"generator_update_interval": 2})
    calls = _record_calls(run)
    first = run.method.distill_loss(batch=batch(), step=step_info(0), host_loss=host_loss)
    assert first.loss is not None
    rollout_and_kl = len(calls)
    run.method.distill_after_optimizer_step(step=step_info(0))
    assert len(calls) == rollout_and_kl + 1  # the critic: one forward on the stashed sample, no second rollout
    calls.clear()
    second = run.method.distill_loss(batch=batch(), step=step_info(1), host_loss=host_loss)
    assert second.loss is None  # critic-only step: no student update
    assert all(not c.grad for c in calls) and len(calls) == int(second.logs["dmd_exit_index"]) + 1


def test_num_training_frames_crops_the_frame_axis(tiny_wan):
    run = build(tiny_wan, dmd={"num_training_frames": 2})
    shapes = []
    original = run.family.predict_flow
    run.family.predict_flow = lambda network, x_t, t, cond: shapes.append(tuple(x_t.shape)) or original(
        network, x_t, t, cond)
    run.method.distill_loss(batch=batch(frames=5), step=step_info(), host_loss=host_loss)
    assert shapes and all(shape[2] == 2 for shape in shapes)  # the rollout and the KL run on 2 of the 5 frames
    shapes.clear()
    run.method.distill_after_optimizer_step(step=step_info())
    assert shapes == [(2, 16, 2, 4, 4)]  # and the critic trains on that clip


def test_sft_weight_adds_the_host_loss(tiny_wan):
    run = build(tiny_wan, dmd={"sft_loss_weight": 0.5})
    result = run.method.distill_loss(batch=batch(), step=step_info(), host_loss=lambda: torch.tensor(2.0))
    assert result.logs["sft_loss"] == 2.0
    assert result.loss.item() == pytest.approx(result.logs["dmd_loss"] + 1.0, rel=1e-5)


def test_full_copy_fake_score(tiny_wan):
    run = build(tiny_wan, dmd={"fake_score_type": "full"})
    assert run.method.fake_net is not run.models.network
    before = snapshot(run.models.network)
    run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss).loss.backward()
    run.method.distill_after_optimizer_step(step=step_info())
    assert run.method.critic_updates == 1
    after = snapshot(run.models.network)
    assert all(torch.equal(before[n], after[n]) for n in before)  # only the copy moved
    base = T.frozen_base(run.cfg, run.family, torch.float32)
    assert sum(p.numel() for p in run.method.fake_params) == sum(p.numel() for p in base.parameters())


def test_model_type_full_uses_a_separate_frozen_teacher(tiny_wan):
    run = build(tiny_wan, host={"model_type": "full"})
    assert run.method.fake_type == "full" and run.models.teacher is not None
    teacher_before = snapshot(run.models.teacher)
    run.method.distill_loss(batch=batch(), step=step_info(), host_loss=host_loss).loss.backward()
    run.optimizer.step()
    run.method.distill_after_optimizer_step(step=step_info())
    assert all(torch.equal(teacher_before[n], p) for n, p in run.models.teacher.named_parameters())


def test_lora_fake_score_needs_a_lora_student(tiny_wan):
    from simpletuner_dmd.errors import UserError

    with pytest.raises(UserError, match="fake_score_type"):
        build(tiny_wan, host={"model_type": "full"}, dmd={"fake_score_type": "lora"})


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_pass_counts_are_minimal(tiny_wan, guidance):
    """Generator step: k+1 student forwards (one with grad) and one backward; one teacher forward (cond + uncond
    batched); one no-grad fake forward; the critic's one forward + backward on the reused sample. Critic-only step: the
    no-grad rollout and the critic, nothing else."""
    run = build(tiny_wan, dmd={"generator_update_interval": 2, "real_score_guidance_scale": guidance})
    for step in range(2):
        result = run.method.distill_loss(batch=batch(b=2), step=step_info(step), host_loss=host_loss)
        if result.loss is not None:
            result.loss.backward()
        run.method.distill_after_optimizer_step(step=step_info(step))
        run.method.distill_metrics(step=step_info(step))
        k = int(result.logs["dmd_exit_index"])
        passes = run.method.last_step_passes
        if step == 0:
            assert passes == {
                "student_forward": k + 1, "student_forward_samples": 2 * (k + 1), "student_forward_with_grad": 1,
                "student_backward": 1,
                "teacher_forward": 1, "teacher_forward_samples": 4 if guidance > 1 else 2,
                "fake_score_forward": 2, "fake_score_forward_samples": 4, "fake_score_forward_with_grad": 1,
                "fake_score_backward": 1,
            }, passes
        else:
            assert passes == {
                "student_forward": k + 1, "student_forward_samples": 2 * (k + 1),
                "fake_score_forward": 1, "fake_score_forward_samples": 2, "fake_score_forward_with_grad": 1,
                "fake_score_backward": 1,
            }, passes


def test_adapter_switch_restores_state_on_error_and_keeps_requires_grad(tiny_wan):
    from simpletuner_dmd.adapters import AdapterSwitch

    run = build(tiny_wan)
    net = run.models.network
    switch = AdapterSwitch(net)
    assert switch.adapter_names() == {"student", "fake_score"}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    before = [(layer.active_adapters, layer.disable_adapters) for layer in switch.layers]
    with pytest.raises(RuntimeError):
        with switch.use("fake_score"):
            assert all(layer.active_adapters == ["fake_score"] for layer in switch.layers)
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with switch.disabled():
            assert all(layer.disable_adapters for layer in switch.layers)
            raise RuntimeError("boom")
    assert [(layer.active_adapters, layer.disable_adapters) for layer in switch.layers] == before
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    with pytest.raises(KeyError):
        switch.use("nope")


def test_a_guided_one_step_student_without_the_regression_term_is_warned_once():
    """Issue 31 item 4: only the case the guided benchmark failed (1 step, guidance > 1, no regression term) warns,
    naming the key, the evidence and the pairs' cost; 3 steps, guidance 1 or the term on stay quiet."""
    from simpletuner_dmd.methods.dmd.method import guided_one_step_warnings

    base = {**DMD.schema.defaults(), "dmd_denoising_steps": [1000], "real_score_guidance_scale": 3.0}
    (line,) = guided_one_step_warnings(base)
    assert line.startswith("distillation_config.regression_loss_weight: a 1-step student at real_score_guidance_scale 3 ")
    assert f"{base['regression_num_pairs'] * base['regression_teacher_steps']} guided teacher passes" in line
    assert guided_one_step_warnings({**base, "regression_loss_weight": 16.0}) == []
    assert guided_one_step_warnings({**base, "real_score_guidance_scale": 1.0}) == []
    assert guided_one_step_warnings({**base, "dmd_denoising_steps": [1000, 757, 522]}) == []
    assert len(guided_one_step_warnings({**base, "real_score_guidance_scale": 1.0,
                                         "real_score_guidance_scale_2": 3.5})) == 1
