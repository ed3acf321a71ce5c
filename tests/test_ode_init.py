"""The ``ode_init`` method: the causal student's regression onto the teacher's ODE trajectories (per-block steps
under the block-causal mask), its passes, its checkpoint, and the chain ode_init → DMD through ``init_lora``."""

from __future__ import annotations

import json

import pytest
import torch

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.families.block_causal import frame_blocks, frame_timesteps
from simpletuner_dmd.families.wan_causal import WanCausalFamily
from simpletuner_dmd.method_toolkit import draw_block_exits as draw_block_steps  # the draws ode_init uses
from simpletuner_dmd.method_toolkit import regression_loss
from simpletuner_dmd.methods.ode_init.method import ODEInit
from simpletuner_dmd.plugins import get_plugin_manager, registered_methods
from tests.tiny_methods import batch, build_method, perturb_adapters, step_info

PAIRS = {"dmd_denoising_steps": [1000, 600, 300], "regression_num_pairs": 4, "regression_teacher_steps": 3,
         "regression_prompts": ["a cat", "a dog"], "regression_latent_shape": [16, 3, 4, 4],
         "real_score_guidance_scale": 1.0, "num_frame_per_block": 1}


def test_ode_init_is_a_registered_method_sharing_dmds_keys():
    methods = registered_methods(get_plugin_manager())
    assert methods["ode_init"].cls is ODEInit
    dmd = methods["dmd"].cls.schema.by_name
    for key in ODEInit.schema.keys:  # same names, same defaults: a DMD config runs ode_init unchanged
        assert dmd[key.name].default == key.default


def test_block_steps_follow_the_keys():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert draw_block_steps(4, 3, same_step_across_blocks=False, last_step_only=True, generator=g()) == [2] * 4
    same = draw_block_steps(4, 3, same_step_across_blocks=True, last_step_only=False, generator=g())
    assert len(set(same)) == 1
    each = draw_block_steps(6, 3, same_step_across_blocks=False, last_step_only=False, generator=g())
    assert each[0] == same[0] and len(set(each)) > 1  # the first draw is shared; the others are the blocks' own


