"""Case A's DMD students on other Gaussian mixtures than the ring (issue 15, item 4).

    python -m benchmarks.gmm_mixtures --seeds 1 --steps 2000      # grid25 and uneven3, 3-step and 1-step students

The mixtures are the example family's presets (``gmm_family.PRESETS``), each with the same closed-form teacher as the
ring (``ClosedFormTeacher``, saved with the mixture in ``<cache>/gmm-<name>/teacher``):

- ``grid25``: 25 modes on a 5 × 5 grid (spacing 0.5, spanning [-1, 1]²), std 0.05, uneven weights 1…5 (each mode
  0.013 to 0.067 of the mass): more modes, closer together, sharper, uneven.
- ``uneven3``: 3 modes about 3 from the origin (larger than the unit noise), std 0.3, weights 0.75 / 0.2 / 0.05.

For each mixture the base MLP is fitted by flow matching exactly as for the ring (``gmm.fit_base``, 10 000 steps,
cached per mixture), then the two students of case A are distilled with case A's tuned settings, unchanged
(``quality_shared.py`` ``CASE_A_TUNED``: ``fake_score_lr`` 1e-3, ``generator_update_interval`` 5; student lr 3e-4,
guidance 1, batch 256). Metrics are ``gmm.Metrics`` (precision within 3 std of the nearest mode, recall = modes holding
at least half their share, energy distance against 20 000 exact samples, mode-weight TV), plus the energy distance
over the 50-step teacher's and the modes that fell below half their share (with their weights). Each row is written
to ``benchmarks/results/quality/gmm_mixtures.{json,md}`` as it finishes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from simpletuner_dmd.atomic import write_file

from . import gmm
from .quality_shared import CASE_A_TUNED

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "quality"
STUDENT_LR = 3e-4
STUDENTS = {"DMD 3-step (1000,757,522)": [1000, 757, 522], "DMD 1-step (1000)": [1000]}


def log(message: str) -> None:
    print(f"[gmm_mixtures] {message}", flush=True)


def dmd_config(steps: list[int]) -> dict:
    return {"real_score_guidance_scale": 1.0, **CASE_A_TUNED, "dmd_denoising_steps": steps}


def measure(metrics, mixture, x: torch.Tensor) -> dict:
    """``gmm.Metrics`` plus the modes below half their share (index: weight)."""
    m = metrics(x)
    x = x[torch.isfinite(x).all(1)]
    mu, pi = mixture.mu.float(), mixture.pi.float()
    dist, nearest = torch.cdist(x, mu).min(1)
    share = torch.bincount(nearest[dist < 3 * mixture.std], minlength=mu.shape[0]).float() / x.shape[0]
    m["modes_covered"] = int((share >= 0.5 * pi).sum())
    m["missed"] = {int(k): round(float(pi[k]), 3) for k in torch.nonzero(share < 0.5 * pi).flatten()}
    return m


def _pm(values: list[float], sci: bool = False, digits: int = 3) -> str:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    fmt = "{:.2e}" if sci else f"{{:.{digits}f}}"
    return fmt.format(mean) + (f" ± {fmt.format(sd)}" if len(values) > 1 else "")


def _missed(missed: dict) -> str:
    """The modes below half their share, at most 5 named (the lightest first)."""
    if not missed:
        return "none"
    items = sorted(missed.items(), key=lambda kv: kv[1])
    named = ", ".join(f"{k} ({w})" for k, w in items[:5])
    return f"{len(items)}: {named}" + (", …" if len(items) > 5 else "")


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# Case A's DMD defaults on other mixtures", "",
             f"`{results['command']}` — {s['optimizer_steps']} optimizer steps, {s['seeds']} seed(s) (mean ± sd when "
             f"more than one), batch 256, student lr {STUDENT_LR}, case A's tuned settings ({s['dmd']}); "
             f"{s['samples_per_run']:,} samples per run against {s['reference_samples']:,} exact ones; base MLP fitted "
             f"{s['fit_steps']} flow-matching steps per mixture. {results.get('machine', '')}."
             + (" **Partial: rows still running.**" if results.get("partial") else ""), ""]
    for name, mix in results["mixtures"].items():
        lines += [f"**{name}**: {mix['description']} (fit: {mix.get('fit_seconds', 0):.0f} s).", "",
                  "| row | precision ↑ | recall ↑ (modes covered) | energy distance ↓ | ED / teacher-50 | mode TV ↓ | "
                  "modes below half their share (weight) | s / run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ed50 = None
        for row_name, row in mix["rows"].items():
            runs = row["runs"]
            ed = [r["energy_distance"] for r in runs]
            if row_name == "teacher Euler 50":
                ed50 = sum(ed) / len(ed)
            ratio = f"{sum(ed) / len(ed) / ed50:.1f}×" if ed50 else "—"
            covered = "/".join(str(r["modes_covered"]) for r in runs) + f" of {mix['modes']}"
            missed = "; ".join(_missed(r["missed"]) for r in runs)
            seconds = f"{row['seconds_per_run']:.0f}" if "seconds_per_run" in row else "—"
            lines.append(f"| {row_name} | {_pm([r['precision'] for r in runs])} | "
                         f"{_pm([r['recall'] for r in runs], digits=2)} ({covered}) | {_pm(ed, sci=True)} | {ratio} | "
                         f"{_pm([r['mode_tv'] for r in runs])} | {missed} | {seconds} |")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "gmm_mixtures.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    write_file(out / "gmm_mixtures.md", lambda tmp: Path(tmp).write_text(markdown(results)))


def plot(path: Path, samples: dict, mixtures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    cols = max(len(v) for v in samples.values())
    fig, axes = plt.subplots(len(names), cols, figsize=(3.2 * cols, 3.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        mu = mixtures[name].mu.numpy()
        lo, hi = mu.min() - 4 * mixtures[name].std - 0.3, mu.max() + 4 * mixtures[name].std + 0.3
        for c, (row, x) in enumerate(samples[name].items()):
            ax = axes[r][c]
            x = x[:4000].numpy()
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
            ax.scatter(mu[:, 0], mu[:, 1], s=10, c="red", marker="x")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal")
            ax.set_title(f"{name}: {row}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DESCRIPTIONS = {
    "grid25": "25 modes on a 5 × 5 grid, spacing 0.5, std 0.05, weights 1…5 (0.013–0.067)",
    "uneven3": "3 modes at (−3, −1.5), (3, −1.5), (0, 3), std 0.3, weights 0.75 / 0.2 / 0.05",
}


BASE_ROW = "base MLP Euler 50 (where student and fake score start)"


def base_runs(folder: Path, metrics, mixture, seeds: int) -> list[dict]:
    """The fitted base MLP's own 50-step Euler samples: the fake score starts from it, so its error is a floor under
    the fake score's."""
    family, _ = gmm.family_and_mixture()
    base = family.load_network(folder / "base")
    runs = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(99_000 + seed)
        noise = torch.randn(gmm.N_SAMPLES, 2, 1, 1, 1, generator=g)
        x = family.euler_sampler(base, steps=50)(noise, None, None, 1.0, g).reshape(-1, 2).float()
        runs.append(measure(metrics, mixture, x))
    return runs


