"""Reduced versions of the quality benchmarks (``python -m benchmarks.quality``): the third-party family is found
through its entry point, a short DMD run through the public hooks beats the 1-step teacher, so do short LCM and DCM
runs (the benchmark's LCM and DCM rows), and the digits pipeline
(teacher trained by the reference host, DMD student, digits-FD) runs end to end on a tiny budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.example_packages import installed_example
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "gmm_family"


@pytest.fixture(scope="module")
def gmm_installed(tmp_path_factory):
    """The example package as pip would install it. If ``pip install -e examples/gmm_family`` was run, that install is
    used; otherwise a distribution is made on a temporary ``sys.path`` entry from the example's own ``pyproject.toml``
    (its name, version and entry points) — the same metadata ``importlib.metadata`` reads after a pip install."""
    with installed_example(EXAMPLE, tmp_path_factory.mktemp("site"), "gmm_family") as project:
        yield project


def test_the_gmm_family_is_found_through_its_entry_point(gmm_installed):
    from simpletuner_dmd.plugins import get_plugin_manager, registered_families

    families = registered_families(get_plugin_manager())
    assert "gmm" in families
    assert families["gmm"].distribution == gmm_installed["name"]
    assert families["gmm"].plugin == "gmm"  # the entry point's name, not a built-in


def test_the_closed_form_teacher_is_exact(gmm_installed):
    from gmm_family import Mixture

    mixture = Mixture.ring()
    x = torch.randn(64, 2)
    # σ = 1: x is pure noise, so E[ε − x0 | x] = x − E[x0] = x (the ring's mean is 0)
    assert torch.allclose(mixture.flow(x, torch.ones(64)), x, atol=1e-6)
    # σ = 0: x = x0, so E[ε − x0 | x] = −x
    assert torch.allclose(mixture.flow(x, torch.zeros(64)), -x, atol=1e-6)
    # in between: against a Monte Carlo posterior mean for one point
    sigma, point = 0.4, torch.tensor([[0.5, 0.2]])
    x0 = mixture.sample(400_000, torch.Generator().manual_seed(0))
    eps_density = torch.exp(-((point - (1 - sigma) * x0) ** 2).sum(1) / (2 * sigma ** 2))
    x0_mean = (eps_density[:, None] * x0).sum(0) / eps_density.sum()
    expected = (point[0] - x0_mean) / sigma
    assert torch.allclose(mixture.flow(point, torch.tensor([sigma]))[0], expected, atol=2e-2)


@pytest.mark.parametrize("extra", [{}, {"gan_loss_weight": 1.0}], ids=["dmd", "dmd+gan"])
def test_a_short_dmd_run_beats_the_one_step_teacher(gmm_installed, tmp_path, extra):
    """With ``gan_loss_weight`` the classifier reads the third-party family's optional ``gan_feature_module``."""
    from benchmarks import gmm

    torch.set_num_threads(1)
    folder = gmm.fit_base(tmp_path / "gmm", steps=300, batch_size=256, log=lambda m: None)
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    teacher = metrics(gmm.teacher_samples(folder, 1, 0, n=2000))
    dmd = {"real_score_guidance_scale": 1.0, "dmd_denoising_steps": [1000], "fake_score_lr": 1e-3,
           "generator_update_interval": 1, **extra}
    result = gmm.distil(folder, dmd, seed=0, steps=150, batch_size=128, n_samples=2000)
    student = metrics(result.samples)
    assert teacher["precision"] < 0.05  # the 1-step teacher lands on the mixture's mean
    assert student["precision"] > teacher["precision"] + 0.2, student
    assert student["energy_distance"] < 0.5 * teacher["energy_distance"], student
    assert len(result.curves["dmd_loss"]) == 150 and len(result.curves["fake_score_loss"]) == 150
    if extra:
        assert len(result.curves["gan_generator_loss"]) == 150 and len(result.curves["gan_classifier_loss"]) == 150


