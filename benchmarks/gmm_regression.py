"""Case A ablation of DMD v1's regression term (``regression_loss_weight``) on the Gaussian mixture.

    python -m benchmarks.gmm_regression --jobs 2          # 2 students × 3 weights × 3 seeds, 2000 steps each
    python -m benchmarks.gmm_regression --seeds 3 --steps 4000 --variants "reg 16" --name regression_levers_reg16
    python -m benchmarks.gmm_regression --bridge-floor    # what samples on the bridges cost the metrics
    python -m benchmarks.gmm_regression --diagnose "reg 16" --steps 4000   # where a student's ED goes
    python -m benchmarks.gmm_regression --ceiling         # the 1-step map's ceiling: plain regression, no DMD
    python -m benchmarks.gmm_regression --seed-list 0 --pairs-seed 1 --eval-draws 8 --steps 16000 --students 3 \
        --variants "reg 16 + student lr 1e-3 cosine" --name regression_seed0_pairs1   # one seed's student, dissected
    python -m benchmarks.gmm_regression --pair-balance --seed-list 0,1,2   # the mode balance of each seed's pairs
    python -m benchmarks.gmm_regression --shape-cost --eval-draws 32      # the ED cost of bridge mass, narrow modes

``--variants`` runs the levers of ``VARIANTS`` (the weight, the timestep window and shift, the critic's lr) instead
of the weights 0 / 0.25 / 1, into ``regression_levers.{json,md}`` (or ``--name``), with the precision halfway too.

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

What a seed sets (``gmm.distil``): the training's draws and the evaluation's noise ``99 000 + seed`` (which the 3-step
sampler also draws its fresh noise between steps from), and, unless ``--pairs-seed`` names another, the teacher pairs'
noises and stream order; the student and the critic both start from the same base fit whatever the seed, and the
reference samples of the metrics are fixed. Per run, every row also records the sample's *shape*
(``sample_shape``: the off-mode share, the on-mode spread and radius, the mode weights) and, with ``--eval-draws N``,
the final student's ED on N independent evaluation draws beside the 50-step teacher's on the same noises
(``EVAL_DRAW_STRIDE``); the ``.md`` then adds a table per seed.
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
from simpletuner_dmd.flow import flow_to_x0

from . import gmm

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "quality"

# Case A's tuned DMD rows (benchmarks/quality.py CASE_A_TUNED, lr 3e-4), restated so this script stands alone.
CASE_A = {"real_score_guidance_scale": 1.0, "fake_score_lr": 1e-3, "generator_update_interval": 5}
STUDENT_LR = 3e-4
STUDENTS = {"3-step (1000,757,522)": [1000, 757, 522], "1-step (1000)": [1000]}
WEIGHTS = (0.0, 0.25, 1.0)
PAIRS = {"regression_prompts": [""], "regression_num_pairs": 1024, "regression_teacher_steps": 50,
         "regression_latent_shape": [2, 1, 1, 1]}


def config(steps: list[int], weight: float, extra: dict | None = None) -> dict:
    cfg = {**CASE_A, "dmd_denoising_steps": steps, "regression_loss_weight": weight, **(extra or {})}
    return {**PAIRS, **cfg} if weight > 0 else cfg


# Issue 15 item 2: the levers tried on top of the regression term (``--variants``; written to
# ``regression_levers*.{json,md}``). DMD draws one timestep per sample for its gradient and the critic (fake score)
# draws its own from the same distribution, so the window and the shift set how both weigh the noise levels.
VARIANTS = {
    "reg 1": (1.0, {}),
    "reg 4": (4.0, {}),
    "reg 16": (16.0, {}),
    "reg 1 + max_timestep_ratio 0.5": (1.0, {"max_timestep_ratio": 0.5}),  # DMD and critic only at σ ≤ 0.5
    "reg 1 + max_timestep_ratio 0.3": (1.0, {"max_timestep_ratio": 0.3}),
    "reg 1 + timestep_shift 3": (1.0, {"timestep_shift": 3.0}),  # mass toward high σ
    "reg 1 + fake_score_lr 3e-3": (1.0, {"fake_score_lr": 3e-3}),  # a faster critic
    # what the 1-step map's ceiling (``--ceiling``) points to: the student's lr and schedule, and more pairs
    "reg 16 + student lr 1e-3 cosine": (16.0, {}, {"lr": 1e-3, "lr_schedule": "cosine"}),
    "student lr 1e-3 cosine": (0.0, {}, {"lr": 1e-3, "lr_schedule": "cosine"}),  # the schedule without the term
    "reg 16 + 16384 pairs + student lr 1e-3 cosine": (16.0, {"regression_num_pairs": 16_384},
                                                      {"lr": 1e-3, "lr_schedule": "cosine"}),
}


def variant_settings(name: str) -> tuple[float, dict, dict]:
    """``VARIANTS[name]`` as (regression weight, DMD keys, student optimizer keys: ``lr``, ``lr_schedule``)."""
    weight, extra, *host = VARIANTS[name]
    return weight, extra, (host[0] if host else {})


def student_optimizer(host: dict) -> dict:
    """``gmm.distil``'s student optimizer keywords: a variant's ``host`` over case A's (lr 3e-4, constant)."""
    return {"lr": STUDENT_LR, "lr_schedule": "constant", **host}


EVAL_DRAW_STRIDE = 1_000  # evaluation draw k ≥ 1 of seed s samples from the noise seed 99 000 + s + 1000·k


