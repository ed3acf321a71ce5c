"""Quality benchmarks: does the DMD student match its teacher? ``python -m benchmarks.quality``.

Case A (``benchmarks/gmm.py``): a 2-D Gaussian mixture whose teacher is exact, through the example family plugin
(``pip install -e examples/gmm_family``) and the public hooks; DMD rows, and LCM and DCM rows for comparison
(``--rows lcm,dcm`` runs only those). Case B (``benchmarks/digits.py``): a small Wan transformer
trained on scikit-learn's digits, distilled with the reference host trainer. Case C (``benchmarks/moving_digits.py``,
``--cases c``): moving digits video, a bidirectional teacher and a causal (Self-Forcing) student.

Writes ``results.json``, ``results.md`` and PNG plots into ``--out`` (default ``benchmarks/results/quality``). Every row
is run with ``--seeds`` seeds (default 3) and reported as mean ± sd. Not part of CI; ``tests/test_quality_smoke.py`` runs
a reduced version of each case.

Needs the ``bench`` extra (matplotlib for the plots, scipy for case B: ``pip install -e '.[bench]'``) and, for case A,
the example family (``pip install -e examples/gmm_family``). Both are checked before any work: a missing one is one
``error:`` line with the pip command, exit status 2. ``--no-plots`` writes the tables without matplotlib.

The results survive the run: ``results.json`` and ``results.md`` are rewritten (atomically) after every finished row,
marked partial until the run ends; the plots are drawn last, and a failed plot loses no result.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from simpletuner_dmd.atomic import write_file
from simpletuner_dmd.optimizers import check_available
from simpletuner_dmd.plugins import get_plugin_manager, registered_families

from . import digits, gmm, moving_digits
from .quality_shared import CASE_A_TUNED, DEFAULT_OUT, HERE, log, map_in_order, plot_curves, save_figure

# --------------------------------------------------------------------------- case A


# The students of the rows, and the ablations that show what the defaults of the benchmark buy.
# Every row shares: real_score_guidance_scale 1 (the mixture is unconditional), model_type full (MLPs).
# Student lr 3e-4 and fake_score_lr 1e-3 (the critic faster than the student, as DMD2's two time-scale rule asks).
# CASE_A_TUNED (quality_shared.py): fake_score_lr 1e-3, generator_update_interval 5.
CASE_A_ROWS = {
    "DMD 3-step (1000,757,522), interval 5": {"lr": 3e-4, "dmd": {**CASE_A_TUNED}},
    "DMD 1-step (1000), interval 5": {"lr": 3e-4, "dmd": {**CASE_A_TUNED, "dmd_denoising_steps": [1000]}},
    "DMD 3-step, interval 1": {"lr": 3e-4, "dmd": {**CASE_A_TUNED, "generator_update_interval": 1}},
    # DMD2's GAN term (off by default), at the weights the single-seed sweep in the README liked best.
    "DMD 3-step + GAN (gan_loss_weight 1), interval 5": {
        "lr": 3e-4, "dmd": {**CASE_A_TUNED, "gan_loss_weight": 1.0}},
    "DMD 1-step + GAN (gan_loss_weight 0.3), interval 5": {
        "lr": 3e-4, "dmd": {**CASE_A_TUNED, "dmd_denoising_steps": [1000], "gan_loss_weight": 0.3}},
}
# The other methods on the same mixture, seeds, steps, batch, student lr and metrics (``model_type: full``: the frozen
# closed-form teacher is ``run.teacher``). Cond only (the mixture is unconditional), no timestep shift. DCM ``fine``
# needs a LoRA student (its detail expert is a second adapter), so only ``semantic`` fits the MLP family.
CASE_A_ROWS.update({
    "LCM 3-step": {"lr": 3e-4, "method": "lcm", "config": {
        "w_min": 1.0, "w_max": 1.0, "num_inference_steps": 3, "shift": 1.0}},
    "DCM semantic, 3 phases": {"lr": 3e-4, "method": "dcm", "config": {
        "mode": "semantic", "multiphase": 3, "distill_cfg": 0.0, "dcm_shift": 1.0}},
})
# The optimizer's moments in 8 bits (``optimizer: ao-adamw8bit``, torchao) for the student and the fake score: what
# `simpletuner-dmd estimate` counts as 2 bytes per trainable parameter instead of 8, measured here for quality.
CASE_A_ROWS.update({
    "DMD 3-step, interval 5, 8-bit moments (ao-adamw8bit)": {
        "lr": 3e-4, "dmd": {**CASE_A_TUNED}, "optimizer": "ao-adamw8bit"},
    "DMD 1-step, interval 5, 8-bit moments (ao-adamw8bit)": {
        "lr": 3e-4, "dmd": {**CASE_A_TUNED, "dmd_denoising_steps": [1000]}, "optimizer": "ao-adamw8bit"},
})
CASE_A_ABLATIONS = {
    "ablation: 3-step, schema defaults (fake_score_lr 1e-5, interval 1), student lr 1e-4": {"lr": 1e-4, "dmd": {}},
    "ablation: 3-step, fake_score_lr 1e-4 = student lr 1e-4, interval 5": {
        "lr": 1e-4, "dmd": {**CASE_A_TUNED, "fake_score_lr": 1e-4}},
    "ablation: 3-step, student lr 1e-3, fake_score_lr 1e-3, interval 5": {"lr": 1e-3, "dmd": {**CASE_A_TUNED}},
}


def select_rows(todo: dict[str, dict], rows: str | None) -> dict[str, dict]:
    """``rows``: comma-separated method names (``dmd``, ``lcm``, ``dcm``) or parts of row names (case-insensitive);
    ``None``: every row."""
    if not rows:
        return todo
    tokens = [t.strip().lower() for t in rows.split(",") if t.strip()]
    picked = {name: spec for name, spec in todo.items()
              if any(t == spec.get("method", "dmd") or t in name.lower() for t in tokens)}
    if not picked:
        raise SystemExit(f"--rows {rows!r} matches none of: {', '.join(todo)}")
    return picked


_METRICS = {}  # one per process: building it measures the reference samples against themselves


def _distil_task(task):
    """One (row, seed) run and the metrics of its snapshots, in this process or a worker."""
    name, folder, config, seed, steps, lr, method, snapshots, threads, optimizer = task
    torch.set_num_threads(threads)
    if "m" not in _METRICS:
        _METRICS["m"] = gmm.Metrics(gmm.family_and_mixture()[1])
    result = gmm.distil(folder, config, seed=seed, steps=steps, lr=lr, method=method, snapshot_steps=snapshots,
                        optimizer=optimizer)
    return name, seed, result, {k: _METRICS["m"](x) for k, x in result.snapshots.items()}


def case_a_todo(ablations: bool, rows_filter: str | None) -> dict[str, dict]:
    """The student rows a case A run trains (``--no-ablations``, ``--rows``)."""
    todo = dict(CASE_A_ROWS)
    if ablations:
        todo.update(CASE_A_ABLATIONS)
    return select_rows(todo, rows_filter)


CASE_A_FIXED_ROWS = 4  # the exact samples and the three teacher rows, measured on every run


def run_case_a(out: Path, *, seeds: int, steps: int, ablations: bool, cache: Path, rows_filter: str | None = None,
               previous: dict | None = None, jobs: int = 1, threads: int = 1,
               on_row: Callable[[str, dict], object] | None = None, plots: list | None = None) -> dict:
    """The case's rows; with ``rows_filter``, the student rows not selected are kept from ``previous`` (the stored
    results of an earlier run with the same settings), so ``--rows`` adds or refreshes rows of one table.

    ``on_row(name, row)`` is called as each row is finished (a student row once all its seeds are done). The plots are
    not drawn here: with a ``plots`` list, ``(path, draw)`` pairs are appended to it for the caller to draw after the
    results are written."""
    report = on_row or (lambda name, row: None)
    todo = case_a_todo(ablations, rows_filter)
    folder = gmm.fit_base(cache / "gmm", log=log)
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    rows: dict[str, dict] = {}
    scatter: dict[str, torch.Tensor] = {}
    curves: dict[str, dict] = {}

    name = "exact samples (noise floor of the metrics)"
    rows[name] = {"kind": "reference", "metrics": gmm.summarise(
        [metrics(mixture.sample(gmm.N_SAMPLES, torch.Generator().manual_seed(500 + s))) for s in range(seeds)])}
    report(name, rows[name])
    for n in (50, 3, 1):
        name = f"teacher Euler {n}"
        samples = [gmm.teacher_samples(folder, n, s) for s in range(seeds)]
        rows[name] = {"kind": "teacher", "steps": n, "metrics": gmm.summarise([metrics(x) for x in samples])}
        scatter[name] = samples[0]
        log(f"case A: {name}: {_fmt_row(rows[name]['metrics'])}")
        report(name, rows[name])

    snapshots = tuple(steps * k // 4 for k in (1, 2, 3))  # precision along training, not only at its end
    methods = {name: spec.get("method", "dmd") for name, spec in todo.items()}
    configs = {name: {"real_score_guidance_scale": 1.0, **spec["dmd"]} if methods[name] == "dmd"
               else dict(spec["config"]) for name, spec in todo.items()}
    tasks = [(name, folder, configs[name], s, steps, spec["lr"], methods[name], snapshots, threads,
              spec.get("optimizer", "adamw")) for name, spec in todo.items() for s in range(seeds)]
    done: dict[str, list] = {name: [] for name in todo}
    measured: dict[str, list] = {name: [] for name in todo}
    for name, seed, r, by_step in map_in_order(_distil_task, tasks, jobs):
        done[name].append(r)
        measured[name].append(by_step)
        log(f"case A: {name} seed {seed}: {r.seconds:.0f} s, {_fmt_row(gmm.summarise([by_step[steps]]))}")
        if len(done[name]) < seeds:
            continue
        # the row's last seed: its mean ± sd is final
        spec, results, method, config = todo[name], done[name], methods[name], configs[name]
        rows[name] = {"kind": "ablation" if name.startswith("ablation") else "student", "method": method,
                      **({"dmd_config": config} if method == "dmd" else {"method_config": config}),
                      "student_lr": spec["lr"], "optimizer": spec.get("optimizer", "adamw"),
                      "steps": steps, "seconds_per_run": sum(r.seconds for r in results) / len(results),
                      "metrics": gmm.summarise([m[steps] for m in measured[name]]),
                      "by_step": {k: gmm.summarise([m[k] for m in measured[name]]) for k in sorted(measured[name][0])}}
        scatter[name] = results[0].samples
        curves[name] = results[0].curves
        report(name, rows[name])
    if rows_filter and previous and previous.get("settings", {}).get("optimizer_steps") == steps:
        kept = {n: r for n, r in previous["rows"].items() if r["kind"] in ("student", "ablation") and n not in rows}
        rows.update(kept)
        log(f"case A: kept {len(kept)} rows of the stored results: {', '.join(kept)}")
        order = [n for n in rows if rows[n]["kind"] in ("reference", "teacher")] + \
            [n for n in {**CASE_A_ROWS, **CASE_A_ABLATIONS} if n in rows]
        rows = {n: rows[n] for n in order + [n for n in rows if n not in order]}  # the table's usual order
    else:
        kept = {}

    if plots is not None:
        # A --rows run draws only its own rows: its plots get their own names and leave the full run's in place.
        tag = "" if not rows_filter else ".rows-" + "".join(c if c.isalnum() else "-" for c in rows_filter)
        merged = dict(rows)
        plots += [(out / f"case_a_samples{tag}.png", lambda: _plot_scatter(out / f"case_a_samples{tag}.png", scatter,
                                                                          mixture)),
                  (out / f"case_a_curves{tag}.png", lambda: plot_curves(out / f"case_a_curves{tag}.png", curves)),
                  # from the merged rows' recorded figures
                  (out / "case_a_precision.png", lambda: _plot_precision(out / "case_a_precision.png", merged))]
    return {"rows": rows, "targets": _case_a_targets(rows), "kept_rows": sorted(kept), "settings": {
        "mixture": gmm.RING, "reference_samples": gmm.N_REFERENCE, "samples_per_run": gmm.N_SAMPLES,
        "optimizer_steps": steps, "batch_size": 256, "seeds": seeds}}


def _case_a_targets(rows: dict) -> dict:
    def mean(row, key):
        return rows[row]["metrics"][key]["mean"]

    ed50, ed3 = mean("teacher Euler 50", "energy_distance"), mean("teacher Euler 3", "energy_distance")
    out = {}
    for name, row in rows.items():
        if row["kind"] != "student":
            continue
        m = row["metrics"]
        out[name] = {
            "every mode covered (recall 1 on every seed)": all(v == 1.0 for v in m["recall"]["values"]),
            "precision >= 0.9": m["precision"]["mean"] >= 0.9,
            "energy <= 1.5x teacher-50": m["energy_distance"]["mean"] <= 1.5 * ed50,
            "energy <= 0.3x teacher-3": m["energy_distance"]["mean"] <= 0.3 * ed3,
            "energy / teacher-50": m["energy_distance"]["mean"] / ed50,
            "energy / teacher-3": m["energy_distance"]["mean"] / ed3,
        }
    return out


# --------------------------------------------------------------------------- plots and tables


def _plot_scatter(path: Path, samples: dict[str, torch.Tensor], mixture) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = (len(samples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    mu = mixture.mu.numpy()
    for ax, (name, x) in zip(axes.flat, samples.items()):
        x = x[:3000].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.scatter(mu[:, 0], mu[:, 1], s=12, c="red", marker="x")
        ax.set_xlim(-1.8, 1.8)
        ax.set_ylim(-1.8, 1.8)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(samples):]:
        ax.axis("off")
    save_figure(fig, path)


def _plot_precision(path: Path, rows: dict) -> None:
    """Precision (mean over seeds) after each quarter of training, per student row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, row in rows.items():
        if row.get("by_step"):
            steps = sorted(row["by_step"], key=int)
            ax.plot([int(k) for k in steps], [row["by_step"][k]["precision"]["mean"] for k in steps], marker="o",
                    lw=1, label=name)
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("precision (mean of seeds)")
    ax.legend(fontsize=6)
    save_figure(fig, path)