@pytest.mark.parametrize("method, config, curve", [
    ("lcm", {"w_min": 1.0, "w_max": 1.0, "num_inference_steps": 3, "shift": 1.0}, "lcm_loss"),
    ("dcm", {"mode": "semantic", "multiphase": 3, "distill_cfg": 0.0, "dcm_shift": 1.0}, "dcm_loss"),
])
def test_a_short_consistency_run_goes_through_the_hooks(gmm_installed, tmp_path, method, config, curve):
    """The benchmark's LCM and DCM rows, reduced: the method class comes from the registry, its hooks run (a loss curve
    per step under its own name) and its sampler gives finite samples that beat the 1-step teacher."""
    from benchmarks import gmm, quality
    from simpletuner_dmd.plugins import get_plugin_manager

    rows = {spec.get("method"): spec for spec in quality.CASE_A_ROWS.values()}
    assert rows[method]["config"] == config  # the smoke runs the benchmark's own row

    torch.set_num_threads(1)
    folder = gmm.fit_base(tmp_path / "gmm", steps=300, batch_size=256, log=lambda m: None)
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    teacher = metrics(gmm.teacher_samples(folder, 1, 0, n=2000))
    calls = []
    original = get_plugin_manager

    def spying_manager(*args, **kwargs):
        pm = original(*args, **kwargs)
        pm.add_hookcall_monitoring(lambda name, impls, kw: calls.append((name, [pm.get_name(i.plugin) for i in impls])),
                                   lambda *a: None)
        return pm

    gmm.get_plugin_manager = spying_manager
    try:
        result = gmm.distil(folder, config, seed=0, steps=40, batch_size=128, n_samples=2000, lr=3e-4, method=method)
    finally:
        gmm.get_plugin_manager = original
    hooks = {name for name, impls in calls if f"method:{method}" in impls}
    assert {"distill_setup", "distill_loss", "distill_after_optimizer_step", "distill_metrics",
            "distill_sampler"} <= hooks, hooks
    assert torch.isfinite(result.samples).all() and result.samples.shape == (2000, 2)
    assert list(result.curves) == [curve] and len(result.curves[curve]) == 40
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.curves[curve])
    student = metrics(result.samples)
    assert all(torch.isfinite(torch.tensor(v)) for v in student.values()), student
    assert teacher["precision"] < 0.05
    assert student["precision"] > teacher["precision"] + 0.2, student  # starting from the fitted MLP, not collapsed
    assert student["energy_distance"] < 0.5 * teacher["energy_distance"], student


def test_the_rows_option_selects_case_a_rows():
    from benchmarks import quality

    picked = quality.select_rows({**quality.CASE_A_ROWS, **quality.CASE_A_ABLATIONS}, "lcm,dcm")
    assert list(picked) == ["LCM 3-step", "DCM semantic, 3 phases"]
    with pytest.raises(SystemExit):
        quality.select_rows(quality.CASE_A_ROWS, "nothing-like-this")


def test_case_b_students_train_as_long_as_the_main_job():
    import inspect
    import json

    from benchmarks import digits

    main_job = json.loads((REPO / "config_examples/tiny-wan-digits/config.json").read_text())
    assert digits.STUDENT_STEPS == main_job["max_train_steps"]
    assert inspect.signature(digits.run_case_b).parameters["student_steps"].default == main_job["max_train_steps"]


