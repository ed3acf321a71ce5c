"""Wan 2.2 A14B's teacher guidance per expert (``real_score_guidance_scale_2``, ``validation_teacher_guidance_2``,
the host's ``boundary_ratio``): each expert's teacher call is guided at its own scale, checked against the CFG
computed by hand from the teacher's cond and uncond predictions on a batch split across the boundary (DMD's real
score, the teacher's ODE pairs, the Euler sampler the validation's teacher samples use); the boundary override moves
the switch; the card's stock-pipeline code passes the pair and the boundary; a one-scale config runs bit for bit as
before; the keys set for a family without experts are reported by name."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.families.wan_experts import WanExpertsFamily
from simpletuner_dmd.flow import guided
from simpletuner_dmd.methods.dmd.method import DMD
from simpletuner_dmd.ode_pairs import ODEPairSpec
from simpletuner_dmd.pair_source import guided_teacher
from tests.tiny_methods import build_method

HIGH, LOW = 3.0, 5.0  # guidance_scale (transformer, t >= 875) and guidance_scale_2 (transformer_2)
T = torch.tensor([999.0, 875.0, 874.9, 20.0])  # two samples on each side of T2V-A14B's boundary 875


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory):
    return WanExpertsFamily.make_tiny(tmp_path_factory.mktemp("tiny-experts") / "tiny-wan22")


@pytest.fixture(scope="module")
def dmd_pair(tiny_experts):
    return build_method(tiny_experts, DMD, {"real_score_guidance_scale": HIGH, "real_score_guidance_scale_2": LOW},
                        family=WanExpertsFamily(), host={"base_model_precision": "no_change"})


def _inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, 2, 4, 4, generator=g), torch.randn(b, 8, 32, generator=g)


def _by_hand(nets, x, t, cond, scales):
    """The teacher's cond and uncond flows, each sample alone, combined as u + s·(c − u) at its own scale."""
    rows = []
    with torch.no_grad():
        for i, s in enumerate(scales):
            c = nets.teacher_flow(x[i:i + 1], t[i:i + 1], cond[i:i + 1], bare=True)
            u = nets.teacher_flow(x[i:i + 1], t[i:i + 1], nets.uncond, bare=True)
            rows.append(u + s * (c - u))
    return torch.cat(rows)


def test_dmd_real_score_guides_each_expert_at_its_own_scale(dmd_pair):
    """The real score DMD's generator turn uses (``nets.guided`` with ``_real_combine(t)``), on a batch split by the
    boundary, against the hand CFG per side; a spy on the experts confirms which expert ran which timesteps."""
    method, network = dmd_pair.method, dmd_pair.models.network
    x, cond = _inputs()
    calls = []
    hooks = [getattr(network, name).register_forward_pre_hook(
        lambda _m, _a, kw, name=name: calls.append((name, kw["timestep"].tolist())), with_kwargs=True)
        for name in ("transformer", "transformer_2")]
    with torch.no_grad():
        ours = method.nets.guided(method.nets.teacher_flow, x, T, cond, method._real_combine(T))
    for hook in hooks:
        hook.remove()
    assert {name for name, _ in calls} == {"transformer", "transformer_2"}
    assert all((t >= 875) == (name == "transformer") for name, ts in calls for t in ts)
    torch.testing.assert_close(ours, _by_hand(method.nets, x, T, cond, [HIGH, HIGH, LOW, LOW]), rtol=1e-5, atol=1e-5)
    # not vacuous: one scale on both sides is another prediction
    assert not torch.allclose(ours, _by_hand(method.nets, x, T, cond, [HIGH] * 4), rtol=1e-3, atol=1e-3)


def test_the_ode_pairs_teacher_guides_each_expert_at_its_own_scale(dmd_pair):
    """``guided_teacher`` (DMD's regression pairs, ``ode_init``) with the second scale."""
    nets = dmd_pair.method.nets
    x, cond = _inputs(seed=1)
    with torch.no_grad():
        ours = guided_teacher(nets, HIGH, (0.0, 1000.0), LOW)(x, T, cond)
    torch.testing.assert_close(ours, _by_hand(nets, x, T, cond, [HIGH, HIGH, LOW, LOW]), rtol=1e-5, atol=1e-5)


def test_a_guidance_interval_still_applies_per_sample(dmd_pair):
    """Inside ``real_score_guidance_interval`` each expert's scale, outside cond only (scale 1)."""
    nets = dmd_pair.method.nets
    x, cond = _inputs(seed=2)
    with torch.no_grad():
        ours = guided_teacher(nets, HIGH, (0.0, 900.0), LOW)(x, T, cond)
    torch.testing.assert_close(ours, _by_hand(nets, x, T, cond, [1.0, HIGH, LOW, LOW]), rtol=1e-5, atol=1e-5)


