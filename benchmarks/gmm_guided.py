"""Case A with guidance (issue 15, item 3): a conditional mixture whose guided teacher is exact.

    python -m benchmarks.gmm_guided --jobs 2        # 2 students × 4 rows × 3 seeds, 2000 steps each

The mixture is the example family's ``ring2c`` preset: the ring's 8 modes (radius 1, std 0.1) in two classes, even and
odd modes interleaved. The prompt ``"class K"`` restricts the mixture to class K's modes; the negative prompt ``""`` is
the whole mixture. Both conditional flows are exact (``gmm_family.mixture``), so the teacher's guided flow
``u + s·(c − u)`` is exact at every guidance ``s``; what the guided teacher's distribution is, is defined by its
50-step Euler sampler at that guidance (the issue's reference), drawn with the classes in turn.

The base MLP (student and fake score start from it) is conditional (a one-hot of the label joins its input), fitted by
flow matching with the label dropped to unconditional 20% of the time (``gmm.fit_base``, cached in
``<cache>/gmm-ring2c``). The students are case A's tuned DMD rows (``benchmarks/quality_shared.py`` ``CASE_A_TUNED``:
``fake_score_lr`` 1e-3, ``generator_update_interval`` 5; student lr 3e-4, batch 256), each batch with random class
prompts, at ``real_score_guidance_scale`` 1 and 3 (the seed's default), and at 3 with the guidance limited in t:

- ``real_score_guidance_interval`` ``[0, 500]``: the teacher's CFG only at t ≤ 500 (Kynkäänniemi et al. 2024 limit
  guidance to the middle of the noise levels; here the upper end is what matters), cond only above;
- ``max_timestep_ratio`` 0.5: the DMD gradient and the critic only at t ≤ 500.

Metrics, on 10 000 student samples (the classes in turn, guidance 1 at sampling: the guidance is distilled) against
20 000 samples of the guided teacher's 50-step sampler at the row's guidance: the energy distance (U-statistic), class
by class and averaged; the precision (within 3 std of a mode of the sample's own class); the class accuracy (nearest
mode is of the sample's class); the mean radius ``|x|`` (guidance pushes mass outwards: a saturation gauge). The
target: at each student step count, ED at guidance 3 ≤ 2× ED at guidance 1 (each against its own teacher).
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
from .quality_shared import CASE_A_TUNED, map_in_order

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "quality"
MIXTURE = "ring2c"
STUDENT_LR = 3e-4
STUDENTS = {"3-step (1000,757,522)": [1000, 757, 522], "1-step (1000)": [1000]}
# row label → (guidance, extra distillation_config)
VARIANTS = {
    "guidance 1": (1.0, {}),
    "guidance 3": (3.0, {}),
    "guidance 3, real_score_guidance_interval [0, 500]": (3.0, {"real_score_guidance_interval": [0.0, 500.0]}),
    "guidance 3, max_timestep_ratio 0.5": (3.0, {"max_timestep_ratio": 0.5}),
}
# DMD v1's regression term on the guided teacher's ODE pairs (both classes' prompts; case A's pair settings), run on
# their own: python -m benchmarks.gmm_guided --variants "guidance 1,regression" --name gmm_guided_regression, and
# like for like (the guidance-1 row with the same term): --variants "regression_loss_weight 16"
REGRESSION = {"regression_prompts": ["class 0", "class 1"], "regression_num_pairs": 1024,
              "regression_teacher_steps": 50, "regression_latent_shape": [2, 1, 1, 1]}
DEFAULT_VARIANTS = tuple(VARIANTS)  # what a run without --variants measures
VARIANTS.update({f"guidance 3, regression_loss_weight {w:g}": (3.0, {"regression_loss_weight": w, **REGRESSION})
                 for w in (4.0, 16.0)})
VARIANTS["guidance 1, regression_loss_weight 16"] = (1.0, {"regression_loss_weight": 16.0, **REGRESSION})
GUIDANCES = (1.0, 3.0)
REFERENCE_SEED = 77_000  # the guided teacher's reference draw (20 000 samples); rows use 99 000 + seed


def log(message: str) -> None:
    print(f"[gmm_guided] {message}", flush=True)


def dmd_config(steps: list[int], guidance: float, extra: dict) -> dict:
    return {**CASE_A_TUNED, "real_score_guidance_scale": guidance, "dmd_denoising_steps": steps, **extra}


class GuidedMetrics:
    """Energy distance per class against a reference draw of the guided teacher, precision, class accuracy, radius."""

    def __init__(self, mixture, reference: torch.Tensor):
        self.mixture, self.gmm = mixture, gmm
        self.labels = gmm.class_labels(mixture, reference.shape[0], balanced=True)
        self.reference = {c: reference[self.labels == c] for c in range(mixture.num_classes)}
        self.ref_self = {c: gmm._mean_cdist(r, r, same=True) for c, r in self.reference.items()}
        self.mode_class = torch.tensor(mixture.classes)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        gmm = self.gmm
        labels = gmm.class_labels(self.mixture, x.shape[0], balanced=True)
        finite = torch.isfinite(x).all(1)
        ed = []
        for c, ref in self.reference.items():
            xc = x[(labels == c) & finite]
            ed.append(2 * gmm._mean_cdist(xc, ref, same=False) - gmm._mean_cdist(xc, xc, same=True)
                      - self.ref_self[c])
        x, labels = x[finite], labels[finite]
        dist = torch.cdist(x, self.mixture.mu.float())  # (N, K)
        own = self.mode_class[None] == labels[:, None]
        nearest_own = dist.masked_fill(~own, float("inf")).min(1).values
        return {"energy_distance": sum(ed) / len(ed),
                "precision": float((nearest_own < 3 * self.mixture.std).float().mean()),
                "class_accuracy": float((self.mode_class[dist.argmin(1)] == labels).float().mean()),
                "radius": float(x.norm(dim=1).mean()),
                "finite": float(finite.float().mean())}


_STATE: dict = {}


def _metrics(folder: Path, guidance: float) -> GuidedMetrics:
    """One per (process, guidance): the reference draw of the guided teacher's 50-step sampler."""
    if guidance not in _STATE:
        _, mixture = gmm.family_and_mixture(MIXTURE)
        reference = gmm.teacher_samples(folder, 50, 0, gmm.N_REFERENCE, guidance=guidance, mixture=MIXTURE,
                                        seed_offset=REFERENCE_SEED)
        _STATE[guidance] = GuidedMetrics(mixture, reference)
    return _STATE[guidance]