def eval_draw_seeds(seed: int, draws: int, common: bool = False) -> list[int]:
    """The noise seeds (offsets from 99 000) of ``seed``'s ``draws`` evaluation draws: its own first, then ones no
    other seed below ``EVAL_DRAW_STRIDE`` evaluates with; ``common``: then seed 0's (``1000·k``), the same for every
    seed, so two students' draws are paired (a 3-step student's samples hang on its noises, the initial and the fresh
    ones between steps, so two similar students on the same noises share most of the draw's luck)."""
    return [seed] + [(0 if common else seed) + EVAL_DRAW_STRIDE * k for k in range(1, draws)]


def sample_shape(x: torch.Tensor, mixture) -> dict:
    """Where a sample's mass lies, the parts of it the metrics see: the off-mode share (farther than 3 std from every
    mode: the bridges, ``1 − precision``), the on-mode spread (RMS distance to the nearest mode) and mean radius
    (distance from the ring's centre) of the rest, and the mode weights of the on-mode samples with their largest
    departure from the mixture's weights and their total variation (``mode_tv``: of the on-mode samples only, where
    ``gmm.Metrics``' mode TV assigns every sample to its nearest mode)."""
    mu, pi, std = mixture.mu.float(), mixture.pi.float(), mixture.std
    d, k = torch.cdist(x, mu).min(1)
    on = d < 3 * std
    weights = torch.bincount(k[on], minlength=mu.shape[0]).float() / on.sum().clamp(min=1)
    return {"off_mode_share": float((~on).float().mean()), "on_mode_spread": float(d[on].pow(2).mean().sqrt()),
            "on_mode_radius": float(x[on].norm(dim=1).mean()), "mode_weights": [float(w) for w in weights],
            "largest_mode_weight_error": float((weights - pi).abs().max()),
            "mode_tv": float(0.5 * (weights - pi).abs().sum())}


def log(message: str) -> None:
    print(f"[gmm_regression] {message}", flush=True)


_STATE: dict = {}  # per process: the metrics (their reference samples) and the teachers' samples


def _run(task: tuple) -> tuple:
    name, steps, weight, seed, folder, n_steps, threads, variant, options = (*task, None, None)[:9]
    options = options or {}
    extra, host = None, {}
    if variant is not None:  # ``weight`` is the variant's name
        weight, extra, host = variant_settings(variant)
    torch.set_num_threads(threads)
    if "metrics" not in _STATE:
        _STATE["metrics"] = gmm.Metrics(gmm.family_and_mixture()[1])
    half = (n_steps // 2,) if extra is not None else ()  # variants: precision halfway too (is it still rising?)
    draw_seeds = eval_draw_seeds(seed, options.get("eval_draws", 1), options.get("common_draws", False))
    pairs_seed = options.get("pairs_seed")
    result = gmm.distil(Path(folder), config(steps, weight, extra), seed=seed, steps=n_steps, snapshot_steps=half,
                        pairs_seed=pairs_seed, eval_seeds=tuple(draw_seeds[1:]),
                        **student_optimizer(host))
    teacher = gmm.teacher_samples(Path(folder), 50, seed)  # the same noises as the student's samples
    metrics = _STATE["metrics"](result.samples)
    metrics["mapping_rmse"] = float(((result.samples - teacher) ** 2).sum(1).mean().sqrt())
    if half and half[0] in result.snapshots:
        metrics["precision_halfway"] = _STATE["metrics"](result.snapshots[half[0]])["precision"]
    mixture = _STATE["metrics"].mixture
    detail = {"seed": seed, "pairs_seed": seed if pairs_seed is None else pairs_seed,
              "sample_shape": sample_shape(result.samples, mixture)}
    if len(draw_seeds) > 1:  # the same student on independent evaluation draws, the teacher-50 on the same noises
        samples = [result.samples] + [result.draws[s] for s in draw_seeds[1:]]
        detail.update(draw_seeds=draw_seeds, draws=[_STATE["metrics"](x) for x in samples],
                      draw_shapes=[sample_shape(x, mixture) for x in samples],
                      teacher_50_draws=[_STATE["metrics"](teacher if s == seed else
                                                          gmm.teacher_samples(Path(folder), 50, s))
                                        for s in draw_seeds])
    return name, variant if variant is not None else weight, seed, result.seconds, metrics, detail


def _pm(stat: dict, digits: int = 3, sci: bool = False) -> str:
    fmt = f"{{:.{digits - 1}e}}" if sci else f"{{:.{digits}f}}"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['sd'])}"