def test_one_scale_is_bit_identical_to_the_one_scale_cfg(tiny_experts, dmd_pair):
    """No second scale, the same scale twice, or a family without experts: the real score is ``flow.guided`` at
    the one scale, bit for bit (the path every run took before the second scale existed)."""
    x, cond = _inputs(seed=3)
    nets = dmd_pair.method.nets
    with torch.no_grad():
        c = nets.teacher_flow(x, T, cond)
        u = nets.teacher_flow(x, T, nets.family.repeat_condition(nets.uncond, 4))
    expected = guided(c, u, HIGH)
    for second in (None, HIGH):
        built = build_method(tiny_experts, DMD, {"real_score_guidance_scale": HIGH,
                                                 "real_score_guidance_scale_2": second},
                             family=WanExpertsFamily(), host={"base_model_precision": "no_change"})
        combine = built.method._real_combine(T)
        assert torch.equal(combine(c, u), expected)
    wan = build_method(tiny_experts, DMD, {"real_score_guidance_scale": HIGH, "real_score_guidance_scale_2": LOW},
                       family=WanFamily(), host={"base_model_precision": "no_change"},
                       new_network=lambda: WanExpertsFamily().load_network(str(tiny_experts), dtype=torch.float32))
    assert torch.equal(wan.method._real_combine(T)(c, u), expected)


def test_the_boundary_override_moves_the_switch(tiny_experts):
    family = WanExpertsFamily()
    network = family.load_network(str(tiny_experts), dtype=torch.float32)
    assert family.boundary_ratio == 0.875 and network.boundary_timestep == 875.0
    t = torch.tensor([950.0, 700.0, 100.0])
    assert family.expert_guidance(HIGH, LOW, t).tolist() == [HIGH, LOW, LOW]

    moved = WanExpertsFamily()
    moved.configure({"boundary_ratio": 0.5})
    network = moved.load_network(str(tiny_experts), dtype=torch.float32)
    assert moved.boundary_ratio == 0.5 and network.boundary_timestep == 500.0
    assert moved.expert_guidance(HIGH, LOW, t).tolist() == [HIGH, HIGH, LOW]
    calls = []
    hooks = [getattr(network, name).register_forward_pre_hook(
        lambda _m, _a, kw, name=name: calls.append((name, kw["timestep"].tolist())), with_kwargs=True)
        for name in ("transformer", "transformer_2")]
    x, cond = _inputs(b=3)
    with torch.no_grad():
        moved.predict_flow(network, x, t, cond)
    for hook in hooks:
        hook.remove()
    assert sorted(calls) == [("transformer", [950.0, 700.0]), ("transformer_2", [100.0])]


def test_the_euler_sampler_takes_the_pair(tiny_experts):
    """The Euler sampler the validation's teacher samples use, given ``(scale, scale_2)``: two steps, σ 1 → 0.5 on
    the high-noise expert at its scale, 0.5 → 0 on the low-noise expert at its own."""
    family = WanExpertsFamily()
    network = family.load_network(str(tiny_experts), dtype=torch.float32)
    x, cond = _inputs(b=1, seed=4)
    uncond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(5))

    def cfg(x_, t, s):
        c = family.predict_flow(network, x_, torch.tensor([t]), cond).float()
        u = family.predict_flow(network, x_, torch.tensor([t]), uncond).float()
        return u + s * (c - u)

    with torch.no_grad():
        ours = family.euler_sampler(network, steps=2, shift=1.0)(x, cond, uncond, (HIGH, LOW), None)
        x1 = x + (0.5 - 1.0) * cfg(x, 1000.0, HIGH)
        expected = x1 + (0.0 - 0.5) * cfg(x1, 500.0, LOW)
        one = family.euler_sampler(network, steps=2, shift=1.0)(x, cond, uncond, HIGH, None)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, one, rtol=1e-3, atol=1e-3)