def _run(task: tuple) -> tuple:
    name, variant, steps, seed, folder, n_steps = task
    torch.set_num_threads(1)
    guidance, extra = VARIANTS[variant]
    r = gmm.distil(folder, dmd_config(steps, guidance, extra), seed=seed, steps=n_steps, lr=STUDENT_LR,
                   mixture=MIXTURE)
    return name, seed, r.seconds, _metrics(folder, guidance)(r.samples), r.samples


def _pm(values: list[float], sci: bool = False, digits: int = 3) -> str:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    fmt = "{:.2e}" if sci else f"{{:.{digits}f}}"
    return fmt.format(mean) + (f" ± {fmt.format(sd)}" if len(values) > 1 else "")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def targets(rows: dict) -> dict:
    """Per student: ED at guidance 3 (each guidance-3 row) over ED at guidance 1 — the same recipe's guidance-1 row
    when there is one (a regression row against the guidance-1 row with the same weight), else plain guidance 1; met
    when ≤ 2."""
    out = {}
    for student in STUDENTS:
        for variant, (guidance, extra) in VARIANTS.items():
            row = rows.get(f"DMD {student}, {variant}")
            if guidance == 1.0 or not row:
                continue
            weight = extra.get("regression_loss_weight")
            same = f"DMD {student}, guidance 1, regression_loss_weight {weight:g}" if weight else None
            base = same if same in rows else f"DMD {student}, guidance 1"
            if base not in rows:
                continue
            ed1 = _mean([r["energy_distance"] for r in rows[base]["runs"]])
            ratio = _mean([r["energy_distance"] for r in row["runs"]]) / ed1
            out[f"DMD {student}, {variant}"] = {"ed_over_guidance_1": ratio, "against": base,
                                                 "met (<= 2x)": ratio <= 2.0}
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# Case A with guidance: a conditional mixture, exact guided teacher", "",
             f"`{results['command']}` — {s['optimizer_steps']} optimizer steps, {s['seeds']} seed(s) (mean ± sd), "
             f"batch 256, student lr {STUDENT_LR}, case A's tuned settings; {s['samples_per_run']:,} samples per run "
             f"(classes in turn) against {s['reference_samples']:,} samples of the guided teacher's 50-step sampler at "
             f"the row's guidance. {results.get('machine', '')}"
             + (f"; {results['seconds']:.0f} s." if "seconds" in results else ".")
             + (" **Partial: rows still running.**" if results.get("partial") else ""), "",
             "| row | vs teacher-50 at guidance | energy distance ↓ | precision ↑ | class accuracy ↑ | mean radius "
             "| s / run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in results["rows"].items():
        runs = row["runs"]
        seconds = f"{row['seconds_per_run']:.0f}" if "seconds_per_run" in row else "—"
        lines.append(f"| {name} | {row['guidance']:g} | {_pm([r['energy_distance'] for r in runs], sci=True)} | "
                     f"{_pm([r['precision'] for r in runs])} | {_pm([r['class_accuracy'] for r in runs])} | "
                     f"{_pm([r['radius'] for r in runs])} | {seconds} |")
    t = targets(results["rows"])
    if t:
        lines += ["", "Target: ED at guidance 3 ≤ 2× the same student's ED at guidance 1.", "",
                  "| student row | against | ED / ED at guidance 1 | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {v['against'].split(', ', 1)[1]} | {v['ed_over_guidance_1']:.2f}× | "
                  f"{'yes' if v['met (<= 2x)'] else '**no**'} |" for name, v in t.items()]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict, name: str) -> None:
    results["targets"] = targets(results["rows"])
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    write_file(out / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown(results)))