def markdown(results: dict) -> str:
    s = results["settings"]
    levers = bool(s.get("variants"))
    own_lr = any(len(v) > 2 and v[2] for v in s.get("variants", {}).values())
    own_pairs = any("regression_num_pairs" in v[1] for v in s.get("variants", {}).values())
    lines = [
        "# Case A: levers on top of the regression term (issue 15, item 2)" if levers else
        "# Case A: DMD v1's regression term (`regression_loss_weight`)",
        "",
        f"`{results['command']}` — {s['optimizer_steps']} optimizer steps, {s['seeds']} seeds, batch 256, student lr "
        f"{STUDENT_LR} (constant{', unless the variant sets it' if own_lr else ''}), fake_score_lr 1e-3, "
        "generator_update_interval 5, guidance 1; pairs: "
        f"{PAIRS['regression_num_pairs']} per seed{' unless the variant sets it' if own_pairs else ''}, "
        f"{PAIRS['regression_teacher_steps']} Euler steps of the exact "
        f"teacher (this run spent {s['pair_generation_seconds']:.1f} s making the caches it did not find). Mean ± sd "
        "over the "
        "seeds; mapping RMSE: distance to the 50-step teacher's sample from the same noise."
        + (" **Partial: rows still running.**" if results.get("partial") else ""),
        "",
        "| student | " + ("variant" if levers else "regression_loss_weight") + " | precision ↑ | energy distance ↓ | "
        "recall ↑ | mode TV ↓ | mapping RMSE | s / run |" + (" precision halfway | ED / teacher-50 |" if levers else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if levers else ""),
    ]
    ed50 = results["rows"][0]["metrics"]["energy_distance"]["mean"]  # this run's teacher row (its seeds)
    for row in results["rows"]:
        m = row["metrics"]
        weight = "—" if row["weight"] is None else f"{row['weight']:g}"
        line = (f"| {row['student']} | {row.get('variant', weight)} | {_pm(m['precision'])} | "
                f"{_pm(m['energy_distance'], sci=True)} | {_pm(m['recall'], 2)} | {_pm(m['mode_tv'])} | "
                f"{_pm(m['mapping_rmse'])} | {row.get('seconds_per_run', 0):.0f} |")
        if levers:
            half = _pm(m["precision_halfway"]) if "precision_halfway" in m else "—"
            ratio = m["energy_distance"]["mean"] / ed50
            line += f" {half} | {ratio:.{1 if ratio < 10 else 0}f}× |"
        lines.append(line)
    details = [(row, i, d) for row in results["rows"] for i, d in enumerate(row.get("runs", []))]
    if details:
        lines += ["", "Per seed. *Draw 0*: the seed's own evaluation noise (the row above); *N draws*: mean ± sd of the "
                  "same final student's ED on independent evaluation draws, and the 50-step teacher's on the same "
                  "noises; shape (draw 0): off-mode share (1 − precision), on-mode spread and radius (exact: "
                  "about 0.137 and 1.0), largest mode-weight error (a mode's weight 0.125).", "",
                  "| student | seed | pairs seed | ED draw 0 | ED, N draws | teacher-50, same draws | ratio of the means "
                  "| off-mode | spread | radius | mode TV | largest weight error |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row, i, d in details:
            shape = d["sample_shape"]
            ed0 = row["metrics"]["energy_distance"]["values"][i]
            tv0 = row["metrics"]["mode_tv"]["values"][i]
            if "draws" in d:
                st = gmm.summarise([{"e": m["energy_distance"]} for m in d["draws"]])["e"]
                te = gmm.summarise([{"e": m["energy_distance"]} for m in d["teacher_50_draws"]])["e"]
                draws = (f"{_pm(st, sci=True)} ({len(d['draws'])}) | {_pm(te, sci=True)} | "
                         f"{st['mean'] / te['mean']:.2f}× |")
            else:
                draws = "— | — | — |"
            lines.append(f"| {row['student']} | {d['seed']} | {d['pairs_seed']} | {ed0:.2e} | {draws} "
                         f"{shape['off_mode_share']:.4f} | {shape['on_mode_spread']:.4f} | {shape['on_mode_radius']:.4f}"
                         f" | {tv0:.4f} | {shape['largest_mode_weight_error']:.4f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict, name: str = "regression_ablation") -> None:
    write_file(out / f"{name}.json",
               lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1), encoding="utf-8"))
    write_file(out / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown(results), encoding="utf-8"))


def bridge_floor(fractions=(0.0, 0.01, 0.02, 0.05, 0.1, 0.15), seeds: int = 3) -> list[dict]:
    """What a given share of samples on the *bridges* costs: 10 000 exact ring samples with a fraction ``f`` replaced by
    points uniform on the chords between neighbouring modes (plus the mode's noise), measured by ``gmm.Metrics``
    against the same 20 000 exact samples as the students. Mean over ``seeds``."""
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    mu = mixture.mu.float()
    out = []
    for f in fractions:
        runs = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(700 + seed)
            x = mixture.sample(gmm.N_SAMPLES, g)
            n = int(round(f * gmm.N_SAMPLES))
            if n:
                k = torch.randint(0, mu.shape[0], (n,), generator=g)
                u = torch.rand(n, 1, generator=g)
                x[:n] = (1 - u) * mu[k] + u * mu[(k + 1) % mu.shape[0]] + mixture.std * torch.randn(n, 2, generator=g)
            runs.append(metrics(x))
        out.append({"bridge_fraction": f, "metrics": gmm.summarise(runs)})
    return out


def paired_draws(paths: list[Path]) -> dict:
    """The runs of ``--eval-draws`` result files (``.json``) compared on the evaluation noises they all share: for each
    run (student, seed, pairs seed, steps), its mean ED over those draws and the mean of its per-draw difference to the
    first run's (a paired difference, ± its standard error), with the 50-step teacher's mean on the same draws and the
    correlation of the run's per-draw ED with the first run's and with the teacher's. Runs that share fewer than two
    draws with the first run are left out."""
    runs = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        for row in result["rows"][1:]:
            for d in row.get("runs", []):
                if "draws" in d:
                    runs.append({"file": Path(path).name, "student": row["student"], "seed": d["seed"],
                                 "pairs_seed": d["pairs_seed"], "steps": result["settings"]["optimizer_steps"],
                                 "ed": dict(zip(d["draw_seeds"], (m["energy_distance"] for m in d["draws"]))),
                                 "teacher": dict(zip(d["draw_seeds"],
                                                     (m["energy_distance"] for m in d["teacher_50_draws"])))})
    runs = [r for r in runs if len(set(r["ed"]) & set(runs[0]["ed"])) > 1]  # those drawn on the first run's noises
    shared = sorted(set.intersection(*(set(r["ed"]) for r in runs)))
    first = [runs[0]["ed"][s] for s in shared]
    teacher = [runs[0]["teacher"][s] for s in shared]
    out = {"draw_seeds": shared, "teacher_50": gmm.summarise([{"e": t} for t in teacher])["e"], "runs": []}
    for r in runs:
        x = [r["ed"][s] for s in shared]
        diff = gmm.summarise([{"d": a - b} for a, b in zip(x, first)])["d"]
        out["runs"].append({k: r[k] for k in ("file", "student", "seed", "pairs_seed", "steps")} | {
            "ed": gmm.summarise([{"e": v} for v in x])["e"], "minus_first": diff["mean"],
            "minus_first_se": diff["sd"] / len(x) ** 0.5, "corr_first": _corr(x, first),
            "corr_teacher": _corr(x, teacher)})
    return out


