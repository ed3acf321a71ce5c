"""The drift signal (``simpletuner_dmd.drift``): its statistics on hand-made frames, its warnings and files, and the
reference host's validation logging it to the trackers and writing the plot."""

from __future__ import annotations

import csv
import json
import tempfile

import pytest
import torch

from simpletuner_dmd.drift import BANDS, DriftMonitor, frame_statistics, out_of_band


def digits_like(n: int = 10, channels: int = 3, frames: int = 1, seed: int = 0) -> torch.Tensor:
    """``n`` samples ``(C, F, 16, 16)``: a bright random stroke pattern on a dark ground, different per sample."""
    g = torch.Generator().manual_seed(seed)
    strokes = (torch.rand(n, 1, frames, 16, 16, generator=g) > 0.7).float()
    ground = 0.1 + 0.05 * torch.rand(n, 1, frames, 16, 16, generator=g)
    return (ground + 0.8 * strokes).clamp(0, 1).expand(-1, channels, -1, -1, -1).clone()


def warned(reference: torch.Tensor, samples: torch.Tensor, step: int = 200) -> tuple[set[str], list[str]]:
    lines: list[str] = []
    monitor = DriftMonitor(tempfile.mkdtemp(), warn=lines.append)
    monitor.set_reference(reference, label="teacher 50 steps")
    monitor.observe(step, {"student": samples})
    return {w["statistic"] for w in monitor.rounds[-1]["warnings"]}, lines


def test_identical_and_nearly_identical_samples_stay_quiet():
    teacher = digits_like()
    assert warned(teacher, teacher) == (set(), [])
    jitter = (teacher + (torch.rand(teacher.shape, generator=torch.Generator().manual_seed(1)) - 0.5) / 255)
    assert warned(teacher, jitter.clamp(0, 1)) == (set(), [])
    assert warned(teacher, digits_like(seed=3)) == (set(), [])  # other samples of the same look


def test_a_darkened_copy_warns_on_brightness_in_one_line_naming_it():
    teacher = digits_like()
    moved, lines = warned(teacher, teacher * 0.7)
    assert {"brightness", "mean_r", "mean_g", "mean_b"} <= moved
    assert len(lines) == 1 and lines[0].startswith("drift at step 200, student against teacher 50 steps: ")
    value, ref = frame_statistics(teacher * 0.7)["brightness"], frame_statistics(teacher)["brightness"]
    assert f"brightness {value:.3f} vs {ref:.3f}" in lines[0]
    assert warned(teacher, teacher * 0.97)[0] == set()  # 3 % darker: inside the band


def test_a_collapsed_batch_warns_on_the_sample_spread():
    teacher = digits_like()
    collapsed = teacher[:1].expand(len(teacher), -1, -1, -1, -1)
    assert frame_statistics(collapsed)["sample_spread"] == 0
    assert "sample_spread" in warned(teacher, collapsed)[0]


def test_the_spread_is_across_seeds_of_a_prompt_when_there_are_several():
    x = digits_like(4)
    same_per_prompt = torch.cat([x[:2], x[:2]])[[0, 2, 1, 3]]  # prompts 0, 0, 1, 1: each prompt's seeds identical
    assert frame_statistics(same_per_prompt, groups=[0, 0, 1, 1])["sample_spread"] == 0
    assert frame_statistics(same_per_prompt)["sample_spread"] > 0.1  # across all samples (the prompts differ)
    assert "sample_spread" not in frame_statistics(x[:1])  # one sample: no spread to measure


def test_a_saturated_copy_warns_on_saturation_and_a_yellowed_grey_one_too():
    g = torch.Generator().manual_seed(0)
    colour = (digits_like() * (0.7 + 0.3 * torch.rand(10, 3, 1, 1, 1, generator=g))).clamp(0, 1)
    grey = colour.mean(1, keepdim=True)
    saturated = (grey + 2.5 * (colour - grey)).clamp(0, 1)
    assert "saturation" in warned(colour, saturated)[0]
    teacher = digits_like()  # three equal channels: chroma 0
    assert frame_statistics(teacher)["saturation"] == 0
    yellowed = teacher * torch.tensor([1.0, 1.0, 0.6]).view(1, 3, 1, 1, 1)
    assert {"saturation", "mean_b"} <= warned(teacher, yellowed)[0]