def test_the_guidance_target_divides_by_the_guidance_1_student_of_the_same_length():
    from benchmarks import digits

    def metric(v):
        return {"mean": v, "sd": 0.0, "values": [v]}

    def row(kind, guidance, steps, to_teacher, schedule=(1000, 757, 522)):
        m = {"digits_fd": metric(10.0), "class_tv": metric(0.05), "diversity": metric(10.0),
             "fd_to_teacher": metric(to_teacher)}
        return {"kind": kind, "guidance": guidance, "steps": steps, "metrics": m,
                "dmd_config": {"dmd_denoising_steps": list(schedule)}}

    rows = {"teacher Euler 50, guidance 1": row("teacher", 1.0, 50, 1.0),
            "teacher Euler 50, guidance 3": row("teacher", 3.0, 50, 1.0),
            "g1 400": row("student", 1.0, 400, 4.0), "g1 1600": row("student", 1.0, 1600, 2.0),
            "g3 400": row("student", 3.0, 400, 6.0), "g3 1600": row("student", 3.0, 1600, 6.0),
            "g3 800": row("student", 3.0, 800, 6.0),  # no guidance-1 row of 800 steps: the shortest one
            "g3 1-step": row("student", 3.0, 400, 6.0, schedule=(1000,))}  # no 1-step guidance-1 row at all
    key = "fd_to_guided_teacher / (guidance 1 fd_to_teacher)"
    t = digits.targets(rows)
    assert t["g3 400"][key] == pytest.approx(1.5) and t["g3 1600"][key] == pytest.approx(3.0)
    assert t["g3 800"][key] == pytest.approx(1.5)
    assert key not in t["g3 1-step"] and key not in t["g1 400"]


def test_the_one_step_ceiling_regression_pulls_the_map_toward_the_teacher(gmm_installed, tmp_path, monkeypatch):
    from benchmarks import gmm, gmm_regression

    torch.set_num_threads(1)
    monkeypatch.setattr(gmm_regression, "POOL", 2048)
    monkeypatch.setattr(gmm, "N_SAMPLES", 1000)
    folder = gmm.fit_base(tmp_path, steps=300, log=lambda m: None)
    rows = gmm_regression.ceiling(folder, 1, {"untrained": (1e-3, "constant", 0), "trained": (1e-3, "constant", 300)})
    before, after = (r["metrics"] for r in rows)
    assert [r["setting"] for r in rows] == ["untrained", "trained"]
    # the base MLP's one step is far from the teacher's 50-step sample from the same noise; 300 regression steps close
    # most of that gap
    assert after["mapping_rmse"]["mean"] < 0.5 * before["mapping_rmse"]["mean"], (before, after)
    assert after["energy_distance"]["mean"] < before["energy_distance"]["mean"]


def test_a_regression_variant_carries_the_students_optimizer_settings():
    from benchmarks import gmm_regression

    assert gmm_regression.variant_settings("reg 16") == (16.0, {}, {})
    weight, extra, host = gmm_regression.variant_settings("reg 16 + 16384 pairs + student lr 1e-3 cosine")
    assert weight == 16.0 and host == {"lr": 1e-3, "lr_schedule": "cosine"}
    config = gmm_regression.config([1000], weight, extra)
    assert config["regression_num_pairs"] == 16_384  # a variant's own pair count is not overwritten by the default
    assert gmm_regression.config([1000], 16.0)["regression_num_pairs"] == 1024


@pytest.mark.slow  # a shrunk digits example and two short reference-host student runs
def test_the_digits_pipeline_runs_end_to_end(tmp_path):
    from benchmarks import digits

    torch.set_num_threads(1)  # small nets: one thread is several times faster on shared cores
    seen = []
    result = digits.run_case_b(tmp_path, seeds=1, cache=tmp_path / "cache", log=lambda m: None, student_steps=2,
                               n_eval=40, teacher_euler=(4, 1), plots=False,
                               example={"vae_steps": 2, "teacher_steps": 2, "classifier_epochs": 1, "n_digits": 64},
                               students=("3-step (1000,757,522), guidance 1", "1-step (1000), guidance 3"),
                               on_row=lambda name, row: seen.append(name))
    rows = result["rows"]
    assert seen == list(rows)  # every row reported as it finished, in order
    assert {"teacher Euler 4, guidance 1", "teacher Euler 1, guidance 3", "DMD 3-step (1000,757,522), guidance 1",
            "DMD 1-step (1000), guidance 3"} <= set(rows)
    floor = rows.pop("real digits (half vs other half)")["metrics"]
    assert floor["digits_fd"]["mean"] >= 0
    for name, row in rows.items():
        m = row["metrics"]
        for key in ("digits_fd", "class_tv", "cond_accuracy", "diversity"):
            assert np.isfinite(m[key]["mean"]), (name, key, m)
        assert 0 <= m["cond_accuracy"]["mean"] <= 1 and 0 <= m["class_tv"]["mean"] <= 1
    student = rows["DMD 3-step (1000,757,522), guidance 1"]
    assert sorted(student["by_step"], key=int) == ["1", "2"]  # measured along training
    assert "fd_to_teacher" in rows["DMD 1-step (1000), guidance 3"]["metrics"]
    targets = result["targets"]
    assert "fd_to_guided_teacher / (guidance 1 fd_to_teacher)" not in targets["DMD 1-step (1000), guidance 3"]
    assert set(targets["DMD 3-step (1000,757,522), guidance 1"]) >= {"fd / teacher-50", "class_tv / teacher-50",
                                                                     "diversity / teacher-50"}
    assert digits.markdown({**result, "rows": {**rows}})