def test_causal_loss_is_the_regression_of_one_masked_pass_with_per_block_steps(tiny_wan, tmp_path):
    run = build_method(tiny_wan, ODEInit, PAIRS, host={"cache_dir": str(tmp_path), "validation_prompt": "a cat"},
                       family=WanCausalFamily())
    perturb_adapters(run.models.network)
    method = run.method
    result = method.distill_loss(batch=batch(b=2, frames=3), step=step_info(0), host_loss=None)
    result.loss.backward()
    method.distill_after_optimizer_step(step=step_info(0))
    passes = method.distill_metrics(step=step_info(0))
    # one student forward with grad (batch 2) and its backward; no teacher, no second network
    assert {k: v for k, v in passes.items() if v} == {
        "passes/student_forward": 1.0, "passes/student_forward_samples": 2.0,
        "passes/student_forward_with_grad": 1.0, "passes/student_backward": 1.0}

    # the same loss by hand: the pairs the stream gave, the blocks' steps from the step's generator
    pairs = method.pair_source.pairs.stream(2, seed=method.pair_source.stream.seed).take(2)
    ks = draw_block_steps(3, 3, same_step_across_blocks=False, last_step_only=False, generator=step_info(0).generator)
    assert result.logs["ode_init_step_index"] == pytest.approx(sum(ks) / 3)
    x = torch.cat([pairs.states[:, k, :, f:f + 1] for f, k in enumerate(ks)], dim=2)
    t = torch.tensor([[float(PAIRS["dmd_denoising_steps"][k]) for k in ks]] * 2)
    cond = run.family.concat_conditions([method.pair_source.conds[i] for i in pairs.cond_index.tolist()])
    switch = run.family.block_causal(run.models.network)
    tokens = switch.tokens_per_frame(x)
    with torch.no_grad(), switch.masked(frame_blocks(3, 1), tokens):
        flow = run.models.network(x, timestep=frame_timesteps(t, tokens), encoder_hidden_states=cond,
                                  return_dict=False)[0]
    x0 = x - (t / 1000)[:, None, :, None, None] * flow
    assert result.logs["ode_init_loss"] == pytest.approx(float(regression_loss(x0, pairs.x0, "l2")), rel=1e-5)

    # and a later block's input does not reach an earlier block's output (the mask holds inside the loss's pass)
    with torch.no_grad(), switch.masked(frame_blocks(3, 1), tokens):
        changed = x.clone()
        changed[:, :, 2] += 1.0
        again = run.models.network(changed, timestep=frame_timesteps(t, tokens), encoder_hidden_states=cond,
                                   return_dict=False)[0]
    torch.testing.assert_close(again[:, :, :2], flow[:, :, :2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(again[:, :, 2], flow[:, :, 2])


def test_bidirectional_loss_uses_one_step_for_the_batch(tiny_wan, tmp_path):
    cfg = {k: v for k, v in PAIRS.items() if k != "num_frame_per_block"}
    run = build_method(tiny_wan, ODEInit, cfg, host={"cache_dir": str(tmp_path)})
    result = run.method.distill_loss(batch=batch(b=2, frames=3), step=step_info(1), host_loss=None)
    k = draw_block_steps(1, 3, same_step_across_blocks=True, last_step_only=False, generator=step_info(1).generator)
    assert result.logs["ode_init_step_index"] == k[0] and result.loss.requires_grad
    assert ODEInit.config_warnings({**ODEInit.schema.defaults(), "num_frame_per_block": 2},
                                   type(run.family), {}) == [
        "distillation_config.num_frame_per_block: has no effect with the bidirectional family 'wan' (the whole clip "
        "is one block)"]


@pytest.mark.slow
def test_ode_init_then_dmd_through_init_lora(job, tmp_path, capsys):
    """ode_init on the causal family through the reference host (train, checkpoint, resume, export), then DMD
    started from its LoRA with the same keys."""
    from simpletuner_dmd.hosts.reference.trainer import train

    keys = {**PAIRS, "regression_latent_shape": None}
    common = dict(model_family="wan-causal", checkpoint_step_interval=1, validation_step_interval=0,
                  disable_benchmark=True, use_ema=False, ema_validation="none", validation_prompt="a cat")
    out = train(job(distillation_method="ode_init", distillation_config=keys, max_train_steps=2, **common))
    log = capsys.readouterr().out
    assert (out / "checkpoint-2" / "ode_init" / "state.json").is_file() and "teacher ODE pairs: generating" in log
    assert json.loads((out / "checkpoint-2" / "ode_init" / "state.json").read_text())["pair_shape"] is not None
    assert (out / "validation" / "step-2").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    train(job(distillation_method="ode_init", distillation_config=keys, max_train_steps=3, **common))
    assert "resumed from" in capsys.readouterr().out and (out / "checkpoint-3").is_dir()

    # the export says how the causal student must be run, and `sample` streams it block by block, longer than trained
    from simpletuner_dmd.sample import SampleRequest, sample

    info = json.loads((out / "simpletuner_dmd.json").read_text())
    assert info["streaming"] == {"timesteps": [1000, 600, 300], "num_frame_per_block": 1,
                                 "independent_first_frame": False, "context_noise": 0.0, "kv_cache_window": None}
    assert "## Run it block by block" in (out / "README.md").read_text()
    lines: list[str] = []
    written = sample(SampleRequest(base=info["base_model"], student=out, out=tmp_path / "samples",
                                   prompts={"cat": "a cat"}, seeds=[0], frames=9), log=lines.append)
    assert [line.split(": ", 1)[1] for line in lines[:3]] == ["block 1/3 → frames 0–0", "block 2/3 → frames 1–4",
                                                              "block 3/3 → frames 5–8"]
    assert written == [tmp_path / "samples" / "cat" / "seed-0" / "student" / "sample.gif"]
    assert len(list(written[0].parent.glob("frame-*.png"))) == 9

    first = tmp_path / "ode-init-student"
    out.rename(first)
    dmd = {**keys, "generator_update_interval": 1}
    train(job(distillation_method="dmd", distillation_config=dmd, max_train_steps=1,
              init_lora=str(first), **common))
    log = capsys.readouterr().out
    assert "init_lora: loaded" in log and str(first / "pytorch_lora_weights.safetensors") in log


def test_init_lora_loads_the_exported_weights_and_refuses_a_mismatch(tiny_wan, tmp_path):
    from simpletuner_dmd.hosts.reference import trainer as T

    a = build_method(tiny_wan, ODEInit, PAIRS, host={"cache_dir": str(tmp_path)}, family=WanCausalFamily())
    perturb_adapters(a.models.network, seed=3)
    state = T._peft_state(a.models.network)
    lora_config = a.models.network.peft_config[T.STUDENT_ADAPTER]
    a.family.save_lora(state, tmp_path, lora_config)
    b = build_method(tiny_wan, ODEInit, PAIRS, host={"cache_dir": str(tmp_path), "init_lora": str(tmp_path)},
                     family=WanCausalFamily())
    loaded = T._peft_state(b.models.network)
    assert loaded.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(loaded[key], state[key])
    with pytest.raises(UserError, match="another lora_rank"):
        build_method(tiny_wan, ODEInit, PAIRS, host={"cache_dir": str(tmp_path), "init_lora": str(tmp_path),
                                                     "lora_rank": 4}, family=WanCausalFamily())
    with pytest.raises(UserError, match="not found"):
        build_method(tiny_wan, ODEInit, PAIRS, host={"init_lora": str(tmp_path / "nothing")})
