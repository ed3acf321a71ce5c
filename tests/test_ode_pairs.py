"""Teacher ODE pairs (``simpletuner_dmd.ode_pairs``) and DMD's regression term on them.

A toy flow network in the Wan call convention (so the Wan family's own ``euler_sampler`` is the reference) keeps these
fast; one test runs the term on the tiny Wan transformer with real LoRA adapters.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from simpletuner_dmd.errors import ConfigError, UserError
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.flow import flow_to_x0, guided
from simpletuner_dmd.method_toolkit import PSEUDO_HUBER_C, draw_exit_index, regression_loss
from simpletuner_dmd.methods.dmd.method import DMD
from simpletuner_dmd.ode_pairs import ODEPairs, ODEPairSpec, generate_shards, ode_grid, prepare_ode_pairs
from simpletuner_dmd.types import Batch, RunContext
from tests.tiny_methods import embed, step_info

SHAPE = (4, 1, 2, 2)
FAMILY = WanFamily()
PROMPTS = ("a red fox", "a blue jay", "a green frog")


class ToyNet(torch.nn.Module):
    """A small nonlinear flow network called like Wan's transformer: latents (B, C, F, H, W), text (B, L, D)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE)
        self.lin = torch.nn.Linear(d + 1 + 32, d)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(self.lin.weight.shape, generator=g) * 0.3)
            self.lin.bias.copy_(torch.randn(self.lin.bias.shape, generator=g) * 0.1)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        x = hidden_states.flatten(1).float()
        inputs = torch.cat([x, timestep.float()[:, None] / 1000.0, encoder_hidden_states.float().mean(1)], dim=1)
        return (torch.tanh(self.lin(inputs)).view_as(hidden_states) - hidden_states,)