def add_base_rows(out: Path, cache: Path) -> None:
    """Add the base MLP's row to a stored ``gmm_mixtures.json`` (for results made before the row existed)."""
    results = json.loads((out / "gmm_mixtures.json").read_text())
    for name, mix in results["mixtures"].items():
        _, mixture = gmm.family_and_mixture(name)
        runs = base_runs(cache / f"gmm-{name}", gmm.Metrics(mixture), mixture, results["settings"]["seeds"])
        rows = list(mix["rows"].items())
        at = [k for k, _ in rows].index("teacher Euler 1") + 1
        mix["rows"] = dict(rows[:at] + [(BASE_ROW, {"runs": runs})] + [r for r in rows[at:] if r[0] != BASE_ROW])
        log(f"{name}: base MLP Euler 50: precision {runs[0]['precision']:.3f}, modes {runs[0]['modes_covered']}")
    write(out, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gmm_mixtures", description=__doc__.splitlines()[0])
    parser.add_argument("--mixtures", default="grid25,uneven3")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--fit-steps", type=int, default=10_000)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--add-base-rows", action="store_true", help="only: add the base MLP's row to the stored "
                        "gmm_mixtures.json / .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.add_base_rows:
        add_base_rows(args.out, args.cache)
        return 0
    names = [n.strip() for n in args.mixtures.split(",") if n.strip()]
    for n in names:
        if n not in gmm.MIXTURES:
            parser.error(f"--mixtures: {n!r} is not one of {', '.join(gmm.MIXTURES)}")
    start = time.time()
    results = {
        "command": "python -m benchmarks.gmm_mixtures " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread, one run at a time",
        "settings": {"optimizer_steps": args.steps, "seeds": args.seeds, "fit_steps": args.fit_steps,
                     "dmd": dmd_config([1000]) | {"dmd_denoising_steps": "per row"}, "student_lr": STUDENT_LR,
                     "samples_per_run": gmm.N_SAMPLES, "reference_samples": gmm.N_REFERENCE},
        "partial": True, "mixtures": {}}
    samples: dict = {}
    objects: dict = {}
    for name in names:
        fit = time.time()
        folder = gmm.fit_base(args.cache / f"gmm-{name}", steps=args.fit_steps, log=log, mixture=name)
        fit = time.time() - fit
        _, mixture = gmm.family_and_mixture(name)
        objects[name] = mixture
        metrics = gmm.Metrics(mixture)
        mix = results["mixtures"][name] = {"description": DESCRIPTIONS.get(name, name), "modes": len(mixture.means),
                                           "mixture": mixture.to_json(), "fit_seconds": fit, "rows": {}}
        samples[name] = {}
        mix["rows"]["exact samples"] = {"runs": [measure(metrics, mixture, mixture.sample(
            gmm.N_SAMPLES, torch.Generator().manual_seed(500 + s))) for s in range(args.seeds)]}
        for n in (50, 3, 1):
            xs = [gmm.teacher_samples(folder, n, s) for s in range(args.seeds)]
            mix["rows"][f"teacher Euler {n}"] = {"runs": [measure(metrics, mixture, x) for x in xs]}
            samples[name][f"teacher Euler {n}"] = xs[0]
        mix["rows"][BASE_ROW] = {"runs": base_runs(folder, metrics, mixture, args.seeds)}
        write(args.out, results)
        log(f"{name}: teacher rows done")
        for row, steps in STUDENTS.items():
            runs, seconds = [], []
            for seed in range(args.seeds):
                r = gmm.distil(folder, dmd_config(steps), seed=seed, steps=args.steps, lr=STUDENT_LR, mixture=name)
                m = measure(metrics, mixture, r.samples)
                runs.append(m)
                seconds.append(r.seconds)
                log(f"{name}, {row}, seed {seed}: {r.seconds:.0f} s, precision {m['precision']:.3f}, recall "
                    f"{m['recall']:.2f}, ED {m['energy_distance']:.2e}, TV {m['mode_tv']:.3f}, missed {m['missed']}")
                if seed == 0:
                    samples[name][row] = r.samples
            mix["rows"][row] = {"runs": runs, "dmd_config": dmd_config(steps),
                                "seconds_per_run": sum(seconds) / len(seconds)}
            write(args.out, results)
    results["partial"] = False
    results["seconds"] = time.time() - start
    write(args.out, results)
    if not args.no_plots:
        try:
            plot(args.out / "gmm_mixtures.png", samples, objects)
        except Exception as exc:
            print(f"error: plot failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    log(f"done in {results['seconds']:.0f} s")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