def _pm(stat: dict, digits: int = 3, sci: bool = False) -> str:
    if sci:
        return f"{stat['mean']:.2e} ± {stat['sd']:.1e}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _fmt_row(m: dict) -> str:
    return ", ".join(f"{k} {_pm(v, sci=k == 'energy_distance')}" for k, v in m.items())


def _provenance(case: dict) -> list[str]:
    return [f"Command: `{case['command']}` ({case['machine']}; this case {case['seconds']:.0f} s)", ""]


def _partial_line(label: str, case: dict) -> str:
    of = f" of {case['rows_expected']}" if case.get("rows_expected") else ""
    state = f"the run stopped ({case['stopped']})" if case.get("stopped") else \
        "still running when this was written (the finished run removes this line)"
    return f"partial: {label}: {len(case['rows'])}{of} rows done, {state}"


def _rows_section(title: str, case: dict, note: str) -> list[str]:
    """A case's rows in one table of whatever metrics they hold (mean ± sd): a running or stopped case's finished
    rows, or stored rows its own table cannot render."""
    keys = list(dict.fromkeys(k for row in case.get("rows", {}).values() for k in row.get("metrics", {})))
    seconds = f"{case['seconds']:.0f} s" + (" so far" if case.get("partial") else "") if "seconds" in case else "?"
    lines = [f"Command: `{case.get('command', '?')}` ({case.get('machine', '?')}; this case {seconds})", "",
             f"**{title} ({note}).**", "", "| row | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, row in case.get("rows", {}).items():
        m = row.get("metrics", {})
        lines.append(f"| {name} | " + " | ".join(
            _pm(m[k], sci=k == "energy_distance") if k in m else "" for k in keys) + " |")
    return lines + [""]


def _case_a_markdown(a: dict) -> list[str]:
    s = a["settings"]
    lines = _provenance(a) + [
        f"**Case A — 8-mode ring (radius 1, std 0.1), exact teacher, example `gmm` family plugin.** "
        f"{s['seeds']} seeds per row, mean ± sd; {s['samples_per_run']:,} samples per run against "
        f"{s['reference_samples']:,} exact samples; students trained {s['optimizer_steps']} optimizer steps "
        f"(batch {s['batch_size']}; student lr 3e-4, fake_score_lr 1e-3 unless the row says otherwise; LCM and DCM "
        f"rows: student lr 3e-4, no fake score).",
        "",
        "| row | energy distance ↓ | precision ↑ | recall ↑ | mode-weight TV ↓ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in a["rows"].items():
        m = row["metrics"]
        lines.append(f"| {name} | {_pm(m['energy_distance'], sci=True)} | {_pm(m['precision'])} | "
                     f"{_pm(m['recall'], 2)} | {_pm(m['mode_tv'])} |")
    lines += ["", "Targets (students):", "", "| student | all modes | precision ≥ 0.9 | ED ≤ 1.5× teacher-50 | "
              "ED ≤ 0.3× teacher-3 |", "| --- | --- | --- | --- | --- |"]
    for name, t in a["targets"].items():
        lines.append(
            f"| {name} | {_yes(t['every mode covered (recall 1 on every seed)'])} | {_yes(t['precision >= 0.9'])} | "
            f"{_yes(t['energy <= 1.5x teacher-50'])} ({t['energy / teacher-50']:.1f}×) | "
            f"{_yes(t['energy <= 0.3x teacher-3'])} ({t['energy / teacher-3']:.2f}×) |")
    return lines + [""]


def _case_b_markdown(b: dict) -> list[str]:
    return _provenance(b) + digits.markdown(b)


def _case_c_markdown(c: dict) -> list[str]:
    return _provenance(c) + moving_digits.markdown(c)


CASES = {  # key in results.json: (label, title, its own table)
    "case_a": ("case A", "Case A — 8-mode ring, exact teacher", _case_a_markdown),
    "case_b": ("case B", "Case B — digits through the Wan family", _case_b_markdown),
    "case_c": ("case C", "Case C — moving digits video, a causal student", _case_c_markdown),
}


def markdown(results: dict) -> str:
    lines = [_partial_line(label, results[k]) for k, (label, _, _) in CASES.items()
             if results.get(k, {}).get("partial")]
    lines += [""] if lines else []
    for key, (_, title, table) in CASES.items():
        case = results.get(key)
        if not case:
            continue
        if case.get("partial"):
            lines += _rows_section(title, case, "partial")
            continue
        try:
            lines += table(case)
        except Exception as exc:  # stored by another version of the benchmark: its rows still show
            lines += _rows_section(title, case, f"its table failed: {type(exc).__name__}: {exc}")
    return "\n".join(lines) + "\n"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# --------------------------------------------------------------------------- start-up checks

BENCH_INSTALL = "pip install -e '.[bench]'"
GMM_INSTALL = "pip install -e examples/gmm_family"


def _import_problem(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # not installed, or installed and broken
        return f"{type(exc).__name__}: {exc}"
    return None


def _gmm_family_problem() -> str | None:
    """Case A's family, found as ``benchmarks/gmm.py`` finds it: the ``gmm`` family registered through the
    ``simpletuner_dmd`` entry points, and its own package."""
    try:
        if "gmm" not in registered_families(get_plugin_manager()):
            return "no simpletuner_dmd entry point registers it"
    except Exception as exc:  # a plugin that fails to import (PluginError names it)
        return f"{type(exc).__name__}: {exc}"
    return _import_problem("gmm_family")


def missing_requirements(cases: set[str], plots: bool, rows_a: dict[str, dict] | None = None
                         ) -> list[tuple[str, str, str]]:
    """``(what, why, pip command)`` for each thing the selected cases and outputs need and cannot import;
    ``rows_a``: case A's student rows to run (an optimizer of theirs that cannot be built here is one of those)."""
    missing = []
    if plots and _import_problem("matplotlib"):
        missing.append(("matplotlib", "the plots; --no-plots skips them", BENCH_INSTALL))
    if cases & {"b", "c"} and _import_problem("scipy.linalg"):
        missing.append(("scipy", "the digits FD of cases B and C", BENCH_INSTALL))
    if "a" in cases:
        problem = _gmm_family_problem()
        if problem:
            missing.append(("the gmm family plugin", f"case A; {' '.join(problem.split())}", GMM_INSTALL))
    rows_by_optimizer: dict[str, list[str]] = {}
    for name, row in (rows_a or {}).items():
        if row.get("optimizer"):
            rows_by_optimizer.setdefault(row["optimizer"], []).append(name)
    for kind, names in sorted(rows_by_optimizer.items()):
        problem = check_available(kind)
        if problem:
            missing.append((f"optimizer {kind}'s package",
                            f"case A's rows {', '.join(repr(n) for n in names)}: {problem}; --rows selects others",
                            BENCH_INSTALL))
    return missing


def missing_line(missing: list[tuple[str, str, str]]) -> str:
    """One line: what is missing, for what, and the pip command(s) that install it."""
    what = "; ".join(f"{name} ({why})" for name, why, _ in missing)
    commands = " && ".join(dict.fromkeys(command for _, _, command in missing))
    return f"error: python -m benchmarks.quality cannot start, missing: {what}. Install with: {commands}"


# --------------------------------------------------------------------------- results, written as they come


class ResultsFile:
    """``results.json`` and ``results.md`` in ``out``, rewritten atomically (a temp file beside each, then
    ``os.replace``) after every finished row. A case being run is stored as ``"partial": true`` with the rows it has
    finished (and ``last_complete_run``, the complete results it replaces, so a run that dies loses nothing) until its
    ``finish``; results.md then starts with a ``partial: …`` line."""

    def __init__(self, out: Path, results: dict):
        self.out, self.results = out, results
        self.running: str | None = None

    def start(self, case: str, *, expected: int | None, provenance: dict) -> Callable[[str, dict], None]:
        """The ``on_row(name, row)`` callback of ``case``. Nothing is written until its first row."""
        stored = self.results.get(case)
        last = stored.get("last_complete_run") if stored and stored.get("partial") else stored
        self.running, self.started = case, time.time()
        self.partial = {"partial": True, "rows": {}, "rows_expected": expected, **provenance, "seconds": 0.0,
                        **({"last_complete_run": last} if last else {})}

        def on_row(name: str, row: dict) -> None:
            self.partial["rows"][name] = row
            self.partial["seconds"] = time.time() - self.started
            self.results[case] = self.partial
            try:
                self.write()
            except Exception as exc:  # e.g. a full disk: the run goes on, and the next row or the end writes again
                print(f"error: could not write the results after row {name!r}: {type(exc).__name__}: {exc}",
                      file=sys.stderr)

        return on_row

    def finish(self, case: str, entry: dict) -> None:
        self.results[case] = entry
        self.running = None
        self.write()

    def stopped(self, reason: str) -> None:
        """The running case stops (an error, Ctrl-C): its finished rows stay, marked as stopped."""
        if self.running and self.results.get(self.running) is self.partial:
            self.partial["stopped"] = reason
            self.partial["seconds"] = time.time() - self.started
            self.write()
        self.running = None

    def write(self) -> None:
        results = dict(self.results)
        if any(isinstance(v, dict) and v.get("partial") for v in results.values()):
            results = {"partial": True, **results}
        text, md = json.dumps(results, indent=1, default=float), markdown(self.results)
        write_file(self.out / "results.json", lambda tmp: Path(tmp).write_text(text))
        write_file(self.out / "results.md", lambda tmp: Path(tmp).write_text(md))


def _case_b_expected(run_case_b) -> int | None:
    """Case B's row count with its defaults (the reference rows, one per teacher step count and guidance, one per
    student)."""
    try:
        euler = inspect.signature(run_case_b).parameters["teacher_euler"].default
        return digits.expected_rows(euler)
    except Exception:  # digits.py changed shape: the partial line then says only how many rows are done
        return None


# --------------------------------------------------------------------------- main


# The case A side tables, each its own script with its own results files in --out (the commands their docs name):
# case name → (module, its arguments; --out and --cache are passed through, --jobs where the script takes it).
SIDE_CASES: dict[str, tuple[str, list[str], bool]] = {
    "guided": ("benchmarks.gmm_guided", ["--steps", "4000", "--seeds", "3"], True),  # issue 15 item 3
    "mixtures": ("benchmarks.gmm_mixtures", ["--seeds", "3", "--steps", "2000"], False),  # item 4
    "regression": ("benchmarks.gmm_regression", [], True),  # item 2: the regression term's weights
}


def run_side_case(name: str, args) -> float:
    """One side table through its script's ``main``; returns the seconds it took."""
    import importlib

    module, extra, takes_jobs = SIDE_CASES[name]
    argv = [*extra, "--out", str(args.out), "--cache", str(args.cache)] + (
        ["--jobs", str(args.jobs)] if takes_jobs else []) + (["--no-plots"] if args.no_plots and name != "regression"
                                                               else [])
    start = time.time()
    log(f"case {name}: python -m {module} {' '.join(argv)}")
    status = importlib.import_module(module).main(argv)
    if status:
        raise SystemExit(f"case {name}: python -m {module} exited with {status}")
    seconds = time.time() - start
    log(f"case {name}: done in {seconds:.0f} s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="fitted/trained teachers (reused)")
    parser.add_argument("--cases", default="a,b", help="comma-separated: a, b, c (moving digits video), and case A's "
                        "side tables guided, mixtures, regression (their own scripts and results files); all: every "
                        "one")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--gmm-steps", type=int, default=4000, help="case A optimizer steps per student")
    parser.add_argument("--no-ablations", action="store_true", help="case A: only the issue's rows")
    parser.add_argument("--rows", default=None, help="case A: only these student rows, comma-separated method names "
                        "(dmd, lcm, dcm) or parts of row names, e.g. lcm,dcm (the teacher rows always run)")
    parser.add_argument("--digits-teacher-steps", type=int, default=1200,
                        help="case B: the digits example's teacher steps (make_digits_example's default)")
    parser.add_argument("--digits-student-steps", type=int, default=None,
                        help="case B: optimizer steps per student (default: the main job's max_train_steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small nets run best on 1)")
    parser.add_argument("--jobs", type=int, default=1, help="case A: runs (row, seed) in this many processes")
    parser.add_argument("--no-plots", action="store_true", help="only results.json and results.md (no matplotlib)")
    args = parser.parse_args(argv)
    known = {"a", "b", "c", *SIDE_CASES}
    cases = known if args.cases == "all" else set(args.cases.split(","))
    if not cases or not cases <= known:
        parser.error(f"--cases: some of {', '.join(sorted(known))}, or all (got {args.cases!r})")
    todo_a = case_a_todo(not args.no_ablations, args.rows) if "a" in cases else {}  # a bad --rows stops here
    missing = missing_requirements({"a" if c in SIDE_CASES else c for c in cases}, plots=not args.no_plots,
                                   rows_a=todo_a)
    if missing:  # before any work, not after it
        print(missing_line(missing), file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    provenance = {"command": " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)]),
                  "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s)"}
    # A case not run this time keeps its last results (each case records its own command, machine and time).
    stored = args.out / "results.json"
    results = {k: v for k, v in json.loads(stored.read_text()).items() if k in CASES} \
        if stored.is_file() else {}
    writer = ResultsFile(args.out, results)
    plots: list = []  # (path, draw): drawn last, once every result is written
    start = time.time()
    try:
        if "a" in cases:
            previous = results.get("case_a")
            if previous and previous.get("partial"):  # --rows merges with the last complete results
                previous = previous.get("last_complete_run")
            on_row = writer.start("case_a", expected=CASE_A_FIXED_ROWS + len(todo_a), provenance=provenance)
            case_a = run_case_a(args.out, seeds=args.seeds, steps=args.gmm_steps, ablations=not args.no_ablations,
                                cache=args.cache, rows_filter=args.rows, previous=previous, jobs=args.jobs,
                                threads=args.threads, on_row=on_row, plots=None if args.no_plots else plots)
            case_a.update(provenance, seconds=time.time() - start)
            if case_a.get("kept_rows"):  # say where the kept rows came from
                case_a["command"] = f"{previous['command']}, then {provenance['command']}"
            writer.finish("case_a", case_a)
        if "b" in cases:
            start_b = time.time()
            on_row = writer.start("case_b", expected=_case_b_expected(digits.run_case_b), provenance=provenance)
            # run_case_b draws its own plots (after its rows are reported, when it takes on_row)
            extra = {"on_row": on_row} if "on_row" in inspect.signature(digits.run_case_b).parameters else {}
            case_b = digits.run_case_b(args.out, seeds=args.seeds, cache=args.cache, log=log,
                                       teacher_steps=args.digits_teacher_steps,
                                       student_steps=args.digits_student_steps or digits.STUDENT_STEPS,
                                       plots=not args.no_plots, **extra)
            case_b.update(provenance, seconds=time.time() - start_b)
            writer.finish("case_b", case_b)
        if "c" in cases:
            start_c = time.time()
            on_row = writer.start("case_c", expected=moving_digits.EXPECTED_ROWS, provenance=provenance)
            case_c = moving_digits.run_case_c(args.out, cache=args.cache, on_row=on_row, plots=not args.no_plots)
            case_c.update(provenance, seconds=time.time() - start_c)
            writer.finish("case_c", case_c)
    except BaseException as exc:  # Ctrl-C or an error: the finished rows stay, and say the run stopped
        try:
            writer.stopped(type(exc).__name__ + (f": {' '.join(str(exc).split())}" if str(exc) else ""))
        except Exception as write_error:  # e.g. a full disk: the rows written so far stay as they were
            print(f"error: could not mark the results as stopped: {write_error}", file=sys.stderr)
        raise
    side = {name: run_side_case(name, args) for name in SIDE_CASES if name in cases}
    status = 0
    for path, draw in plots:
        try:
            draw()
        except Exception as exc:  # the results are already written
            print(f"error: plot {path} failed ({type(exc).__name__}: {exc}); results.json and results.md are "
                  f"complete", file=sys.stderr)
            status = 1
    for name, seconds in side.items():
        log(f"case {name}: {seconds:.0f} s ({SIDE_CASES[name][0]}: its own .json/.md in {args.out})")
    log(f"done in {time.time() - start:.0f} s: {args.out / 'results.md'}")
    print(markdown(results))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