def plot(path: Path, samples: dict, mixture) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.2 * ((len(names) + 3) // 4)))
    mu = mixture.mu.float()
    colours = torch.tensor(mixture.classes)
    for ax, name in zip(axes.flat, names):
        x = samples[name][:4000]
        labels = torch.arange(x.shape[0]) % mixture.num_classes
        ax.scatter(x[:, 0], x[:, 1], s=1, c=labels, cmap="coolwarm", alpha=0.4)
        ax.scatter(mu[:, 0], mu[:, 1], c=colours, cmap="coolwarm", marker="x", s=30)
        ax.set_xlim(-2, 2), ax.set_ylim(-2, 2), ax.set_aspect("equal")
        ax.set_title(name, fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gmm_guided", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per student")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs in this many processes (one thread each)")
    parser.add_argument("--students", default="3,1", help="3, 1 or 3,1")
    parser.add_argument("--variants", default=None, help="comma-separated parts of variant names (default: all but "
                                                           "the regression rows)")
    parser.add_argument("--fit-steps", type=int, default=10_000)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--name", default="gmm_guided", help="output file stem in --out")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    students = {k: v for k, v in STUDENTS.items() if k.split("-")[0] in args.students.split(",")}
    variants = [v for v in VARIANTS if any(p.strip() in v for p in args.variants.split(","))] if args.variants else \
        list(DEFAULT_VARIANTS)
    if not students or not variants:
        parser.error("--students / --variants select nothing")
    start = time.time()
    folder = gmm.fit_base(args.cache / f"gmm-{MIXTURE}", steps=args.fit_steps, log=log, mixture=MIXTURE)
    _, mixture = gmm.family_and_mixture(MIXTURE)
    results = {
        "command": "python -m benchmarks.gmm_guided " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread per run, {args.jobs} job(s)",
        "settings": {"mixture": mixture.to_json(), "optimizer_steps": args.steps, "seeds": args.seeds,
                     "fit_steps": args.fit_steps, "student_lr": STUDENT_LR, "samples_per_run": gmm.N_SAMPLES,
                     "reference_samples": gmm.N_REFERENCE},
        "partial": True, "rows": {}}
    samples: dict = {}
    for guidance in GUIDANCES:  # the teacher's own rows: another draw of the same sampler, and fewer steps
        metrics = _metrics(folder, guidance)
        for n in (50, 3, 1):
            xs = [gmm.teacher_samples(folder, n, s, guidance=guidance, mixture=MIXTURE) for s in range(args.seeds)]
            name = f"teacher Euler {n}, guidance {guidance:g}"
            results["rows"][name] = {"guidance": guidance, "runs": [metrics(x) for x in xs]}
            samples[name] = xs[0]
    write(args.out, results, args.name)
    log(f"teacher rows done ({time.time() - start:.0f} s)")
    tasks = [(f"DMD {student}, {variant}", variant, steps, seed, folder, args.steps)
             for student, steps in students.items() for variant in variants for seed in range(args.seeds)]
    pending: dict[str, list] = {}
    for name, seed, seconds, m, x in map_in_order(_run, tasks, args.jobs):  # in order, in --jobs processes
        log(f"{name}, seed {seed}: {seconds:.0f} s, ED {m['energy_distance']:.2e}, precision {m['precision']:.3f}, "
            f"accuracy {m['class_accuracy']:.3f}, radius {m['radius']:.3f}")
        pending.setdefault(name, []).append((seconds, m))
        if seed == 0:
            samples[name] = x
        if len(pending[name]) == args.seeds:
            variant = name.split(", ", 1)[1]
            guidance, extra = VARIANTS[variant]
            steps = students[name[len("DMD "):].split(", ")[0]]
            results["rows"][name] = {
                "guidance": guidance, "dmd_config": dmd_config(steps, guidance, extra),
                "runs": [m for _, m in pending[name]],
                "seconds_per_run": sum(s for s, _ in pending[name]) / args.seeds}
            write(args.out, results, args.name)
    results["partial"] = False
    results["seconds"] = time.time() - start
    write(args.out, results, args.name)
    if not args.no_plots:
        try:
            plot(args.out / f"{args.name}.png", samples, mixture)
        except Exception as exc:  # the results are written
            print(f"error: plot failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    log(f"done in {results['seconds']:.0f} s")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
