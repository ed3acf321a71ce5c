"""Case A ablation of DMD v1's regression term (``regression_loss_weight``) on the Gaussian mixture.

    python -m benchmarks.gmm_regression --jobs 2          # 2 students × 3 weights × 3 seeds, 2000 steps each

Each row is case A's tuned DMD student (``benchmarks/quality.py``: student lr 3e-4, ``fake_score_lr`` 1e-3,
``generator_update_interval`` 5, guidance 1 — the mixture is unconditional) distilled through ``benchmarks.gmm.distil``
with ``regression_loss_weight`` in {0, 0.25, 1}, for the 3-step (1000, 757, 522) and the 1-step (1000) student. The
teacher's ODE pairs (1024 noises, 50 Euler steps of the exact teacher, states at the student steps) are generated once
per (student steps, seed) before the runs start, by a zero-step ``distil`` with ``regression_latent_shape`` set, and
every run reuses them from ``<cache>/gmm-regression/cache/ode_pairs``. The prompts are one empty text: the family
ignores its conditions.

Metrics (``benchmarks.gmm.Metrics``, on 10 000 samples per run): precision, energy distance, recall, mode TV; and the
*mapping RMSE*, ``sqrt(mean |x_student(ε) − x_teacher50(ε)|²)`` on the same noises — the noise-to-sample coupling the
regression term pulls toward (the 3-step student adds fresh noise between its steps, so its mapping is stochastic).
Each row (mean ± sd over the seeds) is written to ``benchmarks/results/quality/regression_ablation.{json,md}`` as soon
as its last seed finishes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "quality"

# Case A's tuned DMD rows (benchmarks/quality.py CASE_A_TUNED, lr 3e-4), restated so this script stands alone.
CASE_A = {"real_score_guidance_scale": 1.0, "fake_score_lr": 1e-3, "generator_update_interval": 5}
STUDENT_LR = 3e-4
STUDENTS = {"3-step (1000,757,522)": [1000, 757, 522], "1-step (1000)": [1000]}
WEIGHTS = (0.0, 0.25, 1.0)
PAIRS = {"regression_prompts": [""], "regression_num_pairs": 1024, "regression_teacher_steps": 50,
         "regression_latent_shape": [2, 1, 1, 1]}


def config(steps: list[int], weight: float) -> dict:
    cfg = {**CASE_A, "dmd_denoising_steps": steps, "regression_loss_weight": weight}
    return {**cfg, **PAIRS} if weight > 0 else cfg


def log(message: str) -> None:
    print(f"[gmm_regression] {message}", flush=True)


_STATE: dict = {}  # per process: the metrics (their reference samples) and the teachers' samples


def _run(task: tuple) -> tuple:
    from . import gmm

    name, steps, weight, seed, folder, n_steps, threads = task
    torch.set_num_threads(threads)
    if "metrics" not in _STATE:
        _STATE["metrics"] = gmm.Metrics(gmm.family_and_mixture()[1])
    result = gmm.distil(Path(folder), config(steps, weight), seed=seed, steps=n_steps, lr=STUDENT_LR)
    teacher = gmm.teacher_samples(Path(folder), 50, seed)  # the same noises as the student's samples
    metrics = _STATE["metrics"](result.samples)
    metrics["mapping_rmse"] = float(((result.samples - teacher) ** 2).sum(1).mean().sqrt())
    return name, weight, seed, result.seconds, metrics


def _pm(stat: dict, digits: int = 3, sci: bool = False) -> str:
    fmt = f"{{:.{digits - 1}e}}" if sci else f"{{:.{digits}f}}"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['sd'])}"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Case A: DMD v1's regression term (`regression_loss_weight`)",
        "",
        f"`{results['command']}` — {s['optimizer_steps']} optimizer steps, {s['seeds']} seeds, batch 256, student lr "
        f"{STUDENT_LR}, fake_score_lr 1e-3, generator_update_interval 5, guidance 1; pairs: "
        f"{PAIRS['regression_num_pairs']} per seed, {PAIRS['regression_teacher_steps']} Euler steps of the exact "
        f"teacher (this run spent {s['pair_generation_seconds']:.1f} s making the caches it did not find). Mean ± sd "
        "over the "
        "seeds; mapping RMSE: distance to the 50-step teacher's sample from the same noise."
        + (" **Partial: rows still running.**" if results.get("partial") else ""),
        "",
        "| student | regression_loss_weight | precision ↑ | energy distance ↓ | recall ↑ | mode TV ↓ | mapping RMSE | "
        "s / run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        m = row["metrics"]
        weight = "—" if row["weight"] is None else f"{row['weight']:g}"
        lines.append(f"| {row['student']} | {weight} | {_pm(m['precision'])} | {_pm(m['energy_distance'], sci=True)} "
                     f"| {_pm(m['recall'], 2)} | {_pm(m['mode_tv'])} | {_pm(m['mapping_rmse'])} | "
                     f"{row.get('seconds_per_run', 0):.0f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> None:
    from simpletuner_dmd.atomic import write_file

    write_file(out / "regression_ablation.json",
               lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1), encoding="utf-8"))
    write_file(out / "regression_ablation.md", lambda tmp: Path(tmp).write_text(markdown(results), encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from . import gmm

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gmm_regression", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs in this many processes (one thread each)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="the fitted base and the pairs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    start = time.time()
    folder = gmm.fit_base(args.cache / "gmm-regression", log=log)
    seeds = list(range(args.seeds))
    # the pairs, once per (student steps, seed), before any worker starts (they would race to generate the same cache)
    generation = time.time()
    for name, steps in STUDENTS.items():
        for seed in seeds:
            gmm.distil(folder, config(steps, max(WEIGHTS)), seed=seed, steps=0, n_samples=16)
    generation = time.time() - generation
    log(f"teacher ODE pairs ready ({generation:.1f} s)")

    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    teacher_rows = [metrics(gmm.teacher_samples(folder, 50, s)) for s in seeds]
    for m in teacher_rows:
        m["mapping_rmse"] = 0.0
    results = {
        "command": "python -m benchmarks.gmm_regression " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"optimizer_steps": args.steps, "seeds": args.seeds, "student_lr": STUDENT_LR, "case_a": CASE_A,
                     "pairs": PAIRS, "pair_generation_seconds": generation, "mixture": gmm.RING,
                     "samples_per_run": gmm.N_SAMPLES},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {args.jobs} jobs",
        "partial": True,
        "rows": [{"student": "teacher Euler 50", "weight": None, "metrics": gmm.summarise(teacher_rows)}],
    }
    write(args.out, results)

    tasks = [(name, steps, w, s, str(folder), args.steps, 1) for name, steps in STUDENTS.items() for w in WEIGHTS
             for s in seeds]
    pending: dict[tuple, list] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, weight, seed, seconds, m in pool.map(_run, tasks):
            log(f"{name}, weight {weight:g}, seed {seed}: {seconds:.0f} s, precision {m['precision']:.3f}, energy "
                f"{m['energy_distance']:.2e}, recall {m['recall']:.2f}, mode TV {m['mode_tv']:.3f}, mapping RMSE "
                f"{m['mapping_rmse']:.3f}")
            done = pending.setdefault((name, weight), [])
            done.append((seconds, m))
            if len(done) < args.seeds:
                continue
            results["rows"].append({"student": name, "weight": weight, "dmd_config": config(STUDENTS[name], weight),
                                    "seconds_per_run": sum(s for s, _ in done) / len(done),
                                    "metrics": gmm.summarise([m for _, m in done])})
            write(args.out, results)
    results["partial"] = False
    results["seconds"] = time.time() - start
    write(args.out, results)
    log(f"done in {results['seconds']:.0f} s: {args.out / 'regression_ablation.md'}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
