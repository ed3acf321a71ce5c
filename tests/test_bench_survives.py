"""``python -m benchmarks.quality`` checks what it needs before any work and keeps every row it finishes.

The cases themselves are replaced by fakes (``tests/test_quality_smoke.py`` runs reduced real ones): these tests are
about start-up and the results files, and take well under a second each."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import digits, quality


def _metrics(value: float) -> dict:
    stat = {"mean": value, "sd": 0.0, "values": [value]}
    return {"energy_distance": stat, "precision": stat, "recall": stat, "mode_tv": stat}


def _row(kind: str, value: float) -> dict:
    return {"kind": kind, "metrics": _metrics(value)}


def _entry(rows: dict) -> dict:
    return {"rows": rows, "targets": {}, "kept_rows": [], "settings": {
        "seeds": 1, "samples_per_run": 100, "reference_samples": 200, "optimizer_steps": 4, "batch_size": 256}}


def _args(out, *extra) -> list[str]:
    # the current thread count, so main's torch.set_num_threads changes nothing for the other tests
    return ["--out", str(out), "--seeds", "1", "--threads", str(torch.get_num_threads()), *extra]


@pytest.fixture
def no_cases(monkeypatch):
    """Both cases fail if they are called; case A's family counts as installed (its real check is separate)."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("a case ran although the start-up check should have stopped the benchmark")

    monkeypatch.setattr(quality, "run_case_a", must_not_run)
    monkeypatch.setattr(digits, "run_case_b", must_not_run)
    monkeypatch.setattr(quality, "_gmm_family_problem", lambda: None)