def test_one_channel_frames_have_no_saturation():
    grey = digits_like(channels=1)
    stats = frame_statistics(grey)
    assert "saturation" not in stats and {"brightness", "mean_grey", "std_grey", "sample_spread"} <= set(stats)
    assert frame_statistics(grey[:, :, 0])["brightness"] == stats["brightness"]  # images (B, C, H, W) too
    assert "brightness" in warned(grey, grey * 0.6)[0]


def test_a_frozen_video_warns_on_the_frame_change():
    video = digits_like(frames=5)
    frozen = video[:, :, :1].expand(-1, -1, 5, -1, -1)
    assert frame_statistics(frozen)["frame_change"] == 0
    assert "frame_change" in warned(video, frozen)[0]
    assert "frame_change" not in frame_statistics(video[:, :, :1])


def test_the_bands_are_relative_with_an_absolute_floor():
    band = BANDS["brightness"]
    assert band.allows(0.5 * (1 + band.relative) + band.absolute * 0.99, 0.5)
    assert not band.allows(0.5 * (1 + band.relative) + band.absolute * 1.01, 0.5)
    assert out_of_band({"saturation": 0.02}, {"saturation": 0.0}) == {}  # near 0: the floor, not the ratio


def test_the_monitor_keeps_the_history_writes_its_files_and_never_warns_at_the_baseline(tmp_path):
    lines: list[str] = []
    teacher = digits_like()
    monitor = DriftMonitor(tmp_path, warn=lines.append)
    monitor.set_reference(teacher, label="teacher 50 steps")
    values = monitor.observe(0, {"student": teacher * 0.5, "ema": teacher * 0.5})  # the untrained baseline
    assert lines == [] and monitor.rounds[0]["warnings"] == []
    assert values["drift/student/brightness"] == pytest.approx(frame_statistics(teacher * 0.5)["brightness"])
    assert values["drift/teacher_50_steps/brightness"] == pytest.approx(frame_statistics(teacher)["brightness"])
    monitor.observe(100, {"student": teacher, "ema": teacher})
    monitor.observe(200, {"student": teacher * 0.5, "ema": teacher})
    assert len(lines) == 1 and "student against teacher 50 steps" in lines[0]
    report = json.loads((tmp_path / "drift.json").read_text())
    assert [r["step"] for r in report["rounds"]] == [0, 100, 200]
    assert report["reference"]["label"] == "teacher 50 steps" and report["quiet_steps"] == [0]
    assert {w["statistic"] for w in report["rounds"][2]["warnings"]} >= {"brightness"}
    rows = list(csv.DictReader((tmp_path / "drift.csv").open()))
    assert len(rows) == 3 * 2 * len(frame_statistics(teacher))
    assert {r["statistic"] for r in rows if r["warned"] == "1"} == {w["statistic"] for w in
                                                                    report["rounds"][2]["warnings"]}
    # the grey teacher's chroma is near 0: its band's lower limit stops at 0 (no statistic is negative)
    assert all(float(r["low"]) >= 0 for r in rows) and any(float(r["low"]) == 0 for r in rows)
    from PIL import Image

    assert Image.open(tmp_path / "drift.png").size[0] > 300


def test_without_a_reference_the_first_round_is_the_reference(tmp_path):
    lines: list[str] = []
    monitor = DriftMonitor(tmp_path, warn=lines.append, quiet_steps=())
    x = digits_like()
    monitor.observe(10, {"student": x})
    assert monitor.reference_label == "student at step 10" and lines == []
    monitor.observe(20, {"student": x * 0.6})
    assert len(lines) == 1 and "against student at step 10" in lines[0]