def test_validation_samples_the_teacher_at_the_pair(tiny_experts, tmp_path):
    """The reference host's ``Validator`` hands its teacher sampler the pair for a family with experts, one scale
    for a family without (where the key has no effect)."""
    from types import SimpleNamespace

    from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
    from simpletuner_dmd.hosts.reference.validation import Validator

    host = {**HOST_SCHEMA.defaults(), "validation_teacher_guidance": HIGH, "validation_teacher_guidance_2": LOW}
    vae = SimpleNamespace(config=SimpleNamespace(z_dim=16, scale_factor_spatial=8, scale_factor_temporal=4))

    def validator(family):
        return Validator(host=host, family=family, components=SimpleNamespace(vae=vae), models=None, pm=None,
                         distilling=True, ema=None, prompt_conds={}, negative_cond=None, accelerator=None,
                         out=tmp_path, seed=0)

    assert validator(WanExpertsFamily()).teacher_guidance == (HIGH, LOW)
    assert validator(WanFamily()).teacher_guidance == HIGH


def test_the_card_passes_the_pair_and_the_boundary():
    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
    from simpletuner_dmd.hosts.reference.export import Export, model_card
    from tests.test_model_card import HOST, OUT

    family = WanExpertsFamily()
    family.boundary_ratio = 0.9  # as load_network leaves it after an override
    scheduler = FewStepFlowScheduler(few_step_timesteps=[1000, 757, 522])
    card = model_card(host=HOST, family=family, export=Export("dmd", DMD, {"real_score_guidance_scale": HIGH,
                                                                         "real_score_guidance_scale_2": LOW}, 10),
                      scheduler=scheduler, original_files=[], out=OUT, has_ema=False)
    assert "    guidance_scale=1.0,\n    guidance_scale_2=1.0,\n" in card
    assert "pipe.register_to_config(boundary_ratio=0.9)" in card
    assert "| dmd.real_score_guidance_scale_2 | 5.0 |" in card


def test_the_card_code_runs_the_stock_pipeline_at_the_boundary(tiny_experts):
    """The card's boundary line on a stock ``WanPipeline`` moves its switch (``pipe.config.boundary_ratio``)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_experts))
    family = WanExpertsFamily()
    family.boundary_ratio = 0.9
    exec("\n".join(family.pipeline_setup_code()), {"pipe": pipe})  # noqa: S102 — the card's own line
    assert pipe.config.boundary_ratio == 0.9


def test_the_ode_pairs_key_keeps_one_scale_and_names_the_pair():
    base = dict(teacher_id="t", prompts=("a",), shape=(16, 1, 2, 2), count=2, seed=0, student_steps=(1000, 500),
                guidance_scale=HIGH)
    one = ODEPairSpec(**base)
    assert "guidance_scale_2" not in one.to_json() and "boundary_ratio" not in one.to_json()
    pair = ODEPairSpec(**base, guidance_scale_2=LOW, boundary_ratio=0.875)
    assert pair.key != one.key and ODEPairSpec(**pair.to_json()) == pair
    assert ODEPairSpec(**base, guidance_scale_2=LOW, boundary_ratio=0.9).key != pair.key


def test_keys_for_experts_are_reported_for_a_family_without(job):
    from simpletuner_dmd.hosts.reference.run_config import load_config
    from simpletuner_dmd.plugins import get_plugin_manager

    method = {"distillation_method": "dmd", "distillation_config": {"real_score_guidance_scale_2": LOW}}
    rc = load_config(job(model_family="wan", boundary_ratio=0.9, validation_teacher_guidance_2=LOW, **method),
                     get_plugin_manager(), check_paths=False)
    text = "\n".join(rc.warnings)
    for key in ("config.boundary_ratio", "config.validation_teacher_guidance_2",
                "distillation_config.real_score_guidance_scale_2"):
        assert f"{key}: has no effect with the" in text and "wan" in text
    rc = load_config(job(model_family="wan2.2", boundary_ratio=0.9, validation_teacher_guidance_2=LOW, **method),
                     get_plugin_manager(), check_paths=False)
    assert not any("has no effect" in w for w in rc.warnings), rc.warnings


def test_the_simpletuner_bridge_reports_the_second_scale_for_its_one_expert_families():
    """Inside SimpleTuner the A14B flavours train one expert per run (the ``wan`` and ``simpletuner-model``
    families, no experts in one network): the bridge's method config names the key as having no effect."""
    from simpletuner_dmd.hosts.simpletuner.distiller import method_config_for
    from simpletuner_dmd.hosts.simpletuner.model_family import SimpleTunerModelFamily
    from simpletuner_dmd.plugins import get_plugin_manager

    config = {"distillation_config": {"real_score_guidance_scale_2": LOW}}
    for family_cls in (WanFamily, SimpleTunerModelFamily):
        selection = method_config_for(config, "dmd", get_plugin_manager(), family_cls=family_cls)
        assert any(w.startswith("distillation_config.real_score_guidance_scale_2: has no effect with the family "
                                f"{family_cls.name!r}") for w in selection.warnings), selection.warnings