@pytest.mark.parametrize("cases", ["a", "b", "a,b"])
def test_a_missing_matplotlib_stops_at_once_with_one_line(no_cases, monkeypatch, tmp_path, capsys, cases):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out"
    assert quality.main(_args(out, "--cases", cases)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "matplotlib" in lines[0] and "--no-plots" in lines[0]
    assert lines[0].endswith("Install with: pip install -e '.[bench]'")
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()  # nothing was done


def test_a_missing_scipy_and_gmm_family_are_named_on_the_same_line(no_cases, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    monkeypatch.setattr(quality, "_gmm_family_problem", lambda: "no simpletuner_dmd entry point registers it")
    assert quality.main(_args(tmp_path, "--cases", "a,b", "--no-plots")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "scipy (the digits FD of cases B and C)" in line and "the gmm family plugin (case A" in line
    assert "matplotlib" not in line  # --no-plots: not needed
    assert line.endswith("Install with: pip install -e '.[bench]' && pip install -e examples/gmm_family")


def test_case_a_rows_whose_optimizer_cannot_be_built_stop_it_at_once(no_cases, monkeypatch, tmp_path, capsys):
    """A fresh install without torchao used to train case A for half an hour and then die on its 8-bit rows."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    assert quality.main(_args(tmp_path / "out", "--cases", "a", "--no-plots")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "optimizer ao-adamw8bit" in line and "needs torchao" in line
    assert "8-bit moments (ao-adamw8bit)" in line and "--rows" in line
    assert line.endswith("Install with: pip install -e '.[bench]'")
    assert not (tmp_path / "out").exists()
    # the rows that need it not selected: nothing is missing
    assert quality.missing_requirements({"a"}, plots=False, rows_a=quality.case_a_todo(True, "lcm")) == []


def test_no_plots_runs_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(quality, "_gmm_family_problem", lambda: None)
    seen = {}

    def fake_case_a(out, *, plots, on_row, **kwargs):
        seen["plots"] = plots
        on_row("teacher Euler 50", _row("teacher", 1.0))
        return _entry({"teacher Euler 50": _row("teacher", 1.0)})

    monkeypatch.setattr(quality, "run_case_a", fake_case_a)
    assert quality.main(_args(tmp_path, "--cases", "a", "--no-plots")) == 0
    assert seen["plots"] is None  # no plot is asked for
    assert "teacher Euler 50" in json.loads((tmp_path / "results.json").read_text())["case_a"]["rows"]


def test_rows_are_written_as_they_finish_and_an_interrupted_run_keeps_them(monkeypatch, tmp_path):
    monkeypatch.setattr(quality, "_gmm_family_problem", lambda: None)
    stored_b = {"rows": {}, "targets": {}, "settings": {}, "command": "earlier", "machine": "m", "seconds": 1.0}
    (tmp_path / "results.json").write_text(json.dumps({"case_b": stored_b}))

    def fake_case_a(out, *, on_row, **kwargs):
        on_row("exact samples (noise floor of the metrics)", _row("reference", 0.5))
        written = json.loads((out / "results.json").read_text())  # already on disk, before the next row
        assert written["partial"] is True and written["case_a"]["partial"] is True
        assert list(written["case_a"]["rows"]) == ["exact samples (noise floor of the metrics)"]
        on_row("teacher Euler 50", _row("teacher", 1.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "run_case_a", fake_case_a)
    with pytest.raises(KeyboardInterrupt):
        quality.main(_args(tmp_path, "--cases", "a", "--rows", "lcm,dcm", "--no-plots"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["partial"] is True
    a = results["case_a"]
    assert a["partial"] is True and a["stopped"] == "KeyboardInterrupt"
    assert list(a["rows"]) == ["exact samples (noise floor of the metrics)", "teacher Euler 50"]
    assert a["rows_expected"] == quality.CASE_A_FIXED_ROWS + 2  # the teacher rows, LCM and DCM
    assert results["case_b"] == stored_b  # a case not run keeps its results
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[0] == "partial: case A: 2 of 6 rows done, the run stopped (KeyboardInterrupt)"
    assert "| teacher Euler 50 |" in md
    assert "Case B — digits through the Wan family (its table failed: KeyError" in md  # the stored case still shows
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp file


def test_the_final_write_drops_partial_and_plots_come_last(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(quality, "_gmm_family_problem", lambda: None)
    complete = {**_entry({"teacher Euler 50": _row("teacher", 9.0)}), "command": "first", "machine": "m",
                "seconds": 3.0}
    interrupted = {"partial": True, "rows": {"teacher Euler 50": _row("teacher", 1.0)}, "rows_expected": 6,
                   "command": "second", "machine": "m", "seconds": 1.0, "stopped": "KeyboardInterrupt",
                   "last_complete_run": complete}
    (tmp_path / "results.json").write_text(json.dumps({"partial": True, "case_a": interrupted}))
    seen = {}

    def draw_when_written():
        seen["at_plot"] = json.loads((tmp_path / "results.json").read_text())
        raise RuntimeError("no display")

    def fake_case_a(out, *, on_row, plots, previous, **kwargs):
        seen["previous"] = previous
        rows = {name: _row("teacher", 2.0) for name in ("teacher Euler 50", "teacher Euler 3")}
        for name, row in rows.items():
            on_row(name, row)
        plots.append((out / "case_a_samples.png", draw_when_written))
        return _entry(rows)

    monkeypatch.setattr(quality, "run_case_a", fake_case_a)
    assert quality.main(_args(tmp_path, "--cases", "a", "--rows", "lcm")) == 1  # a failed plot: status 1
    assert seen["previous"] == complete  # --rows merges with the last complete results, not the interrupted run
    results = json.loads((tmp_path / "results.json").read_text())
    assert seen["at_plot"] == results  # every result was written before the plot was drawn
    assert "partial" not in results and "partial" not in results["case_a"]
    assert "last_complete_run" not in results["case_a"] and "stopped" not in results["case_a"]
    assert list(results["case_a"]["rows"]) == ["teacher Euler 50", "teacher Euler 3"]
    assert "partial" not in (tmp_path / "results.md").read_text()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: plot ") and "no display" in err[0]


def test_case_b_gets_on_row_only_if_it_takes_it(monkeypatch, tmp_path):
    """``run_case_b`` (benchmarks/digits.py) reports its rows through ``on_row`` once it accepts the parameter."""
    calls = []

    def old_style(out, *, seeds, cache, log=print, teacher_steps=3000, student_steps=600, plots=True):
        calls.append("old")
        raise RuntimeError("stop here")

    def new_style(out, *, seeds, cache, log=print, teacher_steps=3000, student_steps=600, plots=True,
                  teacher_euler=(50, 3, 1), on_row=None):
        calls.append("new")
        on_row("teacher Euler 50", {"kind": "teacher", "metrics": {"digits_fd": {"mean": 80.0, "sd": 1.0}}})
        raise RuntimeError("stop here")

    for fake in (old_style, new_style):
        monkeypatch.setattr(digits, "run_case_b", fake)
        with pytest.raises(RuntimeError):
            quality.main(_args(tmp_path, "--cases", "b", "--no-plots"))
    assert calls == ["old", "new"]
    b = json.loads((tmp_path / "results.json").read_text())["case_b"]
    assert b["partial"] is True and b["stopped"] == "RuntimeError: stop here"
    # the floor rows, every teacher row at each guidance, every student row (digits.expected_rows says the same)
    assert b["rows_expected"] == 2 + 3 * len(digits.TEACHER_GUIDANCE) + len(digits.STUDENTS)
    assert (tmp_path / "results.md").read_text().startswith("partial: case B: 1 of ")