def test_the_reference_hosts_validation_logs_the_drift_and_draws_its_plot(job):
    """A one-step run: both validation rounds (the baseline and step 1) are in drift.json against the teacher's
    sample, its values reach the tracker (tensorboard) under drift/, and the plot and the CSV are written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpletuner_dmd.hosts.reference.trainer import train

    out = train(job(max_train_steps=1, validation_step_interval=1, checkpoint_step_interval=0,
                    report_to="tensorboard"))
    folder = out / "validation"
    report = json.loads((folder / "drift.json").read_text())
    assert report["reference"]["label"] == "teacher 3 steps"  # validation_num_inference_steps 3, no teacher steps key
    assert [r["step"] for r in report["rounds"]] == [0, 1]
    assert all(set(r["values"]) == {"ema"} for r in report["rounds"])  # ema_validation ema_only
    stats = report["rounds"][-1]["values"]["ema"]
    assert {"brightness", "mean_r", "std_b", "saturation", "frame_change"} <= set(stats)  # a 5-frame video
    assert "sample_spread" not in stats  # one validation prompt, one seed
    assert (folder / "drift.png").is_file() and (folder / "drift.csv").is_file()
    events = [e for e in out.rglob("events.out.tfevents.*")]
    tags, logged = set(), {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        if "drift/ema/brightness" in acc.Tags()["scalars"]:
            logged = {e.step: e.value for e in acc.Scalars("drift/ema/brightness")}
    assert "drift/teacher_3_steps/brightness" in tags
    assert logged == {r["step"]: pytest.approx(r["values"]["ema"]["brightness"]) for r in report["rounds"]}


def test_the_bridge_turns_simpletuners_media_into_frames_and_observes_each_round(tmp_path, monkeypatch):
    """SimpleTuner's validation media (PIL images, or a list of PIL frames per video; sizes may differ) become one
    (B, 3, F, H, W) batch, and each round goes to one monitor whose reference is the first round."""
    from types import SimpleNamespace

    from PIL import Image

    from simpletuner_dmd.hosts.simpletuner.validation_drift import media_to_frames, observe_round

    grey, white = Image.new("RGB", (32, 16), (128, 128, 128)), Image.new("RGB", (64, 32), (255, 255, 255))
    frames = media_to_frames([grey, white])
    assert frames.shape == (2, 3, 1, 16, 32) and frames[1].min() == 1.0
    video = media_to_frames([[grey, white, grey], [white, white]])
    assert video.shape == (2, 3, 2, 16, 32)  # cut to the fewest frames

    logged, lines = [], []
    validation = SimpleNamespace(save_dir=str(tmp_path), global_step=0,
                                 accelerator=SimpleNamespace(log=lambda values, step: logged.append((step, values))))
    import simpletuner_dmd.hosts.simpletuner.validation_drift as bridge

    monkeypatch.setattr(bridge, "log", lines.append)  # the bridge's log line, captured
    observe_round(validation, {"a": [grey], "b": [white]})
    validation.global_step = 5
    dark = Image.new("RGB", (32, 16), (40, 40, 40))
    observe_round(validation, {"a": [dark], "b": [dark]})
    report = json.loads((tmp_path / "drift.json").read_text())
    assert report["reference"]["label"] == "samples at step 0" and [r["step"] for r in report["rounds"]] == [0, 5]
    assert [s for s, _ in logged] == [0, 5] and "drift/samples/brightness" in logged[1][1]
    assert len(lines) == 1 and lines[0].startswith("warning: drift at step 5, samples against samples at step 0: ")
    assert "sample_spread" in lines[0] and "brightness" in lines[0]


def test_a_resumed_run_continues_the_history_and_a_new_run_starts_it_again(tmp_path):
    x = digits_like()
    first = DriftMonitor(tmp_path, warn=print, quiet_steps=())
    first.observe(0, {"student": x})
    first.observe(100, {"student": x})
    resumed = DriftMonitor(tmp_path, warn=print, quiet_steps=())  # the same folder, after a resume at step 100
    assert resumed.reference_label == "student at step 0"
    resumed.observe(100, {"student": x * 0.9})  # step 100 validated again: replaced, not doubled
    resumed.observe(200, {"student": x})
    report = json.loads((tmp_path / "drift.json").read_text())
    assert [r["step"] for r in report["rounds"]] == [0, 100, 200] and report["reference"]["label"] == "student at step 0"
    assert report["rounds"][1]["values"]["student"] == frame_statistics(x * 0.9)
    again = DriftMonitor(tmp_path, warn=print, quiet_steps=())  # a new run in the same folder, from step 0
    again.observe(0, {"student": x * 0.5})
    report = json.loads((tmp_path / "drift.json").read_text())
    assert [r["step"] for r in report["rounds"]] == [0]
    assert report["reference"]["values"] == frame_statistics(x * 0.5)  # its own first round, not the old file's
