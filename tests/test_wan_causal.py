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


@pytest.mark.parametrize("window, grad_blocks", [(21, 3), (1, 1)])
def test_block_rollout_pass_counts(tiny_wan, window, grad_blocks):
    """A generator step of the block rollout on 3 one-frame blocks, each exiting at the last of 3 steps: 3·3
    denoising forwards and 2 context writes (none after the last block), a graph at the exit of every block inside
    the last ``num_training_frames`` frames, one student backward; the teacher, the fake score and the critic as in
    the bidirectional case."""
    from simpletuner_dmd.families.wan_causal import WanCausalFamily
    from simpletuner_dmd.methods.dmd.method import DMD
    from tests.tiny_methods import batch, build_method, step_info

    run = build_method(tiny_wan, DMD, {"last_step_only": True, "num_frame_per_block": 1,
                                       "num_training_frames": window, "real_score_guidance_scale": 1.0},
                       family=WanCausalFamily())
    result = run.method.distill_loss(batch=batch(b=2, frames=3), step=step_info(0), host_loss=None)
    result.loss.backward()
    run.method.distill_after_optimizer_step(step=step_info(0))
    run.method.distill_metrics(step=step_info(0))
    assert run.method.last_step_passes == {
        "student_forward": 11, "student_forward_samples": 22, "student_forward_with_grad": grad_blocks,
        "student_backward": 1, "teacher_forward": 1, "teacher_forward_samples": 2,
        "fake_score_forward": 2, "fake_score_forward_samples": 4, "fake_score_forward_with_grad": 1,
        "fake_score_backward": 1}
    # and `estimate` counts the same student forwards for this layout (3 one-frame blocks)
    plan = DMD.memory_plan(run.method.cfg, {"model_type": "lora"}, layout={"causal": True, "latent_frames": 3})
    assert plan["passes_per_step"]["student_forward"] == 11
    bidirectional = DMD.memory_plan(run.method.cfg, {"model_type": "lora"})
    assert bidirectional["passes_per_step"]["student_forward"] == 3


def test_wan_vae_decodes_causally_in_time(tiny_wan):
    """What streaming relies on: decoding the latents so far gives the same first frames as decoding the whole clip
    (Wan's VAE is causal in time), so frames written as each block is done never change."""
    import torch

    from simpletuner_dmd.families.wan import WanFamily

    family = WanFamily()
    components = family.load_components(str(tiny_wan), text_encoder_path=None, dtype=torch.float32)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    full = family.decode_latents(components, latents)
    for n, frames in ((1, 1), (2, 5)):
        part = family.decode_latents(components, latents[:, :, :n])
        assert part.shape[2] == frames
        torch.testing.assert_close(part, full[:, :, :frames], atol=1e-6, rtol=0)


def test_estimate_hands_the_causal_layout_to_the_plan():
    from simpletuner_dmd.estimate import layout_for
    from simpletuner_dmd.families.wan import WanFamily
    from simpletuner_dmd.families.wan_causal import WanCausalFamily
    from simpletuner_dmd.methods.dmd.method import DMD
    from simpletuner_dmd.methods.ode_init.method import ODEInit

    assert layout_for(WanCausalFamily(), 81) == {"causal": True, "latent_frames": 21}
    assert layout_for(WanFamily(), 9) == {"causal": False, "latent_frames": 3}
    ode_cfg = ODEInit.schema.defaults()  # every plan takes the layout; ODE init's passes do not depend on it
    assert ODEInit.memory_plan(ode_cfg, {}, layout_for(WanCausalFamily(), 81)) == ODEInit.memory_plan(ode_cfg, {})
    # Self-Forcing's layout: 21 latent frames in blocks of 3 (7 blocks), exit at a uniform step of 4
    cfg = {**DMD.schema.defaults(), "dmd_denoising_steps": [1000, 750, 500, 250]}
    plan = DMD.memory_plan(cfg, {"model_type": "lora"}, layout={"causal": True, "latent_frames": 21})
    assert plan["passes_per_step"]["student_forward"] == 7 * 2.5 + 6
    # the cache (every frame but the last block's) is held once through the student's backward, its chunks shared
    # by the exit passes that keep it; without checkpointing each gradient-window exit pass saves its own keys too
    assert plan["kv_cache_share"] == 18 / 21
    plain = DMD.memory_plan({**cfg, "num_training_frames": 6}, {"model_type": "lora", "gradient_checkpointing": False},
                            layout={"causal": True, "latent_frames": 21})
    assert plain["kv_cache_share"] == (18 + 18 + 21) / 21  # only the last two blocks are in the gradient window

    from simpletuner_dmd.estimate import GIB, estimate
    from simpletuner_dmd.families.wan import WAN21_1_3B
    from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA

    host = {**HOST_SCHEMA.defaults(), "lora_rank": 16, "mixed_precision": "bf16"}
    est = estimate(family=WanCausalFamily(), config=WAN21_1_3B, host=host, method_plan=plan, width=832, height=480,
                   frames=81)
    kv = 18 / 21 * est.shape["tokens"] * est.shape["hidden"] * est.shape["blocks"] * 2 * 2 / GIB  # K and V, bf16
    assert est.parts["KV cache (block-causal rollout)"] == pytest.approx(kv)
    bidirectional = estimate(family=WanFamily(), config=WAN21_1_3B, host=host,
                             method_plan=DMD.memory_plan(cfg, {"model_type": "lora"}), width=832, height=480,
                             frames=81)
    assert est.peak_gib == pytest.approx(bidirectional.peak_gib + kv)