def teacher_of(net, uncond, scale, calls=None, fail_after=None):
    """The guided teacher as DMD hands it over (standard CFG, cond and uncond as one batch), counting its calls."""

    def teacher(x, t, cond):
        if calls is not None:
            calls.append(x.shape[0])
            if fail_after is not None and len(calls) > fail_after:
                raise RuntimeError("interrupted")
        both = FAMILY.concat_conditions([cond, FAMILY.repeat_condition(uncond, x.shape[0])])
        c, u = FAMILY.predict_flow(net, torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        return guided(c, u, scale)

    return teacher


def conds():
    return [embed([p]) for p in PROMPTS]


def spec(**overrides):
    base = dict(teacher_id="toy", prompts=PROMPTS, shape=SHAPE, count=6, seed=3, student_steps=(1000, 600, 300),
                teacher_steps=10, shift=1.0, guidance_scale=3.0, negative_prompt="ugly", shard_size=4)
    return ODEPairSpec(**{**base, **overrides})


def all_pairs(pairs: ODEPairs) -> dict[str, torch.Tensor]:
    shards = [pairs.load_shard(i) for i in range(pairs.num_shards)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def direct_euler(teacher, noise, cond, sigmas):
    """An independent Euler loop over ``sigmas``: every state, in fp32."""
    x, states = noise.float(), [noise.float()]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * teacher(x, torch.full((x.shape[0],), s * 1000.0), cond)
        states.append(x)
    return states


# --------------------------------------------------------------------------- the pairs


def test_x0_is_the_family_euler_sampler_and_states_lie_on_its_trajectory(tmp_path):
    net, uncond = ToyNet(), embed(["ugly"])
    teacher = teacher_of(net, uncond, 3.0)
    pairs = prepare_ode_pairs(spec(), teacher, conds(), family=FAMILY, cache_dir=tmp_path, progress=False, log=None)
    data = all_pairs(pairs)
    assert data["noise"].shape == (6, *SHAPE) and data["states"].shape == (6, 3, *SHAPE)
    assert data["cond_index"].tolist() == [0, 1, 2, 0, 1, 2]
    cond = FAMILY.concat_conditions([conds()[i] for i in data["cond_index"].tolist()])
    # the dmd points 1000, 600, 300 lie on the 10-step grid: the family's own sampler is the reference
    sampled = FAMILY.euler_sampler(net, steps=10, shift=1.0)(data["noise"], cond, uncond, 3.0, None)
    torch.testing.assert_close(data["x0"], sampled, atol=2e-6, rtol=1e-5)
    states = direct_euler(teacher, data["noise"], cond, [1 - i / 10 for i in range(11)])
    for k, i in enumerate((0, 4, 7)):  # σ = 1, 0.6, 0.3
        torch.testing.assert_close(data["states"][:, k], states[i], atol=2e-6, rtol=1e-5)
    assert torch.equal(data["states"][:, 0], data["noise"])


def test_off_grid_student_points_are_inserted_into_the_shifted_schedule(tmp_path):
    grid = ode_grid(8, 3.0, (1000, 757, 522))
    base = [3 * s / (1 + 2 * s) for s in (1 - i / 8 for i in range(9))]
    assert len(grid.sigmas) == 11 and list(grid.sigmas) == sorted(grid.sigmas, reverse=True)
    assert [grid.sigmas[i] for i in grid.state_index] == [1.0, 0.757, 0.522]
    assert all(min(abs(s - b) for s in grid.sigmas) < 1e-12 for b in base)

    net, uncond = ToyNet(), embed(["ugly"])
    teacher = teacher_of(net, uncond, 3.0)
    s = spec(student_steps=(1000, 757, 522), teacher_steps=8, shift=3.0, count=2)
    data = all_pairs(prepare_ode_pairs(s, teacher, conds(), family=FAMILY, cache_dir=tmp_path, progress=False,
                                       log=None))
    cond = FAMILY.concat_conditions([conds()[i] for i in data["cond_index"].tolist()])
    merged = sorted(set(base) | {0.757, 0.522}, reverse=True)
    states = direct_euler(teacher, data["noise"], cond, merged)
    torch.testing.assert_close(data["x0"], states[-1], atol=2e-6, rtol=1e-5)
    for k, sigma in enumerate((1.0, 0.757, 0.522)):
        torch.testing.assert_close(data["states"][:, k], states[merged.index(sigma)], atol=2e-6, rtol=1e-5)


def test_cache_is_generated_once_reused_and_regenerated_when_the_key_or_teacher_changes(tmp_path):
    net, uncond = ToyNet(), embed(["ugly"])
    calls: list[int] = []
    first = prepare_ode_pairs(spec(), teacher_of(net, uncond, 3.0, calls), conds(), family=FAMILY,
                              cache_dir=tmp_path, progress=False, log=None)
    # the probe (one call of one sample), then 10 Euler steps for each of the two shards
    assert calls == [1] + [4] * 10 + [2] * 10
    first_x0 = all_pairs(first)["x0"]
    calls.clear()
    again = prepare_ode_pairs(spec(), teacher_of(net, uncond, 3.0, calls), conds(), family=FAMILY,
                              cache_dir=tmp_path, progress=False, log=None)
    assert calls == [1], "a reused cache runs only the one-sample teacher probe"
    assert again.folder == first.folder and torch.equal(all_pairs(again)["x0"], first_x0)

    for changed in (spec(seed=4), spec(guidance_scale=4.0), spec(prompts=PROMPTS[:2]), spec(teacher_steps=12),
                    spec(student_steps=(1000, 500)), spec(teacher_id="another")):
        calls.clear()
        c = conds()[:len(changed.prompts)]
        other = prepare_ode_pairs(changed, teacher_of(net, uncond, changed.guidance_scale, calls), c,
                                  family=FAMILY, cache_dir=tmp_path, progress=False, log=None)
        assert len(calls) > 1 and other.folder != first.folder, changed

    # the same key with another teacher behind it (retrained weights): the probe differs, the cache is regenerated
    retrained = copy.deepcopy(net)
    with torch.no_grad():
        retrained.lin.bias.add_(0.05)
    calls.clear()
    regenerated = prepare_ode_pairs(spec(), teacher_of(retrained, uncond, 3.0, calls), conds(), family=FAMILY,
                                    cache_dir=tmp_path, progress=False, log=None)
    assert len(calls) == 21 and regenerated.folder == first.folder
    assert not torch.equal(all_pairs(regenerated)["x0"], first_x0)


def test_an_interrupted_generation_leaves_no_complete_cache_and_resumes_its_shards(tmp_path):
    net, uncond = ToyNet(), embed(["ugly"])
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="interrupted"):  # during the second shard
        prepare_ode_pairs(spec(), teacher_of(net, uncond, 3.0, calls, fail_after=15), conds(), family=FAMILY,
                          cache_dir=tmp_path, progress=False, log=None)
    final = tmp_path / spec().folder_name
    assert not final.exists()
    with pytest.raises(UserError, match="not a complete"):
        ODEPairs.open(final)
    calls.clear()
    resumed = prepare_ode_pairs(spec(), teacher_of(net, uncond, 3.0, calls), conds(), family=FAMILY,
                                cache_dir=tmp_path, progress=False, log=None)
    assert calls == [1] + [2] * 10, "the finished shard is kept; only the missing one is solved"
    # identical to an uninterrupted generation, and to one split over two processes
    clean = prepare_ode_pairs(spec(), teacher_of(net, uncond, 3.0), conds(), family=FAMILY,
                              cache_dir=tmp_path / "clean", progress=False, log=None)
    split = tmp_path / "split"
    for rank in (0, 1):
        assert generate_shards(spec(), teacher_of(net, uncond, 3.0), conds(), family=FAMILY, folder=split,
                               rank=rank, world=2, progress=False) == [rank]
    for name, value in all_pairs(clean).items():
        assert torch.equal(all_pairs(resumed)[name], value), name
        shards = [ODEPairs(split, clean.manifest).load_shard(i)[name] for i in range(2)]
        assert torch.equal(torch.cat(shards), value), name
    manifest = json.loads((resumed.folder / "manifest.json").read_text())
    assert manifest["key"] == spec().key and [s["count"] for s in manifest["shards"]] == [4, 2]


def test_the_stream_reads_one_shard_at_a_time_cycles_and_reshuffles_each_epoch(tmp_path, monkeypatch):
    s = spec(count=10, shard_size=4, teacher_steps=2)
    pairs = prepare_ode_pairs(s, teacher_of(ToyNet(), embed(["ugly"]), 3.0), conds(), family=FAMILY,
                              cache_dir=tmp_path, progress=False, log=None)
    everything = all_pairs(pairs)["noise"].flatten(1)
    loads: list[int] = []
    real = ODEPairs.load_shard
    monkeypatch.setattr(ODEPairs, "load_shard", lambda self, i: loads.append(i) or real(self, i))
    stream = pairs.stream(3, seed=7)
    first = next(stream)
    assert len(loads) == 1 and len(first) == 3 and first.states.shape == (3, 3, *SHAPE)
    assert first.timesteps == (1000, 600, 300)
    seen = [first] + [stream.take(1) for _ in range(7)]  # 10 pairs: one epoch
    assert sorted(loads) == [0, 1, 2] and stream.epoch == 1
    epoch1 = torch.cat([b.noise for b in seen]).flatten(1)
    assert sorted(map(tuple, epoch1.tolist())) == sorted(map(tuple, everything.tolist()))  # each pair once
    epoch2 = torch.cat([stream.take(5).noise, stream.take(5).noise]).flatten(1)
    assert stream.epoch == 2 and len(loads) == 6
    assert sorted(map(tuple, epoch2.tolist())) == sorted(map(tuple, everything.tolist()))
    assert not torch.equal(epoch1, epoch2)  # reshuffled
    again = pairs.stream(3, seed=7)
    assert torch.equal(next(again).x0, first.x0)  # the order is the seed's


# --------------------------------------------------------------------------- DMD's regression term


def build_toy_dmd(tmp_path, dmd=None, host=None):
    """DMD with a full toy student, a separate frozen toy teacher and a full-copy fake score (as case A hosts it)."""
    from accelerate import Accelerator

    cfg, problems, _ = DMD.schema.validate({"dmd_denoising_steps": [1000, 600, 300], "regression_prompts":
                                            list(PROMPTS), "regression_num_pairs": 8,
                                            "regression_teacher_steps": 4, **(dmd or {})},
                                           prefix="distillation_config")
    assert not problems, problems
    host = {"model_type": "full", "seed": 0, "cache_dir": str(tmp_path), "flow_schedule_shift": 1.0, **(host or {})}
    method = DMD(cfg)
    student = ToyNet(1).requires_grad_(True)
    method.distill_setup(run=RunContext(
        host_config=host, method_config=cfg, family=FAMILY, student=student, accelerator=Accelerator(cpu=True),
        encode_prompts=embed, negative_prompt="ugly", output_dir=None, model_type="full", student_adapter=None,
        load_base=lambda: ToyNet(1), teacher=ToyNet(0).requires_grad_(False), seed=0))
    return method, student


def toy_batch(b=2):
    g = torch.Generator().manual_seed(0)
    return Batch(latents=torch.randn(b, *SHAPE, generator=g), cond=embed(["x", "y"])[:b])


def no_host_loss():
    raise AssertionError("DMD must not ask for the host's loss")


def one_step(method, student):
    torch.manual_seed(5)
    result = method.distill_loss(batch=toy_batch(), step=step_info(0), host_loss=no_host_loss)
    student.zero_grad(set_to_none=True)
    result.loss.backward()
    method.distill_after_optimizer_step(step=step_info(0))
    method.distill_metrics(step=step_info(0))
    return result, {n: p.grad.clone() for n, p in student.named_parameters()}


def test_regression_term_adds_the_metric_gradient_and_one_student_pass(tmp_path):
    weight = 0.5
    base, base_student = build_toy_dmd(tmp_path, {"regression_loss_weight": 0.0})
    assert base.pair_source is None and not (tmp_path / "ode_pairs").exists()  # off: nothing generated
    off, grads_off = one_step(base, base_student)
    assert "regression_loss" not in off.logs

    method, student = build_toy_dmd(tmp_path, {"regression_loss_weight": weight})
    assert method.pair_source.pairs is None  # no regression_latent_shape: generated at the first generator step
    on, grads_on = one_step(method, student)
    assert method.pair_source.pairs.spec.shape == SHAPE and method.pair_source.pairs.spec.guidance_scale == 3.0
    assert method.pair_source.pairs.spec.prompts == PROMPTS and method.pair_source.pairs.spec.negative_prompt == "ugly"
    # the DMD part is untouched: same exit index, same loss, the regression term on top
    assert on.logs["dmd_exit_index"] == off.logs["dmd_exit_index"] and on.logs["dmd_loss"] == off.logs["dmd_loss"]
    assert on.loss.item() == pytest.approx(off.loss.item() + weight * on.logs["regression_loss"], rel=1e-6)

    # the passes: exactly one more student forward (with grad, batch 2) and one more student backward
    extra = {k: method.last_step_passes.get(k, 0) - base.last_step_passes.get(k, 0)
             for k in set(method.last_step_passes) | set(base.last_step_passes)}
    assert {k: v for k, v in extra.items() if v} == {"student_forward": 1, "student_forward_samples": 2,
                                                      "student_forward_with_grad": 1, "student_backward": 1}
    plan_on = DMD.memory_plan(method.cfg, {"model_type": "full"})["passes_per_step"]
    plan_off = DMD.memory_plan(base.cfg, {"model_type": "full"})["passes_per_step"]
    assert {k: plan_on[k] - plan_off[k] for k in plan_on if plan_on[k] != plan_off[k]} == {
        "student_forward": 1, "student_backward": 1}

    # the gradient's difference is weight · ∇metric on the same pairs at the same student step, computed by hand
    pairs = method.pair_source.pairs.stream(2, seed=method.pair_source.stream.seed).take(2)
    g = step_info(0).generator
    draw_exit_index(3, last_step_only=False, generator=g)  # the rollout's
    k = draw_exit_index(3, last_step_only=False, generator=g)
    assert on.logs["regression_index"] == k
    hand = ToyNet(1)
    cond = FAMILY.concat_conditions([method.pair_source.conds[i] for i in pairs.cond_index.tolist()])
    t = torch.full((2,), float(method.steps[k]))

    def metric(net):
        return regression_loss(flow_to_x0(pairs.states[:, k], FAMILY.predict_flow(net, pairs.states[:, k], t,
                                                                                  cond), t), pairs.x0, "l2")

    reg = metric(hand)
    assert reg.item() == pytest.approx(on.logs["regression_loss"], rel=1e-6)
    expected = torch.autograd.grad(weight * reg, list(hand.parameters()))
    for (name, _), want in zip(hand.named_parameters(), expected):
        torch.testing.assert_close(grads_on[name] - grads_off[name], want, atol=1e-6, rtol=1e-4)
    # and a step along it moves the student's x̂0 toward the teacher's solutions
    with torch.no_grad():
        for p, want in zip(hand.parameters(), expected):
            p.sub_(0.5 * want)
    assert metric(hand).item() < reg.item()

    # a resumed run keeps the shape its pairs were made for (its first batch may be of another bucket)
    method.distill_save_state(checkpoint_dir=tmp_path / "checkpoint")
    resumed, _ = build_toy_dmd(tmp_path, {"regression_loss_weight": weight})
    resumed.distill_load_state(checkpoint_dir=tmp_path / "checkpoint")
    assert resumed.pair_source.shape == SHAPE and resumed.pair_source.pairs is None


def test_regression_pairs_at_setup_on_the_tiny_wan_with_adapters(tiny_wan, tmp_path):
    from tests.tiny_methods import batch, build_method

    # one student step, one pair, one Euler step: the cheapest run of the whole path on real adapters
    run = build_method(tiny_wan, DMD, {"dmd_denoising_steps": [1000], "regression_loss_weight": 1.0,
                                       "regression_latent_shape": [16, 1, 4, 4], "regression_num_pairs": 1,
                                       "regression_teacher_steps": 1, "regression_metric": "pseudo_huber"},
                       host={"cache_dir": str(tmp_path), "validation_prompt": "a cat"})
    method = run.method
    pairs = method.pair_source.pairs
    assert pairs is not None and pairs.num_pairs == 1 and pairs.prompts == ("a cat",)
    assert method.passes.take() == {}  # the generation's teacher passes are not a step's passes
    net = run.models.network
    result = method.distill_loss(batch=batch(b=1, frames=1), step=step_info(0), host_loss=no_host_loss)
    result.loss.backward()
    method.distill_metrics(step=step_info(0))
    assert result.logs["regression_loss"] > 0
    assert method.last_step_passes["student_forward"] == 2  # the rollout's one step and the regression's
    assert method.last_step_passes["student_backward"] == 2
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads and all(".student." in n for n in grads)  # the student's adapter, nothing else


def test_bad_regression_settings_are_one_line_each(tmp_path):
    from simpletuner_dmd.hosts.reference.run_config import validate_config
    from simpletuner_dmd.plugins import get_plugin_manager

    raw = {"model_family": "wan", "pretrained_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
           "distillation_method": "dmd",
           "distillation_config": {"regression_metric": "l3", "regression_num_pairs": 0,
                                   "regression_latent_shape": [16, 0]}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw, get_plugin_manager(), check_paths=False)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("distillation_config.regression_") for line in lines), lines
    assert "did you mean 'l2'" in lines[0] or "'l2'" in lines[0]

    with pytest.raises(UserError) as info:  # neither regression_prompts nor the host's validation_prompt
        build_toy_dmd(tmp_path, {"regression_loss_weight": 1.0, "regression_prompts": None})
    assert len(str(info.value).splitlines()) == 1 and "regression_prompts" in str(info.value)


