"""DMD's few-step scheduler for stock pipelines samples exactly as DMD's own sampler does."""

from __future__ import annotations

import pytest
import torch

from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
from simpletuner_dmd.flow import flow_to_x0
from simpletuner_dmd.methods.dmd.rollout import sample_with_schedule

STEPS = [1000, 757, 522]


def _flow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a network's flow prediction that depends on x and t."""
    return torch.tanh(x) * (t.float().reshape(-1, *([1] * (x.ndim - 1))) / 1000.0) + 0.1


def test_its_loop_equals_dmds_sampler_for_the_same_noise():
    noise = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = sample_with_schedule(lambda x, t: flow_to_x0(x, _flow(x, t), t), noise, STEPS,
                               generator=torch.Generator().manual_seed(7))
    scheduler = FewStepFlowScheduler(few_step_timesteps=STEPS)
    scheduler.set_timesteps(len(STEPS))
    x, generator = noise, torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:  # what a stock pipeline's denoising loop does
        x = scheduler.step(_flow(x, t.expand(x.shape[0])), t, x, generator=generator, return_dict=False)[0]
    assert torch.allclose(x, ref, atol=1e-6)


def test_it_always_samples_its_trained_timesteps(tmp_path, caplog):
    scheduler = FewStepFlowScheduler(few_step_timesteps=STEPS)
    scheduler.set_timesteps(30)  # a pipeline's default step count: not followed, said once
    assert scheduler.timesteps.tolist() == [float(t) for t in STEPS]
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.757, 0.522, 0.0])
    scheduler.save_config(tmp_path)
    loaded = FewStepFlowScheduler.from_pretrained(tmp_path)
    assert loaded.config.few_step_timesteps == STEPS and loaded.timesteps.tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [[], [500, 700], [1200], [0]])
def test_bad_timesteps_are_refused(steps):
    with pytest.raises(ValueError, match="few_step_timesteps"):
        FewStepFlowScheduler(few_step_timesteps=steps)
