"""DMD's math on tiny tensors: the loss gradient, σ by value, the timestep window, CFG forms, layout."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.flow import add_noise, flow_to_x0, guided, guided_self_forcing, sigma_of
from simpletuner_dmd.methods.dmd import loss as L
from simpletuner_dmd.method_toolkit import draw_exit_index
from simpletuner_dmd.methods.dmd.rollout import backward_simulation


def test_dmd_loss_gradient_is_grad_over_numel():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 6, requires_grad=True)
    grad = torch.randn(2, 16, 3, 4, 6)
    L.dmd_loss(x, grad).backward()
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-9, rtol=1e-4)  # fp32 rounding of x − (x − g)


def test_dmd_gradient_is_normalised_per_sample_and_finite():
    gen = torch.zeros(2, 4, 2, 3, 3)
    real = torch.ones(2, 4, 2, 3, 3)
    real[1] *= 10.0  # sample 1 is ten times further from the teacher
    fake = real + 2.0
    grad, norm = L.dmd_gradient(gen, real, fake)
    assert torch.allclose(norm, torch.tensor([1.0, 10.0]))
    assert torch.allclose(grad[0], torch.full_like(grad[0], 2.0))
    assert torch.allclose(grad[1], torch.full_like(grad[1], 0.2))
    # a generated sample that equals the teacher's gives 0/0: nan_to_num keeps the loss finite
    grad, _ = L.dmd_gradient(real, real, fake)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigma_by_value_matches_diffusers_schedule(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(50)
    # the scheduler's timesteps are σ·1000 of its shifted σs: σ by value must give back the same σ
    for t, sigma in zip(sched.timesteps, sched.sigmas[:-1]):
        assert float(sigma_of(t.reshape(1))) == pytest.approx(float(sigma), abs=1e-6)
    # and our shift reproduces diffusers' shifted training schedule from its unshifted one (an independent
    # implementation: the schedulers' σ tables as built, before set_timesteps)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas.float()
    shifted = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.float()
    assert torch.allclose(L.shift_sigma(unshifted, shift), shifted, atol=1e-6)
    assert torch.allclose(L.unshift_sigma(shifted, shift), unshifted, atol=1e-6)


def test_sigma_not_inverted_at_the_ends():
    x0, noise = torch.zeros(2, 16, 3, 4, 4), torch.ones(2, 16, 3, 4, 4)
    x = add_noise(x0, noise, torch.tensor([1000.0, 0.0]))
    assert torch.equal(x[0], noise[0]) and torch.equal(x[1], x0[1])  # t=1000 is pure noise, t=0 is data


def test_layout_round_trip_with_channels_not_frames():
    torch.manual_seed(0)
    b, c, f, h, w = 2, 16, 5, 4, 6  # C != F: a reshape without permute would scramble frames
    x0 = torch.randn(b, c, f, h, w)
    noise = torch.randn(b, c, f, h, w)
    t = torch.tensor([800.0, 200.0])
    x_t = add_noise(x0, noise, t)
    for i, sigma in enumerate([0.8, 0.2]):  # one σ per sample, the same for every frame and channel
        assert torch.allclose(x_t[i], (1 - sigma) * x0[i] + sigma * noise[i], atol=1e-6)
    back = flow_to_x0(x_t, noise - x0, t)
    assert back.shape == (b, c, f, h, w)
    assert torch.allclose(back, x0, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_dmd_timestep_window(shift):
    g = torch.Generator().manual_seed(0)
    lo, hi = L.dmd_timestep_bounds(757.0, 522.0, ts_schedule=True, ts_schedule_max=True, min_score_timestep=0.0,
                                   shift=shift)
    t = L.sample_dmd_timesteps(4000, lo, hi, shift=shift, min_ratio=0.0, max_ratio=1.0, generator=g)
    # after the shift the window lies exactly between the exit step's and the next step's noise levels
    assert t.min() >= 522.0 - 1e-3 and t.max() <= 757.0 + 1e-3
    assert t.min() < 530.0 and t.max() > 750.0
    # without ts_schedule the lower bound is min_score_timestep; without ts_schedule_max the upper is 1000
    lo, hi = L.dmd_timestep_bounds(757.0, 522.0, ts_schedule=False, ts_schedule_max=False, min_score_timestep=100.0,
                                   shift=shift)
    t = L.sample_dmd_timesteps(4000, lo, hi, shift=shift, min_ratio=0.0, max_ratio=1.0, generator=g)
    assert t.min() >= 100.0 - 1e-3 and t.max() > 990.0
    # the ratio clamp comes last
    t = L.sample_dmd_timesteps(4000, lo, hi, shift=shift, min_ratio=0.2, max_ratio=0.98, generator=g)
    assert t.min() >= 200.0 and t.max() <= 980.0


def test_shift_one_draws_uniformly_in_the_window():
    g = torch.Generator().manual_seed(1)
    t = L.sample_dmd_timesteps(20000, 0.0, 1000.0, shift=1.0, min_ratio=0.0, max_ratio=1.0, generator=g)
    assert t.mean().item() == pytest.approx(500.0, abs=10.0)
    shifted = L.sample_dmd_timesteps(20000, 0.0, 1000.0, shift=5.0, min_ratio=0.0, max_ratio=1.0, generator=g)
    assert shifted.mean().item() > 700.0  # a shift > 1 moves draws towards high noise


def test_cfg_forms():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided(c, u, 3.0).item() == pytest.approx(1.0 + 3.0 * 1.0)  # u + s(c − u)
    assert guided(c, u, 1.0) is c and guided(c, u, 0.0) is c  # off: cond only
    for s in (0.5, 2.0, 4.0):  # Self-Forcing/FastVideo's c + s(c − u) is the standard form at s + 1
        assert guided_self_forcing(c, u, s).item() == pytest.approx(guided(c, u, s + 1.0).item())


def test_critic_flow_target():
    x0, noise = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 2, 4, 4)
    assert L.critic_flow_loss(noise - x0, x0, noise).item() == 0.0
    assert L.critic_flow_loss(torch.zeros_like(x0), x0, noise).item() == pytest.approx(
        ((noise - x0) ** 2).mean().item())


def test_non_exit_rollout_steps_build_no_graph():
    weight = torch.nn.Parameter(torch.tensor(0.5))
    seen = []

    inputs = []

    def predict(x, t):
        seen.append((torch.is_grad_enabled(), x.requires_grad, float(t[0])))
        inputs.append(x.detach().clone())
        return x * weight

    roll = backward_simulation(predict, torch.randn(2, 16, 3, 4, 4), [1000, 757, 522], 2, with_grad=True)
    assert seen == [(False, False, 1000.0), (False, False, 757.0), (True, False, 522.0)]
    assert roll.x0.requires_grad and roll.student_forwards == 3
    assert (roll.denoised_from, roll.denoised_to) == (522.0, 0.0)
    # the only path to the weight is the exit step: its gradient is exactly that step's input summed (a graph
    # through the earlier steps would add their inputs' contributions, since each feeds the next)
    roll.x0.sum().backward()
    assert torch.allclose(weight.grad, inputs[-1].sum()) and not torch.allclose(weight.grad, inputs[0].sum())
    seen.clear()
    roll = backward_simulation(predict, torch.randn(1, 16, 3, 4, 4), [1000, 757, 522], 0, with_grad=False)
    assert seen == [(False, False, 1000.0)] and not roll.x0.requires_grad
    assert (roll.denoised_from, roll.denoised_to) == (1000.0, 757.0)


def test_exit_index_is_shared_and_last_step_only():
    draws = [draw_exit_index(3, last_step_only=False, generator=torch.Generator().manual_seed(7)) for _ in range(4)]
    assert len(set(draws)) == 1  # the same seed on every process → the same exit step
    spread = {draw_exit_index(3, last_step_only=False, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert spread == {0, 1, 2}
    assert draw_exit_index(3, last_step_only=True, generator=None) == 2
