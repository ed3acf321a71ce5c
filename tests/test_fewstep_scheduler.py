"""DMD's few-step scheduler for stock pipelines samples exactly as DMD's own sampler does."""

from __future__ import annotations

import logging

import pytest
import torch

from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler
from simpletuner_dmd.flow import flow_to_x0
from simpletuner_dmd.fewstep_sampling import sample_with_schedule

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


def test_it_samples_its_trained_timesteps_and_saves_them(tmp_path):
    scheduler = FewStepFlowScheduler(few_step_timesteps=STEPS)
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [float(t) for t in STEPS]
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.757, 0.522, 0.0])
    scheduler.save_config(tmp_path)
    loaded = FewStepFlowScheduler.from_pretrained(tmp_path)
    assert loaded.config.few_step_timesteps == STEPS and loaded.timesteps.tolist() == scheduler.timesteps.tolist()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("kwargs", [
    {},  # DMD's
    {"step_rule": "euler"},  # DCM's
    {"consistency_timestep_scaling": 10.0, "sampling_schedule": [19.0, 519.0, 999.0]},  # LCM's
    {"shift": 3.0, "use_dynamic_shifting": True},  # the parent's keywords, not at their defaults
])
def test_loading_a_saved_scheduler_is_silent_and_gives_its_config_back(tmp_path, kwargs):
    scheduler = FewStepFlowScheduler(few_step_timesteps=STEPS, **kwargs)
    scheduler.save_config(tmp_path)
    logger = logging.getLogger("diffusers.configuration_utils")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # also "… was not found in config" (a key the file should hold and does not)
    try:
        loaded = FewStepFlowScheduler.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in handler.records] == []
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert all(loaded.config[k] == v for k, v in kwargs.items())
    assert loaded.timesteps.tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [[], [500, 700], [1200], [0]])
def test_bad_timesteps_are_refused(steps):
    with pytest.raises(ValueError, match="few_step_timesteps"):
        FewStepFlowScheduler(few_step_timesteps=steps)


def test_a_pipeline_step_count_other_than_the_trained_one_is_a_clear_error():
    scheduler = FewStepFlowScheduler(few_step_timesteps=STEPS)
    with pytest.raises(ValueError, match="trained for 3 steps .*pass num_inference_steps=3, not 50"):
        scheduler.set_timesteps(50)  # a stock pipeline's default


def test_its_generator_attribute_stands_in_for_the_one_stock_pipelines_do_not_pass():
    noise = torch.randn(1, 4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        scheduler = FewStepFlowScheduler(few_step_timesteps=STEPS)
        scheduler.generator = torch.Generator().manual_seed(5)
        torch.manual_seed(len(runs))  # the global generator differs between the runs
        x = noise
        for t in scheduler.timesteps:
            x = scheduler.step(_flow(x, t.expand(1)), t, x, return_dict=False)[0]
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_its_generator_seed_restarts_the_noise_at_every_pipeline_call(tmp_path):
    """``generator_seed``: every ``set_timesteps`` (a pipeline call's start) re-seeds ``generator``, so a second call
    on the same scheduler re-noises as the first did and as a scheduler given ``generator`` seeded alike does; the
    attribute is not saved with the config."""
    noise = torch.randn(1, 4, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def sample(scheduler):
        scheduler.set_timesteps(len(STEPS))  # what a pipeline call does first
        x = noise
        for t in scheduler.timesteps:
            x = scheduler.step(_flow(x, t.expand(1)), t, x, return_dict=False)[0]
        return x

    seeded = FewStepFlowScheduler(few_step_timesteps=STEPS)
    seeded.generator_seed = 5
    first, second = sample(seeded), sample(seeded)
    by_hand = FewStepFlowScheduler(few_step_timesteps=STEPS)
    by_hand.generator = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    global_rng = sample(FewStepFlowScheduler(few_step_timesteps=STEPS))
    assert torch.equal(first, second) and torch.equal(first, sample(by_hand))
    assert not torch.equal(first, global_rng)
    seeded.save_pretrained(tmp_path)
    assert "generator_seed" not in (tmp_path / "scheduler_config.json").read_text()
    assert FewStepFlowScheduler.from_pretrained(tmp_path).generator_seed is None


@pytest.mark.parametrize("method, config", [("dmd", {}), ("lcm", {"num_inference_steps": 4}),
                                            ("dcm", {"multiphase": 3})])
def test_every_methods_scheduler_reproduces_its_own_sampler(tiny_wan, method, config):
    """The loop of a stock pipeline (``set_timesteps(K)``, the student's flow, ``step``) over the method's
    ``distill_scheduler`` gives its ``distill_sampler``'s sample for the same noise and generator."""
    from simpletuner_dmd.plugins import get_plugin_manager, registered_methods
    from tests.tiny_methods import build_method, perturb_adapters

    cls = registered_methods(get_plugin_manager(entry_points=False))[method].cls
    run = build_method(tiny_wan, cls, config)
    perturb_adapters(run.models.network)
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = run.method.distill_sampler()(noise, cond, None, 1.0, torch.Generator().manual_seed(9))
        scheduler = run.method.distill_scheduler()
        scheduler.set_timesteps(len(scheduler.config.few_step_timesteps))
        scheduler.generator = torch.Generator().manual_seed(9)
        x = noise
        for t in scheduler.timesteps:
            flow = run.family.predict_flow(run.models.network, x, t.expand(x.shape[0]), cond)
            x = scheduler.step(flow, t, x, return_dict=False)[0]
    assert torch.allclose(x, expected, atol=1e-5), (x - expected).abs().max()


def test_an_lcm_students_scheduler_takes_any_step_count_as_its_sampler_would(tiny_wan):
    """LCM is defined on its whole skipping schedule: the scheduler saved for 4 steps, asked for 2, samples exactly
    what the method's own sampler samples with num_inference_steps 2."""
    from simpletuner_dmd.methods.lcm.method import LCM
    from tests.tiny_methods import build_method, perturb_adapters

    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
    saved = None
    for steps in (4, 2):
        run = build_method(tiny_wan, LCM, {"num_inference_steps": steps})
        perturb_adapters(run.models.network)
        if saved is None:
            saved = run.method.distill_scheduler()  # the 4-step student's export
            continue
        with torch.no_grad():
            expected = run.method.distill_sampler()(noise, cond, None, 1.0, torch.Generator().manual_seed(9))
            saved.set_timesteps(2)
            assert saved.timesteps.tolist() == run.method.distill_scheduler().timesteps.tolist()
            saved.generator = torch.Generator().manual_seed(9)
            x = noise
            for t in saved.timesteps:
                flow = run.family.predict_flow(run.models.network, x, t.expand(1), cond)
                x = saved.step(flow, t, x, return_dict=False)[0]
        assert torch.allclose(x, expected, atol=1e-5)
    with pytest.raises(ValueError, match="num_inference_steps must be 1 to 50"):
        saved.set_timesteps(51)
