"""LCM and DCM math on tiny tensors, their schemas, and the keyed distillation_config now that lcm/dcm are registered."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.config import select_method_section
from simpletuner_dmd.hosts.reference.run_config import validate_config
from simpletuner_dmd.errors import ConfigError
from simpletuner_dmd import flow
from simpletuner_dmd.methods.dcm import discriminator as D
from simpletuner_dmd.methods.dcm import loss as DL
from simpletuner_dmd.methods.dcm.config import DCM_SCHEMA
from simpletuner_dmd.methods.lcm import loss as LL
from simpletuner_dmd.methods.lcm.config import LCM_SCHEMA
from simpletuner_dmd.plugins import get_plugin_manager


def path_point(x0, eps, t):
    """The exact point of the linear flow path at timestep t."""
    s = (t / 1000.0).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * eps


# --------------------------------------------------------------------------- LCM


def test_skipping_schedule_endpoints_spacing_and_shift():
    s = LL.skipping_schedule(50, 1.0)
    assert s.shape == (51,) and s[0] == 0 and s[-1] == 1000
    assert torch.allclose(s[1:] - s[:-1], torch.full((50,), 20.0))  # one skipping step k = 1000/N apart
    shifted = LL.skipping_schedule(50, 5.0)
    assert shifted[0] == 0 and shifted[-1] == 1000 and bool((shifted[1:] > shifted[:-1]).all())
    assert shifted[25] > s[25]  # a shift > 1 moves the points towards noise
    assert LL.sampling_timesteps(s, 4) == [float(s[i]) for i in (50, 38, 25, 13)]


def test_boundary_condition_makes_f_the_identity_at_t0():
    c_skip, c_out = LL.boundary_scalings(torch.tensor([0.0, 20.0, 999.0]), timestep_scaling=10.0)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-3 and c_out[2] > 0.999  # away from the boundary f is (almost) the x̂0 prediction
    x, v = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    zero = torch.zeros(2)
    assert torch.equal(LL.consistency_output(x, v, zero, timestep_scaling=10.0), x)  # f(x, 0) = x, whatever v is
    t = torch.tensor([500.0, 800.0])
    f = LL.consistency_output(x, v, t, timestep_scaling=10.0)
    cs, co = LL.boundary_scalings(t, timestep_scaling=10.0)
    x0 = x - (t / 1000).view(-1, 1, 1, 1, 1) * v
    assert torch.allclose(f, cs.view(-1, 1, 1, 1, 1) * x + co.view(-1, 1, 1, 1, 1) * x0)


def test_euler_step_is_exact_on_the_straight_path():
    x0, eps = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    t_from, t_to = torch.tensor([1000.0, 600.0, 20.0]), torch.tensor([980.0, 300.0, 0.0])
    stepped = flow.euler_step(path_point(x0, eps, t_from), eps - x0, flow.sigma_of(t_from), flow.sigma_of(t_to))
    assert torch.allclose(stepped, path_point(x0, eps, t_to), atol=1e-6)


def test_guidance_per_sample_is_the_standard_form():
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    out = flow.guided_per_sample(c, u, torch.tensor([1.0, 4.0]))
    assert torch.allclose(out[0], c[0]) and torch.allclose(out[1], u[1] + 4.0 * (c[1] - u[1]))


def test_huber_and_l2_losses():
    pred, target = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 0.0, 0.0])
    assert torch.isclose(LL.consistency_loss(pred, target, loss_type="l2", huber_c=1.0), torch.tensor(10.0 / 3))
    c = 0.5
    expected = ((torch.sqrt(pred ** 2 + c ** 2) - c)).mean()
    assert torch.isclose(LL.consistency_loss(pred, target, loss_type="huber", huber_c=c), expected)
    small = LL.consistency_loss(torch.tensor([1e-4]), torch.tensor([0.0]), loss_type="huber", huber_c=0.001)
    assert torch.isclose(small, torch.tensor(1e-8 / (2 * 0.001)), rtol=1e-2)  # quadratic near 0 ...
    big = LL.consistency_loss(torch.tensor([5.0]), torch.tensor([0.0]), loss_type="huber", huber_c=0.001)
    assert torch.isclose(big, torch.tensor(5.0 - 0.001), rtol=1e-5)  # ... linear far away
    grad_target = torch.tensor([1.0], requires_grad=True)
    LL.consistency_loss(torch.tensor([2.0]), grad_target, loss_type="l2", huber_c=1.0)
    assert not grad_target.requires_grad or grad_target.grad is None  # the target is a constant


def test_lcm_schema_checks():
    _, problems, _ = LCM_SCHEMA.validate({"w_min": 8.0, "w_max": 2.0}, prefix="distillation_config")
    assert problems == ["distillation_config.w_max: must be >= w_min (2.0 < 8.0)"]
    _, problems, _ = LCM_SCHEMA.validate({"loss_type": "hubber", "w_min": 0.5}, prefix="distillation_config")
    assert any("did you mean 'huber'" in p for p in problems) and any("w_min" in p for p in problems)
    _, problems, _ = LCM_SCHEMA.validate({"num_ddim_timesteps": 4, "num_inference_steps": 8}, prefix="d")
    assert problems and problems[0].startswith("d.num_inference_steps")


# --------------------------------------------------------------------------- DCM


def test_euler_schedule_phases_and_the_boundary():
    sigmas = DL.euler_sigmas(50, 17.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    edges = DL.phase_edges(50, 4)
    assert edges == [0, 12, 25, 37, 50]
    assert DL.phase_end(torch.tensor([0, 11, 12, 24, 25, 49]), edges).tolist() == [12, 12, 25, 25, 37, 50]
    boundary = DL.boundary_timestep(sigmas, edges)
    assert int(boundary) == 981  # SimpleTuner's hard-coded 981 is this boundary for its defaults
    t = torch.tensor([1000.0, boundary + 0.01, boundary, 500.0, 0.0])
    assert DL.expert_of(t, boundary).tolist() == [True, True, False, False, False]


def test_phase_jump_reaches_the_phase_end_on_the_straight_path_and_renoise_is_the_forward_path():
    x0, eps = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    s_from, s_end = torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.0])
    jumped = DL.phase_jump(path_point(x0, eps, s_from * 1000), eps - x0, s_from, s_end)
    assert torch.allclose(jumped, path_point(x0, eps, s_end * 1000), atol=1e-6)
    # from x at σ_end, with the same ε, re-noising lands on the path point at σ_adv
    s_adv = torch.tensor([0.95, 0.7])
    out = DL.renoise(path_point(x0, eps, s_end * 1000), eps, s_end, s_adv)
    assert torch.allclose(out, path_point(x0, eps, s_adv * 1000), atol=1e-6)
    assert DL.adversarial_index(torch.tensor([50, 12]), 50).tolist() == [15, 0]


def test_hinge_losses_and_feature_matching():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.0])]
    assert torch.isclose(DL.hinge_d_loss(real, fake), torch.tensor((0 + 0.5) / 2 + (0 + 1.0) / 2))
    assert torch.isclose(DL.hinge_g_loss(fake), torch.tensor((3.0 + 1.0) / 2))
    a, b = [torch.ones(2, 3), torch.zeros(2, 3)], [torch.zeros(2, 3), torch.zeros(2, 3)]
    assert torch.isclose(DL.feature_matching(a, b), torch.tensor(0.5))


@pytest.mark.parametrize("width,tokens", [(32, 48), (64, 7)])
def test_discriminator_takes_any_width_and_length_and_its_optimizer_changes_only_it(width, tokens):
    torch.manual_seed(0)
    disc = D.Discriminator(width, num_layers=2, hidden=16)
    other = torch.nn.Linear(width, width)  # stands for the student: it feeds the features but is not D's
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-2)
    before_d = [p.detach().clone() for p in disc.parameters()]
    before_o = [p.detach().clone() for p in other.parameters()]
    feats = [other(torch.randn(3, tokens, width)) for _ in range(2)]
    loss = DL.hinge_d_loss(disc([f.detach() for f in feats]), disc([f.detach() + 1 for f in feats]))
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_d, disc.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_o, other.parameters()))
    assert all(p.grad is None for p in other.parameters())
    with pytest.raises(ValueError, match="width"):
        disc([torch.randn(1, 4, width + 1)] * 2)


def test_feature_layers_follow_stride_and_total_layers():
    assert D.feature_layers(30, 2, None) == list(range(0, 30, 2))
    assert D.feature_layers(30, 3, 10) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="exceeds"):
        D.feature_layers(2, 1, 30)


def test_dcm_schema_rejects_what_cannot_act():
    _, problems, _ = DCM_SCHEMA.validate({"mode": "fine", "multiphase": 1}, prefix="distillation_config")
    assert problems == ["distillation_config.multiphase: mode 'fine' needs at least 2 phases (the first is the "
                        "semantic expert's, the rest the detail expert's)"]
    _, problems, _ = DCM_SCHEMA.validate({"euler_steps": 100}, prefix="distillation_config")  # SimpleTuner's doc typo
    assert problems == ["distillation_config.euler_steps: unknown key (did you mean 'euler_timesteps'?)"]


def test_dcm_warns_by_name_about_keys_without_effect():
    pm = get_plugin_manager(entry_points=False)
    raw = {"model_family": "wan", "distillation_method": "dcm", "validation_num_inference_steps": 4,
           "distillation_config": {"adv_weight": 1.0, "model_family": "hunyuan"}}
    rc = validate_config(raw, pm, check_paths=False)
    assert any(w.startswith("distillation_config.adv_weight: has no effect in mode 'semantic'") for w in rc.warnings)
    assert any(w.startswith("distillation_config.model_family: 'hunyuan' is ignored") for w in rc.warnings)


# --------------------------------------------------------------------------- the keyed form


KEYED = {"dmd": {"generator_update_interval": 5}, "lcm": {"w_max": 8.0}, "dcm": {"mode": "fine"}}


@pytest.mark.parametrize("method,key,value", [("dmd", "generator_update_interval", 5), ("lcm", "w_max", 8.0),
                                              ("dcm", "mode", "fine")])
def test_keyed_config_selects_the_chosen_methods_section(method, key, value):
    pm = get_plugin_manager(entry_points=False)
    rc = validate_config({"model_family": "wan", "distillation_method": method, "distillation_config": KEYED}, pm, check_paths=False)
    assert rc.method_name == method and rc.method_config[key] == value


def test_mixing_flat_and_keyed_forms_is_an_error_with_lcm_and_dcm():
    pm = get_plugin_manager(entry_points=False)
    with pytest.raises(ConfigError) as info:
        validate_config({"model_family": "wan", "distillation_method": "lcm",
                         "distillation_config": {"lcm": {"w_max": 8.0}, "huber_c": 0.01}}, pm, check_paths=False)
    assert "mixes the flat form (keys huber_c)" in str(info.value)
    section, problems, warnings = select_method_section("dcm", {"dcm": {"mode": "fine"}, "lcm": {}},
                                                        {"dcm": DCM_SCHEMA, "lcm": LCM_SCHEMA})
    assert section == {"mode": "fine"} and not problems and not warnings
    # a flat config of one method, given to another, is ignored with one warning naming that method
    rc = validate_config({"model_family": "wan", "distillation_method": "lcm",
                          "distillation_config": {"generator_update_interval": 5}}, pm, check_paths=False)
    assert ("distillation_config: 1 key of method dmd (generator_update_interval) does not apply to lcm and is "
            "ignored") in rc.warnings
