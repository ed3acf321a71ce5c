"""The embedded example: ``make-example`` builds the digits teacher once, and the main job's config distils it with a
comparison sheet (teacher 50 / teacher 3 / student, same prompts and seed) and a closing Fréchet-distance line.

The build here is shrunk (a few steps, 64 digits) so the teacher draws nothing; what is checked is the plumbing:
the folders, the cache, the sheet's layout, the GIF of the rounds, fd.json and the last line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simpletuner_dmd.hosts.reference import digits_example
from simpletuner_dmd.hosts.reference.fd import frechet_distance, load_feature_space, statistics

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(vae_steps=2, teacher_steps=2, classifier_epochs=1, n_digits=64)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    work = tmp_path_factory.mktemp("digits-example")
    lines: list[str] = []
    paths = digits_example.make_digits_example(work, log=lines.append, **QUICK)
    return work, paths, lines


def test_make_example_builds_the_teacher_the_data_and_the_feature_space_once(example, monkeypatch):
    work, paths, lines = example
    assert paths == {"dataset": work / "digits", "model": work / "digits-wan", "fd_features": work / "digits-fd"}
    assert len(list(paths["dataset"].glob("*.png"))) == 64
    assert (paths["dataset"] / "digit_0003.txt").read_text().strip() == "a digit 3"
    assert (paths["model"] / "transformer" / "config.json").is_file()
    vae = json.loads((paths["model"] / "vae" / "config.json").read_text())
    assert len(vae["latents_mean"]) == 16 and vae["base_dim"] == 8  # the trained VAE, with the digits' statistics
    assert not (work / "digits-build").exists() and not (work / "digits-wan.tmp").exists()
    assert [line.split(" (")[0].split(":")[0] for line in lines] == [
        "made the digits dataset", "made the digits FD feature space", "trained the digits VAE",
        "trained the digits teacher"]

    def no_training(*args, **kwargs):
        raise AssertionError("a second make-example must not train again")

    monkeypatch.setattr(digits_example, "train_vae", no_training)
    again: list[str] = []
    assert digits_example.make_digits_example(work, log=again.append, **QUICK) == paths
    assert len(again) == 1 and "already built" in again[0]


def test_the_feature_space_loads_and_its_fd_is_zero_on_the_real_statistics(example):
    _, paths, _ = example
    space = load_feature_space(paths["fd_features"])
    assert space.name == "digits FD" and space.size == 16
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert frechet_distance(*statistics(a), *statistics(a)) == pytest.approx(0.0, abs=1e-6)
    b = a + 2.0  # a shift of 2 in each of 5 dimensions: |Δμ|² = 20, the covariances equal
    assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(20.0, rel=1e-6)


def _config(tmp_path: Path, paths: dict[str, Path], **overrides) -> Path:
    backends = json.loads((REPO / "config_examples/tiny-wan-digits/multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(paths["dataset"])
        b["cache_dir"] = str(tmp_path / "cache" / b["id"])
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    prompts = tmp_path / "prompts.json"
    shutil.copy(REPO / "config_examples/tiny-wan-digits/prompts.json", prompts)
    config = json.loads((REPO / "config_examples/tiny-wan-digits/config.json").read_text())
    config.update(pretrained_model_name_or_path=str(paths["model"]), pretrained_t5_model_name_or_path=str(
        paths["model"]), data_backend_config=str(tmp_path / "backends.json"), output_dir=str(tmp_path / "out"),
        validation_prompt_library=str(prompts), validation_fd_features=str(paths["fd_features"]),
        report_to="none", **overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_the_main_jobs_config_writes_the_comparison_sheet_and_ends_with_the_fd_line(example, tmp_path, capsys):
    from simpletuner_dmd.hosts.reference.trainer import train

    _, paths, _ = example
    out = train(_config(tmp_path, paths, max_train_steps=2, validation_step_interval=1, checkpoint_step_interval=0,
                        validation_fd_samples=6, validation_teacher_steps="4,3"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-1].startswith("[simpletuner-dmd] digits FD (6 samples a row; lower is closer to the real data): ")
    report = json.loads((out / "fd.json").read_text())
    assert list(report["rows"]) == ["student", "ema", "teacher 4 steps", "teacher 3 steps"]
    assert all(np.isfinite(v) and v >= 0 for v in report["rows"].values())
    for step in (0, 1, 2):
        sheet = Image.open(out / "validation" / f"step-{step}" / "sheet.png")
        # 10 prompts of 16-pixel samples scaled to 64, 4 columns (two teachers, student, EMA), a header and a margin
        assert sheet.size == (96 + 4 * (64 + 4), 40 + 10 * (64 + 4))
    # the teacher's columns are sampled once and repeated on every round's sheet, pixel for pixel
    first = np.asarray(Image.open(out / "validation" / "step-0" / "sheet.png"))
    last = np.asarray(Image.open(out / "validation" / "step-2" / "sheet.png"))
    teacher_columns = np.s_[40:, 96:96 + 2 * 68]
    assert np.array_equal(first[teacher_columns], last[teacher_columns])
    assert not (out / "validation" / "step-1" / "digit-0" / "teacher-4").exists()
    assert (out / "validation" / "step-0" / "digit-0" / "teacher-4" / "frame-000.png").is_file()
    gif = Image.open(out / "validation" / "sheets.gif")
    assert gif.n_frames == 3  # one frame per round: step 0 (the baseline), 1 and 2


def test_validation_teacher_steps_is_refused_when_it_is_not_step_counts(example, tmp_path):
    from simpletuner_dmd.errors import ConfigError
    from simpletuner_dmd.hosts.reference.run_config import load_config
    from simpletuner_dmd.plugins import get_plugin_manager

    _, paths, _ = example
    with pytest.raises(ConfigError, match="validation_teacher_steps"):
        load_config(_config(tmp_path, paths, validation_teacher_steps="50,fifty"), get_plugin_manager())


def test_the_digits_teacher_is_distilled_with_the_token_length_and_shift_it_was_trained_with(tmp_path):
    config = json.loads((REPO / "config_examples/tiny-wan-digits/config.json").read_text())
    teacher = json.loads(digits_example.teacher_config(tmp_path, tmp_path / "m", tmp_path / "d", steps=1).read_text())
    assert config["tokenizer_max_length"] == teacher["tokenizer_max_length"] == digits_example.TEXT_TOKENS
    assert config["flow_schedule_shift"] == teacher["flow_schedule_shift"]
    assert config["resolution"] == teacher["resolution"] == digits_example.SIZE