@pytest.mark.slow  # case C shrunk: a few clips, a few steps of every stage, a handful of ODE pairs
def test_the_moving_digits_pipeline_runs_end_to_end(tmp_path):
    from benchmarks import moving_digits as C

    torch.set_num_threads(1)
    seen = []
    result = C.run_case_c(tmp_path, cache=tmp_path / "cache", vae_steps=2, teacher_steps=2, ode_steps=2, dmd_steps=2,
                          n_eval=20, n_digits=40, plots=False, on_row=lambda name, row: seen.append(name),
                          pairs={"regression_num_pairs": 8, "regression_teacher_steps": 2})
    rows = result["rows"]
    assert seen == list(rows) and len(rows) == C.EXPECTED_ROWS
    real = rows["real clips (the data)"]
    assert real["black_frames"] == 0 and real["frozen_frames"] == 0  # the data moves, and is never black
    assert abs(real["speed"] - C.SPEED * 1.2) < 0.5  # 2 px per frame, straight or diagonal (2.83)
    for name, row in rows.items():
        for key in ("frame_fd", "speed", "speed_spread", "black_frames", "frozen_frames"):
            assert np.isfinite(row[key]), (name, key)
    assert set(result["targets"]) >= {"frame_fd met", "speed met", "spread met", "no black or frozen frames"}
    assert (tmp_path / "cache" / "moving-digits" / "student-dmd" / "out" / "simpletuner_dmd.json").is_file()
    assert C.markdown(result)
    # a second run finds every stage cached: none is made again
    stamps = [tmp_path / "cache" / "moving-digits" / stage / "case_c_stage.json"
              for stage in ("teacher", "student-ode_init/out", "student-dmd/out")]
    made = [stamp.stat().st_mtime_ns for stamp in stamps]
    again = C.run_case_c(tmp_path, cache=tmp_path / "cache", vae_steps=2, teacher_steps=2, ode_steps=2, dmd_steps=2,
                         n_eval=20, n_digits=40, plots=False, pairs={"regression_num_pairs": 8,
                                                                    "regression_teacher_steps": 2})
    assert again["seconds_by_stage"]["teacher"] < result["seconds_by_stage"]["teacher"]
    assert [stamp.stat().st_mtime_ns for stamp in stamps] == made