def _corr(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ta, tb = ta - ta.mean(), tb - tb.mean()
    return float((ta * tb).sum() / (ta.norm() * tb.norm()).clamp(min=1e-300))


# ``--shape-cost``: (bridge share, spread scale) of the exact samples; the first is the exact mixture itself.
SHAPE_CASES = {"exact": (0.0, 1.0), "5% on the bridges": (0.05, 1.0), "spread × 0.95": (0.0, 0.95),
               "5% on the bridges, spread × 0.95": (0.05, 0.95)}


def shape_cost(cases: dict | None = None, draws: int = 32, folder: Path | None = None) -> list[dict]:
    """What a sample's shape costs the energy distance, free of the metric's draw noise: for each case of
    ``SHAPE_CASES``, ``draws`` sets of ``gmm.N_SAMPLES`` exact ring samples with each mode's spread scaled and a share
    moved uniformly onto the middle of the chords between neighbouring modes, the part farther than 3 std from both
    (so all of that share is off-mode, as a student's bridge samples are; ``bridge_floor`` spreads its share over the
    whole chord with the modes' noise, where most of it still counts as on-mode). Every
    case uses the same draws (draw ``d``: generator ``31 000 + d``), so their differences are paired. With ``folder``,
    a row for the 50-step teacher on the evaluation noises of seed 0's draws (``eval_draw_seeds``) too."""
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    mu, pi, std = mixture.mu.float(), mixture.pi.float(), mixture.std
    out = []
    for name, (fraction, scale) in (cases or SHAPE_CASES).items():
        runs, shapes = [], []
        for d in range(draws):
            g = torch.Generator().manual_seed(31_000 + d)
            k = torch.multinomial(pi, gmm.N_SAMPLES, replacement=True, generator=g)
            x = mu[k] + scale * std * torch.randn(gmm.N_SAMPLES, 2, generator=g)
            n = int(round(fraction * gmm.N_SAMPLES))
            u = torch.rand(gmm.N_SAMPLES, 1, generator=g)[:n]  # drawn in every case: the draws stay paired
            if n:
                nxt = mu[(k[:n] + 1) % mu.shape[0]]
                end = 3 * std / (nxt - mu[k[:n]]).norm(dim=1, keepdim=True)  # the chord's share within 3 std of a mode
                u = end + (1 - 2 * end) * u
                x[:n] = (1 - u) * mu[k[:n]] + u * nxt
            runs.append(metrics(x))
            shapes.append(sample_shape(x, mixture))
        out.append({"case": name, "bridge_fraction": fraction, "spread_scale": scale, "draws": draws,
                    "metrics": gmm.summarise(runs), "shape": gmm.summarise(
                        [{k: v for k, v in sh.items() if k != "mode_weights"} for sh in shapes])})
        log(f"shape cost {name}: ED {out[-1]['metrics']['energy_distance']['mean']:.2e}")
    if folder is not None:
        xs = [gmm.teacher_samples(folder, 50, s) for s in eval_draw_seeds(0, draws)]
        out.append({"case": "teacher Euler 50 (seed 0's evaluation draws)", "draws": draws,
                    "metrics": gmm.summarise([metrics(x) for x in xs]), "shape": gmm.summarise(
                        [{k: v for k, v in sample_shape(x, mixture).items() if k != "mode_weights"} for x in xs])})
    return out


def diagnose(folder: Path, variant: str, steps: int, seed: int = 0) -> list[dict]:
    """Where a student's energy distance and precision go: for the 1-step and the 3-step student of ``variant``, its
    metrics; the metrics once its off-mode samples (farther than 3 std from every mode) are replaced by as many fresh
    exact samples (the bridges removed, the rest kept); the on-mode spread (RMS distance to the nearest mode of the
    samples within 3 std) against the exact samples'; and the metrics of exact samples drawn with the student's mode
    weights and spread (bridges absent, its mode shape and weights kept)."""
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    mu, std = mixture.mu.float(), mixture.std
    exact = mixture.sample(gmm.N_SAMPLES, torch.Generator().manual_seed(800 + seed))

    def spread(x):
        d, k = torch.cdist(x, mu).min(1)
        on = d < 3 * std
        return float(d[on].pow(2).mean().sqrt()), on, k

    exact_spread, _, _ = spread(exact)
    out = []
    for name, student_steps in STUDENTS.items():
        weight, extra, host = variant_settings(variant)
        x = gmm.distil(folder, config(student_steps, weight, extra), seed=seed, steps=steps,
                       **student_optimizer(host)).samples
        sp, on, k = spread(x)
        fixed = x.clone()
        fill = mixture.sample(int((~on).sum()), torch.Generator().manual_seed(900 + seed))
        fixed[~on] = fill
        # exact samples with the student's mode weights (among on-mode samples) and its on-mode spread
        weights = torch.bincount(k[on], minlength=mu.shape[0]).double() + 1e-9  # no on-mode sample: equal
        g = torch.Generator().manual_seed(1000 + seed)
        idx = torch.multinomial(weights / weights.sum(), gmm.N_SAMPLES, replacement=True, generator=g)
        shaped = (mu[idx] + std * (sp / exact_spread if sp == sp else 1.0) * torch.randn(gmm.N_SAMPLES, 2, generator=g)).float()
        out.append({"student": name, "variant": variant, "steps": steps, "seed": seed,
                    "off_mode_share": float((~on).float().mean()), "on_mode_spread": sp,
                    "exact_on_mode_spread": exact_spread,
                    "as_is": metrics(x), "bridges_replaced_by_exact": metrics(fixed),
                    "exact_with_student_weights_and_spread": metrics(shaped)})
        log(f"diagnose {name}: {out[-1]}")
    return out


def pair_targets(folder: Path, steps: list[int], seed: int, num_pairs: int = 1024) -> torch.Tensor:
    """The teacher's 50-step samples (``x0``) of the pairs seed ``seed`` gives the ``steps`` student, ``(num_pairs, 2)``,
    generated into the run cache if missing (the same call as the runs make)."""
    from simpletuner_dmd.ode_pairs import ODEPairs

    cfg = config(steps, 16.0, {"regression_num_pairs": num_pairs})
    gmm.distil(folder, cfg, seed=seed, steps=0, n_samples=16)
    for manifest in sorted((folder / "cache" / "ode_pairs").glob("*/manifest.json")):
        spec = json.loads(manifest.read_text())["spec"]
        if spec["seed"] == seed and spec["count"] == num_pairs and spec["student_steps"] == list(steps):
            pairs = ODEPairs.open(manifest.parent)
            return torch.cat([pairs.load_shard(i)["x0"].float() for i in range(pairs.num_shards)]).reshape(-1, 2)
    raise FileNotFoundError(f"no pair cache for seed {seed}, {num_pairs} pairs, steps {steps} in {folder}")


def pair_balance(folder: Path, seeds: list[int], steps: list[int], num_pairs: int = 1024,
                 null_draws: int = 200) -> dict:
    """How each seed's teacher pairs sit on the mixture: the shape (``sample_shape``) and mode TV of their targets, and
    where that TV falls among ``null_draws`` sets of ``num_pairs`` exact mixture samples (the multinomial spread a set
    of that size has by chance)."""
    _, mixture = gmm.family_and_mixture()
    rows = [{"seed": seed, **sample_shape(pair_targets(folder, steps, seed, num_pairs), mixture)} for seed in seeds]
    g = torch.Generator().manual_seed(31_003)
    null = [sample_shape(mixture.sample(num_pairs, g), mixture) for _ in range(null_draws)]
    tvs = sorted(n["mode_tv"] for n in null)
    for row in rows:
        row["tv_quantile_among_exact_sets"] = sum(t <= row["mode_tv"] for t in tvs) / len(tvs)
    return {"seeds": rows, "exact_sets": {"draws": null_draws, "mode_tv_median": tvs[len(tvs) // 2],
                                          "mode_tv_p90": tvs[int(0.9 * len(tvs))],
                                          "largest_mode_weight_error_median": sorted(
                                              n["largest_mode_weight_error"] for n in null)[len(null) // 2]}}


POOL = 262_144  # the ceiling's noise → teacher-sample pairs per seed
# The 1-step map's ceiling: (student lr, schedule, optimizer steps). The first is like for like with the DMD students
# (lr 3e-4 constant, 4000 steps); the second gives the MLP all it can take.
CEILING = {"lr 3e-4, constant, 4000 steps": (3e-4, "constant", 4000),
           "lr 1e-3, cosine, 16000 steps": (1e-3, "cosine", 16_000)}


def ceiling(folder: Path, seeds: int = 3, settings: dict | None = None, batch_size: int = 256,
            metrics=None) -> list[dict]:
    """How close the 1-step student's network can come to the teacher at all: the same MLP, started from the same
    base fit, trained by plain regression onto the exact teacher's 50-step Euler map (noise → sample), each batch drawn
    from a pool of ``POOL`` pairs (256 times the DMD students' 1024; no DMD, no critic). Measured like the students
    (``gmm.Metrics`` on the 1-step samples from the students' evaluation noises, ``99 000 + seed``); with the mapping
    RMSE on those noises. ``metrics``: a ``gmm.Metrics`` to reuse (building one samples its reference anew)."""
    family, mixture = gmm.family_and_mixture()
    metrics = metrics or gmm.Metrics(mixture)
    teacher = family.load_network(folder / "teacher").eval()
    ode = family.euler_sampler(teacher, steps=50)
    cond = family.embed_prompts([""] * batch_size)
    out = []
    for name, (lr, schedule, steps) in (settings or CEILING).items():
        runs = []
        for seed in range(seeds):
            start = time.time()
            torch.manual_seed(seed)
            net = family.load_network(folder / "base").requires_grad_(True).train()
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
            g = torch.Generator().manual_seed(20_000 + seed)
            pool = torch.randn(POOL, 2, 1, 1, 1, generator=g)
            with torch.no_grad():
                targets = torch.cat([ode(pool[i:i + 16_384], family.embed_prompts([""] * len(pool[i:i + 16_384])),
                                         None, 1.0, None) for i in range(0, POOL, 16_384)])

            def one_step(noise, c):
                t = torch.full((noise.shape[0],), 1000.0)
                return flow_to_x0(noise, family.predict_flow(net, noise, t, c), t)

            for _ in range(steps):
                pick = torch.randint(0, POOL, (batch_size,), generator=g)
                noise, target = pool[pick], targets[pick]
                loss = torch.mean((one_step(noise, cond) - target) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                if sched is not None:
                    sched.step()
            net.eval()
            # the students' evaluation noises, and the teacher's 50-step sample from each of them
            noise = torch.randn(gmm.N_SAMPLES, 2, 1, 1, 1, generator=torch.Generator().manual_seed(99_000 + seed))
            exact = gmm.teacher_samples(folder, 50, seed, gmm.N_SAMPLES)
            with torch.no_grad():
                x = one_step(noise, family.embed_prompts([""] * gmm.N_SAMPLES)).reshape(-1, 2)
            m = metrics(x)
            m["mapping_rmse"] = float((x - exact).pow(2).sum(1).mean().sqrt())
            runs.append(m)
            log(f"ceiling {name}, seed {seed}: {time.time() - start:.0f} s, precision {m['precision']:.3f}, energy "
                f"{m['energy_distance']:.2e}, mode TV {m['mode_tv']:.3f}, mapping RMSE {m['mapping_rmse']:.3f}")
        out.append({"setting": name, "lr": lr, "schedule": schedule, "steps": steps, "metrics": gmm.summarise(runs)})
    return out


def gmm_module():
    return gmm


def _record(out: Path, name: str, md: list[str], payload: dict) -> None:
    """One analysis's results: ``out/name.json`` (``payload``) and ``out/name.md`` (``md``), the table printed."""
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gmm_regression", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs in this many processes (one thread each)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="the fitted base and the pairs")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (the levers ablation) "
                        "instead of the weights 0 / 0.25 / 1; written to --name (default regression_levers)")
    parser.add_argument("--students", default="3,1", help="3, 1 or 3,1: the 3-step and/or the 1-step student")
    parser.add_argument("--name", default=None, help="output file stem in --out")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds to run (instead of 0 .. --seeds − 1)")
    parser.add_argument("--pairs-seed", type=int, default=None, help="every run uses the teacher pairs (noises and "
                        "stream order) of this seed instead of its own")
    parser.add_argument("--eval-draws", type=int, default=1, help="evaluate each final student on this many "
                        "independent evaluation draws (its own first), beside the 50-step teacher on the same noises")
    parser.add_argument("--bridge-floor", action="store_true", help="only: the metrics of exact samples with a share "
                        "moved onto the bridges between modes (bridge_floor.{json,md} in --out)")
    parser.add_argument("--diagnose", default=None, metavar="VARIANT", help="only: where the ED and precision of "
                        "VARIANT's students go (seed 0, --steps; diagnose.{json,md} in --out)")
    parser.add_argument("--ceiling", action="store_true", help="only: the 1-step map's ceiling, the student's MLP "
                        "regressed onto the teacher's 50-step map without DMD (regression_ceiling.{json,md} in --out)")
    parser.add_argument("--common-draws", action="store_true", help="with --eval-draws: every seed's extra draws use "
                        "seed 0's evaluation noises, so the seeds' students are compared on the same draws")
    parser.add_argument("--paired", default=None, metavar="JSON,...", help="only: compare the --eval-draws runs of "
                        "these result files on the evaluation noises they share (regression_paired.{json,md} in --out, "
                        "or --name)")
    parser.add_argument("--shape-cost", action="store_true", help="only: the ED of exact samples with bridge mass "
                        "and/or narrowed modes (SHAPE_CASES), averaged over --eval-draws paired draws, beside the "
                        "50-step teacher on as many draws (regression_shape_cost.{json,md} in --out, or --name)")
    parser.add_argument("--pair-balance", action="store_true", help="only: the mode balance of each seed's (or "
                        "--seed-list's) 3-step teacher pairs against exact sets of as many samples "
                        "(regression_pair_balance.{json,md} in --out, or --name)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.gmm_regression " + " ".join(argv if argv is not None else sys.argv[1:])
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    torch.set_num_threads(1)  # small nets: one thread (the runs in workers set it too)
    if args.paired:
        result = paired_draws([Path(p) for p in args.paired.split(",")])
        t = result["teacher_50"]
        md = ["# Case A: students compared on the same evaluation draws", "",
              f"`{command}`. Each "
              f"run's ED on the {len(result['draw_seeds'])} evaluation noises all the runs share (noise seeds 99 000 + "
              f"{', '.join(map(str, result['draw_seeds'][:3]))}, …); the 50-step teacher on the same noises: "
              f"{_pm(t, sci=True)} (mean ± sd of one draw). *− first*: the mean per-draw difference to the first "
              "run (paired, ± its standard error); *corr*: the per-draw correlation of the run's ED with the first "
              "run's and with the teacher's.", "",
              "| file | student | steps | seed | pairs seed | ED (mean ± sd of one draw) | / teacher-50 | − first | "
              "corr first | corr teacher |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["runs"]:
            md.append(f"| {r['file']} | {r['student']} | {r['steps']} | {r['seed']} | {r['pairs_seed']} | "
                      f"{_pm(r['ed'], sci=True)} | {r['ed']['mean'] / t['mean']:.2f}× | {r['minus_first']:+.2e} ± "
                      f"{r['minus_first_se']:.1e} | {r['corr_first']:.3f} | {r['corr_teacher']:.2f} |")
        result["command"] = md[2]
        name = args.name or "regression_paired"
        _record(args.out, name, md, result)
        return 0
    if args.shape_cost:
        start = time.time()
        folder = gmm.fit_base(args.cache / "gmm-regression", log=log)
        rows = shape_cost(draws=args.eval_draws, folder=folder)
        exact = rows[0]["metrics"]["energy_distance"]
        md = ["# Case A: what a sample's shape costs the energy distance", "",
              f"`{command}` "
              f"({time.time() - start:.0f} s). {gmm.N_SAMPLES} exact ring samples per draw, each mode's spread scaled "
              "and a share moved uniformly onto the middle of the chords between neighbouring modes (the part "
              f"farther than 3 std from both, so off-mode); {args.eval_draws} draws, the same for every case (paired). ED: mean ± sd of one draw; the "
              "difference to the exact row is paired (mean ± its standard error). Shape: off-mode share, on-mode "
              "spread (mean over the draws).", "",
              "| case | ED (mean ± sd of one draw) | ED − exact (paired, ± s.e.) | precision | off-mode | spread |",
              "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            e = r["metrics"]["energy_distance"]
            diff = gmm.summarise([{"d": a - b} for a, b in zip(e["values"], exact["values"])])["d"]
            md.append(f"| {r['case']} | {_pm(e, sci=True)} | {diff['mean']:+.2e} ± "
                      f"{diff['sd'] / len(e['values']) ** 0.5:.1e} | {r['metrics']['precision']['mean']:.4f} | "
                      f"{r['shape']['off_mode_share']['mean']:.4f} | {r['shape']['on_mode_spread']['mean']:.4f} |")
        name = args.name or "regression_shape_cost"
        _record(args.out, name, md, {"command": md[2], "rows": rows})
        return 0
    if args.pair_balance:
        start = time.time()
        folder = gmm.fit_base(args.cache / "gmm-regression", log=log)
        result = pair_balance(folder, seeds, STUDENTS["3-step (1000,757,522)"], PAIRS["regression_num_pairs"])
        null = result["exact_sets"]
        md = ["# Case A: the mode balance of each seed's teacher pairs", "",
              f"`{command}` "
              f"({time.time() - start:.0f} s). The targets (the exact teacher's 50-step samples) of the "
              f"{PAIRS['regression_num_pairs']} pairs of the 3-step student, per seed: mode TV (the on-mode samples' "
              "mode weights against the mixture's 1/8 each), its quantile among "
              f"{null['draws']} sets of as many exact samples (median TV {null['mode_tv_median']:.4f}, 90th percentile "
              f"{null['mode_tv_p90']:.4f}), the largest mode-weight error (exact sets' median "
              f"{null['largest_mode_weight_error_median']:.4f}), off-mode share, on-mode spread.", "",
              "| seed | mode TV | quantile among exact sets | largest weight error | off-mode | spread | mode weights |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["seeds"]:
            md.append(f"| {r['seed']} | {r['mode_tv']:.4f} | {r['tv_quantile_among_exact_sets']:.2f} | "
                      f"{r['largest_mode_weight_error']:.4f} | {r['off_mode_share']:.4f} | {r['on_mode_spread']:.4f} | "
                      + " ".join(f"{w:.3f}" for w in r["mode_weights"]) + " |")
        name = args.name or "regression_pair_balance"
        result["command"] = command
        _record(args.out, name, md, result)
        return 0
    if args.ceiling:
        start = time.time()
        folder = gmm_module().fit_base(args.cache / "gmm-regression", log=log)
        metrics = gmm.Metrics(gmm.family_and_mixture()[1])
        teacher = gmm.summarise([metrics(gmm.teacher_samples(folder, 50, s)) for s in range(args.seeds)])
        rows = ceiling(folder, args.seeds, metrics=metrics)
        ref = teacher["energy_distance"]["mean"]
        md = ["# Case A: the 1-step map's ceiling", "",
              f"`python -m benchmarks.gmm_regression --ceiling` ({time.time() - start:.0f} s, {args.seeds} seeds). The "
              "1-step student's MLP, started from the base fit, regressed onto the exact teacher's 50-step Euler map "
              "(noise → sample), batches of 256 from 262 144 pairs: no DMD, no critic. 10 000 "
              "samples from the students' evaluation noises; the mapping RMSE is to the teacher's sample from the "
              f"same noise. The 50-step teacher's ED: {ref:.2e}.", "",
              "| setting | precision | energy distance | ED / teacher-50 | recall | mode TV | mapping RMSE |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            m = r["metrics"]
            md.append(f"| {r['setting']} | {_pm(m['precision'])} | {_pm(m['energy_distance'], sci=True)} | "
                      f"{m['energy_distance']['mean'] / ref:.1f}× | {_pm(m['recall'], 2)} | {_pm(m['mode_tv'])} | "
                      f"{_pm(m['mapping_rmse'])} |")
        result = {"command": "python -m benchmarks.gmm_regression --ceiling", "seconds": time.time() - start,
                  "teacher_50": teacher, "rows": rows}
        (args.out / "regression_ceiling.json").write_text(json.dumps(result, indent=1))
        (args.out / "regression_ceiling.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return 0
    if args.diagnose:
        start = time.time()
        folder = gmm_module().fit_base(args.cache / "gmm-regression", log=log)
        rows = diagnose(folder, args.diagnose, args.steps)
        md = ["# Case A: where the students' energy distance and precision go", "",
              f"`python -m benchmarks.gmm_regression --diagnose '{args.diagnose}' --steps {args.steps}` — seed 0 "
              f"({time.time() - start:.0f} s). *Off-mode*: farther than 3 std from every mode. *Spread*: RMS distance "
              "to the nearest mode of the on-mode samples (exact samples: "
              f"{rows[0]['exact_on_mode_spread']:.4f}).", "",
              "| student | off-mode share | on-mode spread / exact | ED as is | ED, off-mode samples replaced by exact "
              "ones | ED of exact samples with the student's mode weights and spread | mode TV as is |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            md.append(f"| {r['student']} ({r['variant']}, {r['steps']} steps) | {r['off_mode_share']:.3f} | "
                      f"{r['on_mode_spread'] / r['exact_on_mode_spread']:.3f} | "
                      f"{r['as_is']['energy_distance']:.2e} | {r['bridges_replaced_by_exact']['energy_distance']:.2e} | "
                      f"{r['exact_with_student_weights_and_spread']['energy_distance']:.2e} | "
                      f"{r['as_is']['mode_tv']:.3f} |")
        (args.out / "diagnose.json").write_text(json.dumps(rows, indent=1))
        (args.out / "diagnose.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return 0
    if args.bridge_floor:
        start = time.time()
        rows = bridge_floor()
        md = ["# Case A: what samples on the bridges cost the metrics", "",
              "`python -m benchmarks.gmm_regression --bridge-floor` — 10 000 exact ring samples with a share moved "
              "uniformly onto the chords between neighbouring modes (plus the modes' std 0.1 noise), against the same "
              f"20 000 exact samples as the students; 3 draws, mean ± sd ({time.time() - start:.0f} s).", "",
              "| share on bridges | precision | energy distance | recall | mode TV |", "| --- | --- | --- | --- | --- |"]
        for r in rows:
            m = r["metrics"]
            md.append(f"| {r['bridge_fraction']:g} | {_pm(m['precision'])} | {_pm(m['energy_distance'], sci=True)} | "
                      f"{_pm(m['recall'], 2)} | {_pm(m['mode_tv'])} |")
        (args.out / "bridge_floor.json").write_text(json.dumps(rows, indent=1))
        (args.out / "bridge_floor.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return 0
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else []
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    name_out = args.name or ("regression_levers" if variants else "regression_ablation")
    wanted = {"3": "3-step (1000,757,522)", "1": "1-step (1000)"}
    students = {wanted[k]: STUDENTS[wanted[k]] for k in args.students.split(",")}

    start = time.time()
    folder = gmm.fit_base(args.cache / "gmm-regression", log=log)
    args.seeds = len(seeds)
    options = {"eval_draws": args.eval_draws, "common_draws": args.common_draws, "pairs_seed": args.pairs_seed}
    # the pairs, once per (student steps, seed), before any worker starts (they would race to generate the same cache)
    generation = time.time()
    pair_configs = [variant_settings(v)[:2] for v in variants] or [(max(WEIGHTS), {})]
    for name, steps in students.items():
        for seed in seeds:
            for weight, extra in pair_configs:
                if weight > 0:
                    gmm.distil(folder, config(steps, weight, extra), seed=seed, steps=0, n_samples=16,
                               pairs_seed=args.pairs_seed)
    generation = time.time() - generation
    log(f"teacher ODE pairs ready ({generation:.1f} s)")

    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    teacher_rows = [metrics(gmm.teacher_samples(folder, 50, s)) for s in seeds]
    for m in teacher_rows:
        m["mapping_rmse"] = 0.0
    results = {
        "command": command,
        "settings": {"optimizer_steps": args.steps, "seeds": args.seeds, "student_lr": STUDENT_LR, "case_a": CASE_A,
                     "pairs": PAIRS, "pair_generation_seconds": generation, "mixture": gmm.RING,
                     "samples_per_run": gmm.N_SAMPLES, "variants": {v: VARIANTS[v] for v in variants},
                     "seed_list": seeds, "pairs_seed": args.pairs_seed, "eval_draws": args.eval_draws,
                     "common_draws": args.common_draws},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {args.jobs} jobs",
        "partial": True,
        "rows": [{"student": "teacher Euler 50", "weight": None, "metrics": gmm.summarise(teacher_rows)}],
    }
    write(args.out, results, name_out)

    if variants:  # one task per (student, variant, seed); the variant's label travels as its "weight" key
        tasks = [(name, steps, None, s, str(folder), args.steps, 1, v, options) for name, steps in students.items()
                 for v in variants for s in seeds]
    else:
        tasks = [(name, steps, w, s, str(folder), args.steps, 1, None, options) for name, steps in students.items()
                 for w in WEIGHTS for s in seeds]
    pending: dict[tuple, list] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, weight, seed, seconds, m, detail in pool.map(_run, tasks):
            log(f"{name}, {weight if isinstance(weight, str) else f'weight {weight:g}'}, seed {seed}: {seconds:.0f} s, precision {m['precision']:.3f}, energy "
                f"{m['energy_distance']:.2e}, recall {m['recall']:.2f}, mode TV {m['mode_tv']:.3f}, mapping RMSE "
                f"{m['mapping_rmse']:.3f}")
            done = pending.setdefault((name, weight), [])
            done.append((seconds, m, detail))
            if len(done) < args.seeds:
                continue
            row = {"student": name, "weight": weight, "seconds_per_run": sum(s for s, _, _ in done) / len(done),
                   "metrics": gmm.summarise([m for _, m, _ in done]), "runs": [d for _, _, d in done]}
            if isinstance(weight, str):  # a variant
                w, extra, host = variant_settings(weight)
                row.update(variant=weight, weight=w, dmd_config=config(STUDENTS[name], w, extra),
                           **({"student_optimizer": host} if host else {}))
            else:
                row["dmd_config"] = config(STUDENTS[name], weight)
            results["rows"].append(row)
            write(args.out, results, name_out)
            log(f"row written: {args.out / name_out}.md ({time.time() - start:.0f} s so far)")
    results["partial"] = False
    results["seconds"] = time.time() - start
    write(args.out, results, name_out)
    log(f"done in {results['seconds']:.0f} s: {args.out / name_out}.md")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
