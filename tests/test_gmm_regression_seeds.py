"""Case A's seed dissection (``benchmarks/gmm_regression.py``): a run can take another seed's teacher pairs
(``pairs_seed``), evaluate its final student on further independent draws (``eval_seeds``), and describe where a
sample's mass lies (``sample_shape``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.example_packages import installed_example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gmm_family"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from benchmarks import gmm

    torch.set_num_threads(1)
    with installed_example(EXAMPLE, tmp_path_factory.mktemp("site"), "gmm_family"):
        yield gmm.fit_base(tmp_path_factory.mktemp("gmm"), steps=200, batch_size=256, log=lambda m: None)


def test_pairs_seed_picks_the_pairs_and_nothing_else(base):
    from benchmarks import gmm, gmm_regression

    cfg = gmm_regression.config([1000], 16.0, {"regression_num_pairs": 64})
    own = gmm.distil(base, cfg, seed=0, steps=3, n_samples=500)
    other = gmm.distil(base, cfg, seed=0, steps=3, n_samples=500, pairs_seed=1)
    seeds = sorted(json.loads(m.read_text())["spec"]["seed"]
                   for m in (base / "cache" / "ode_pairs").glob("*/manifest.json"))
    assert seeds == [0, 1]  # the second run made (and trained on) seed 1's pairs
    assert not torch.equal(own.samples, other.samples)  # ... which the student's regression term felt
    targets = {s: gmm_regression.pair_targets(base, [1000], s, 64) for s in (0, 1)}
    assert targets[0].shape == (64, 2) and not torch.allclose(targets[0], targets[1])


def test_eval_seeds_are_independent_draws_of_the_same_student(base):
    from benchmarks import gmm, gmm_regression

    cfg = {"real_score_guidance_scale": 1.0, "dmd_denoising_steps": [1000, 500], "fake_score_lr": 1e-3}
    result = gmm.distil(base, cfg, seed=2, steps=0, n_samples=500, eval_seeds=(2, 1002))
    assert torch.equal(result.draws[2], result.samples)  # the seed's own noise reproduces its evaluation
    assert not torch.allclose(result.draws[1002], result.samples)
    assert gmm_regression.eval_draw_seeds(2, 3) == [2, 1002, 2002]
    assert gmm_regression.eval_draw_seeds(2, 3, common=True) == [2, 1000, 2000]  # seed 0's extra draws: paired


def test_sample_shape_tells_bridge_mass_from_mode_weights(base):
    from benchmarks import gmm, gmm_regression

    _, mixture = gmm.family_and_mixture()
    exact = mixture.sample(20_000, torch.Generator().manual_seed(0))
    shape = gmm_regression.sample_shape(exact, mixture)
    assert shape["off_mode_share"] < 0.02  # P(|2-D normal| > 3 std) = exp(-4.5) ≈ 0.011
    assert shape["on_mode_spread"] == pytest.approx(0.1 * 2 ** 0.5, rel=0.05)
    assert shape["on_mode_radius"] == pytest.approx(1.0, abs=0.02)
    assert shape["largest_mode_weight_error"] < 0.015
    # a tenth moved to the midpoints between neighbouring modes: bridge mass, the mode weights untouched
    mu = mixture.mu.float()
    bridged = exact.clone()
    k = torch.arange(2_000) % mu.shape[0]
    bridged[:2_000] = 0.5 * (mu[k] + mu[(k + 1) % mu.shape[0]])
    moved = gmm_regression.sample_shape(bridged, mixture)
    assert moved["off_mode_share"] == pytest.approx(shape["off_mode_share"] + 0.1, abs=0.01)
    assert moved["largest_mode_weight_error"] < 0.015
    # one mode's samples doubled at the expense of another's: a weight error, no bridge mass
    nearest = torch.cdist(exact, mu).argmin(1)
    lopsided = torch.cat([exact[nearest != 1], exact[nearest == 0]])
    assert gmm_regression.sample_shape(lopsided, mixture)["largest_mode_weight_error"] > 0.1