def test_case_c_motion_figures_tell_black_frame_clips_from_the_spread():
    from benchmarks import moving_digits as C
    from benchmarks import moving_digits_motion as M

    real, _ = C.make_clips(300, seed=1)
    teacher = real[:, 0]
    student = teacher.clone()
    student[:12, 3] = 0.05  # 12 clips with a black frame: their centre of mass jumps to the canvas's middle
    t, s = C.motion_figures(C.motion(teacher)), C.motion_figures(C.motion(student))
    assert s["speed_spread"] > t["speed_spread"] + 0.02
    untouched = C.motion_figures(C.motion(teacher[12:]))["speed_spread"]
    assert s["speed_spread_clean"] == pytest.approx(untouched, rel=1e-4)  # the 288 clips with no black frame
    assert s["clean_clips"] == pytest.approx(288 / 300) and s["clips_with_black"] == pytest.approx(12 / 300)
    assert s["speed_spread_trimmed"] == pytest.approx(t["speed_spread_trimmed"], abs=0.01)  # < 5 % of the clips
    assert s["speed_by_pair"][2] > t["speed_by_pair"][2]  # the pairs into and out of frame 3
    assert s["speed_by_pair"][0] == pytest.approx(t["speed_by_pair"][0])
    assert M.describe(student)["jumps_by_pair"][2:4] != [0, 0]
    assert M.describe(teacher)["share_with_a_jump_over_6px"] == 0
    against = M.compare(teacher, student)
    assert against["clips_with_black"] == {"teacher": 0, "student": 12, "both": 0, "of": 300}
    assert against["mcnemar_p"] < 0.01 and against["speed_spread_ratio_95ci"][0] > 1
    same = M.compare(teacher, teacher)
    assert same["speed_spread_ratio"] == pytest.approx(1) and same["mcnemar_p"] == 1.0


def test_the_style_shift_moves_each_digits_centre_by_its_pixels():
    from benchmarks import style_lora
    from simpletuner_dmd.hosts.reference.digits_example import _digit_pixels

    pixels, _ = _digit_pixels(200)
    # the digits with their right columns blanked, so that nothing falls off the edge
    inside = torch.nn.functional.pad(pixels[..., :-style_lora.SHIFT_PX], (0, style_lora.SHIFT_PX))
    moved = style_lora.centre_x(style_lora.shifted(inside)) - style_lora.centre_x(inside)
    assert np.allclose(moved, style_lora.SHIFT_PX, atol=1e-4)
    assert style_lora.shifted(inside)[..., :style_lora.SHIFT_PX].abs().max() == 0


@pytest.mark.slow  # a shrunk digits example, a 2-step style LoRA and two 2-step students
def test_the_style_lora_benchmark_runs_end_to_end_and_caches_its_stages(tmp_path, monkeypatch):
    from benchmarks import style_lora
    from simpletuner_dmd.hosts.reference import trainer

    torch.set_num_threads(1)
    kwargs = {"seeds": 1, "cache": tmp_path / "cache", "student_steps": 2, "style_steps": 2, "n_eval": 40,
              "teacher_steps": 4, "plots": False,
              "example": {"vae_steps": 2, "teacher_steps": 2, "classifier_epochs": 1, "n_digits": 64}}
    result = style_lora.run_style_lora(tmp_path, **kwargs)
    rows = result["rows"]
    assert {style_lora.STYLE_50, style_lora.BASE_50, style_lora.A, style_lora.B, style_lora.C} <= set(rows)
    for name, row in rows.items():
        for key in ("digits_fd", "fd_crisp", "class_tv", "cond_accuracy", "diversity", "centre_x"):
            assert np.isfinite(row["metrics"][key]["mean"]), (name, key)
    shifted_real = rows[style_lora.CRISP_FLOOR]["metrics"]["centre_x"]["mean"]
    plain_real = rows[style_lora.PLAIN]["metrics"]["centre_x"]["mean"]
    assert 1.5 < shifted_real - plain_real <= style_lora.SHIFT_PX
    # the export's combined LoRA alone samples what the style LoRA and the student give together
    assert rows[style_lora.A_COMBINED]["max_abs_pixel_difference_to_a_seed0"] < 1e-4
    assert set(result["targets"]) >= {"(a) fd / style teacher-50", "(a) clearly ahead of (b)"}
    assert style_lora.markdown(result)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached stage was trained again")

    monkeypatch.setattr(trainer, "train", must_not_train)
    again = style_lora.run_style_lora(tmp_path, **kwargs)  # every stage found in the cache
    assert again["rows"][style_lora.C]["metrics"] == rows[style_lora.C]["metrics"]
