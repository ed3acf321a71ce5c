"""The drift signal (``simpletuner_dmd.drift``) on case B: does it stay quiet on the main job and warn on settings
that drift?

Each row is the main job's config (``config_examples/tiny-wan-digits``: its keys, its validation every 200 steps with
the teacher at 50 and 3 steps, its closing digits FD) run by the reference host on case B's digits example, with the
row's keys changed. The drift signal compares every validation round's student and EMA samples (one per prompt,
``a digit 0`` … ``a digit 9``, the validation seed) with the first teacher column's (50 steps, at
``validation_teacher_guidance``: the guidance the row distils toward). Recorded per row: every warning (which sample
set, which statistic, at which step), the first step that warned, the last round's statistics against the teacher's,
the run's closing digits FD and its time.

``python -m benchmarks.drift [--rows main,quickstart,...]`` writes each row, as it finishes, to
``benchmarks/results/quality/drift_signal_<tag>.json`` (with its ``drift.png`` and last sheet beside it) and rewrites
``drift_signal.md`` from every row file there, so rows run in separate processes side by side add up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from .quality_shared import DEFAULT_OUT, HERE, log

REPO = HERE.parent
MAIN_JOB = REPO / "config_examples" / "tiny-wan-digits"
GUIDED = {"validation_teacher_guidance": 3.0, "validation_step_interval": 100}
# name: (short tag, host keys, distillation_config keys)
ROWS: dict[str, tuple[str, dict, dict]] = {
    "main job (config_examples/tiny-wan-digits)": ("main", {}, {}),
    "quickstart settings (student lr 2e-5, fake_score_lr 1e-5, interval 1, guidance 3)": (
        "quickstart", {"learning_rate": 2e-5, **GUIDED},
        {"fake_score_lr": 1e-5, "generator_update_interval": 1, "real_score_guidance_scale": 3.0}),
    "the quickstart's keys with a student lr 250x theirs (5e-3; fake_score_lr 1e-5, interval 1, guidance 3)": (
        "fast-student", {"learning_rate": 5e-3, **GUIDED},
        {"fake_score_lr": 1e-5, "generator_update_interval": 1, "real_score_guidance_scale": 3.0}),
    "the main job with a student lr 100x its own (5e-2)": (
        "lr-100x", {"learning_rate": 5e-2, "validation_step_interval": 100}, {}),
}
SHOWN = ("brightness", "std_r", "saturation", "sample_spread")


def row_config(folder: Path, paths: dict[str, Path], tag: str, host: dict, dmd: dict) -> Path:
    """The main job's config with the example's absolute paths, a cache and an output folder under ``folder``."""
    config = json.loads((MAIN_JOB / "config.json").read_text())
    backends = json.loads((MAIN_JOB / "multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(paths["dataset"])
        b["cache_dir"] = str(folder / "cache" / ("text" if b["dataset_type"] == "text_embeds" else "latents"))
    (folder / "multidatabackend.json").write_text(json.dumps(backends, indent=1))
    config.update(pretrained_model_name_or_path=str(paths["model"]), pretrained_t5_model_name_or_path=str(paths["model"]),
                  data_backend_config=str(folder / "multidatabackend.json"), output_dir=str(folder / tag),
                  validation_prompt_library=str(MAIN_JOB / "prompts.json"),
                  validation_fd_features=str(paths["fd_features"]), report_to="none", **host)
    config["distillation_config"] = {**config["distillation_config"], **dmd}
    path = folder / f"{tag}.json"
    path.write_text(json.dumps(config, indent=1))
    shutil.rmtree(folder / tag, ignore_errors=True)
    return path


def summarise(drift: dict, fd: dict | None, seconds: float, host: dict, dmd: dict) -> dict:
    warnings = [{"step": r["step"], **w} for r in drift["rounds"] for w in r["warnings"]]
    last = drift["rounds"][-1]
    return {"host_keys": host, "dmd_keys": dmd, "seconds": seconds, "reference": drift["reference"]["label"],
            "steps": [r["step"] for r in drift["rounds"]], "warnings": warnings,
            "first_warning_step": min((w["step"] for w in warnings), default=None),
            "statistics_warned": sorted({w["statistic"] for w in warnings}),
            "last_round": {"step": last["step"], "values": last["values"],
                           "reference": drift["reference"]["values"]},
            "digits_fd": (fd or {}).get("rows")}


def markdown(rows: dict, bands: dict) -> list[str]:
    lines = ["Bands: " + ", ".join(f"`{k}` ±{v['relative']:.0%} + {v['absolute']:g}" for k, v in bands.items())
             + " (of the teacher's value; no warning at step 0, the untrained baseline).", "",
             "| row | command | warned | first warning | last round: student (ema) vs teacher — " + ", ".join(SHOWN)
             + " | closing digits FD | time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        last = row["last_round"]
        cells = []
        for k in SHOWN:
            if k in last["reference"]:
                v = last["values"]
                cells.append(f"{k} {v['student'][k]:.3f} ({v['ema'][k]:.3f}) vs {last['reference'][k]:.3f}")
        warned = "; ".join(
            f"`{s}`: " + ", ".join(f"{name} at " + ", ".join(str(w["step"]) for w in row["warnings"]
                                                               if w["statistic"] == s and w["samples"] == name)
                                   for name in dict.fromkeys(w["samples"] for w in row["warnings"]
                                                             if w["statistic"] == s))
            for s in row["statistics_warned"]) or "no"
        fd = " · ".join(f"{k} {v:.1f}" for k, v in (row["digits_fd"] or {}).items())
        first = row["first_warning_step"] if row["warnings"] else "—"
        lines.append(f"| {name} | `{row['command']}` | {warned} | {first} | {'; '.join(cells)} (step {last['step']}) "
                     f"| {fd} | {row['seconds']:.0f} s |")
    return lines + [""]


def main(argv=None) -> int:
    from simpletuner_dmd.drift import BANDS
    from simpletuner_dmd.hosts.reference.trainer import train

    from .digits import build_example

    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift")
    parser.add_argument("--rows", default=",".join(t for t, _, _ in ROWS.values()),
                        help="tags of the rows to run: " + ", ".join(t for t, _, _ in ROWS.values()))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    wanted = args.rows.split(",")
    paths = build_example(HERE / ".cache", log=log)
    folder = HERE / ".cache" / "drift-rows"
    folder.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    bands = {k: {"relative": b.relative, "absolute": b.absolute} for k, b in BANDS.items()}
    for name, (tag, host, dmd) in ROWS.items():
        if tag not in wanted:
            continue
        t0 = time.time()
        out = train(row_config(folder, paths, tag, host, dmd))
        drift = json.loads((out / "validation" / "drift.json").read_text())
        fd = json.loads((out / "fd.json").read_text()) if (out / "fd.json").is_file() else None
        row = {"name": name, "command": f"python -m benchmarks.drift --rows {tag}", "bands": bands,
               **summarise(drift, fd, time.time() - t0, host, dmd)}
        (args.out / f"drift_signal_{tag}.json").write_text(json.dumps(row, indent=1, default=float))
        shutil.copyfile(out / "validation" / "drift.png", args.out / f"drift_signal_{tag}.png")
        shutil.copyfile(out / "validation" / f"step-{drift['rounds'][-1]['step']}" / "sheet.png",
                        args.out / f"drift_signal_{tag}_sheet.png")
        log(f"drift: {name}: warned {row['statistics_warned'] or 'nothing'}, first at step "
            f"{row['first_warning_step']} ({row['seconds']:.0f} s)")
        order = [t for t, _, _ in ROWS.values()]
        files = sorted(args.out.glob("drift_signal_*.json"),
                       key=lambda f: order.index(f.stem[13:]) if f.stem[13:] in order else len(order))
        rows = {r["name"]: r for r in (json.loads(f.read_text()) for f in files)}
        (args.out / "drift_signal.md").write_text("\n".join(markdown(rows, bands)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