def test_estimate_counts_the_regression_pass_and_its_second_graph():
    from simpletuner_dmd.estimate import estimate
    from simpletuner_dmd.families.wan import WAN21_1_3B
    from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA

    host = {**HOST_SCHEMA.defaults(), "lora_rank": 32, "gradient_checkpointing": True, "model_family": "wan"}
    est = {}
    for weight in (0.0, 0.5):
        cfg, problems, _ = DMD.schema.validate({"regression_loss_weight": weight, "last_step_only": True},
                                               prefix="distillation_config")
        assert not problems
        est[weight] = estimate(family=WanFamily(), config={**WAN21_1_3B, "num_layers": 2}, host=host,
                               method_plan=DMD.memory_plan(cfg, host), width=832, height=480, frames=81)
    off, on = est[0.0], est[0.5]
    assert on.passes["student_forward"] == off.passes["student_forward"] + 1
    assert on.passes["student_backward"] == off.passes["student_backward"] + 1
    assert on.phase == "student" and on.parts["activations"] == pytest.approx(2 * off.parts["activations"])


def test_regression_metrics():
    student = torch.zeros(2, 4, 1, 1, 1)
    teacher = torch.cat([torch.ones(1, 4, 1, 1, 1), 3 * torch.ones(1, 4, 1, 1, 1)])
    assert regression_loss(student, teacher, "l2").item() == pytest.approx(5.0)
    assert regression_loss(student, teacher, "l1").item() == pytest.approx(2.0)
    c = PSEUDO_HUBER_C
    expected = ((1 + c * c) ** 0.5 - c + (9 + c * c) ** 0.5 - c) / 2
    assert regression_loss(student, teacher, "pseudo_huber").item() == pytest.approx(expected)
