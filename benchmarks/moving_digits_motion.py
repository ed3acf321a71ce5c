"""Case C's motion, analysed: where the causal student's speed spread and black frames come from.

    python -m benchmarks.moving_digits_motion [--cache DIR] [--n-eval 1000] [--out DIR] [--name NAME]

Reads the cached stages of ``python -m benchmarks.moving_digits`` (builds nothing: run that first, with the same
``--cache``), samples ``--n-eval`` clips of the 50-step teacher and of the 3-step causal student after Self-Forcing DMD
at training length (the case's prompts and starting noises: the teacher's first 300 clips are the case's 300; the
student's re-noising between its steps draws from the generator after all ``--n-eval`` starting noises, so its clips
differ from the case's) and reports, for both:

- the per-clip mean speed's distribution (quantiles; the share of clips faster than 3.5 or slower than 1.5 px per
  frame, where every real clip moves at 2 or 2.83), its spread with and without those clips and without the clips
  that hold a black or frozen frame (one rule for both), and the net speed (first to last frame's centre of mass,
  per frame: what the spread is without the frame-to-frame jitter);
- the speed by frame pair (pairs 0→1 and 4→5 cross a latent frame: the causal student's block boundaries), and where
  each clip's biggest jump sits;
- the student's spread over the teacher's with a 95 % bootstrap interval (clips resampled in pairs: the same noise and
  prompt for both), and the black frames' significance counted on clips (frames of one clip are not independent):
  a two-proportion z-test, McNemar's exact test on the pairs, a bootstrap interval of the black-frame rates' difference.

Writes ``case_c_motion[_NAME].{json,md}`` into ``--out`` (default ``benchmarks/results/quality``); the sampled clips are
kept in the cache beside the stages they came from, so a second run only computes the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import moving_digits as C

FAST, SLOW = 3.5, 1.5  # px per frame; every real clip moves at 2 or 2.83
JUMP = 6.0  # px in one frame pair: over twice the fastest real motion
BOOTSTRAP = 2000


def _paths(cache: Path) -> dict[str, Path]:
    root = cache / "moving-digits"
    paths = {"model": root / "teacher", "fd_features": root / "digits-fd", "dmd": root / "student-dmd" / "out"}
    missing = [str(p) for p in (paths["model"], paths["dmd"]) if not (p / "case_c_stage.json").is_file()]
    if missing:
        raise SystemExit(f"error: no cached case C stage at {', '.join(missing)}: run "
                         f"`python -m benchmarks.moving_digits --cache {cache}` first")
    return paths


def sample(cache: Path, n_eval: int) -> dict[str, torch.Tensor]:
    """The teacher's 50-step clips and the student's 3-step clips ``(n_eval, F, H, W)``, each cached by the stamps
    of the stages it came from."""
    paths = _paths(cache)
    teacher_stamp = (paths["model"] / "case_c_stage.json").read_text()
    student_stamp = teacher_stamp + (paths["dmd"] / "case_c_stage.json").read_text()
    folder = cache / "moving-digits" / "motion-clips"
    ev = None
    clips = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, stamp in (("teacher Euler 50", teacher_stamp),
                            ("causal student after Self-Forcing DMD, 3 steps", student_stamp)):
            file = folder / f"{hashlib.sha256(stamp.encode()).hexdigest()[:12]}-{n_eval}.pt"
            if not file.is_file():
                ev = ev or C.Evaluator(paths, n_eval)
                if name.startswith("teacher"):
                    made = ev.teacher(50, C.LATENT_FRAMES)
                else:
                    steps = json.loads((paths["dmd"] / "case_c_stage.json").read_text())["keys"]["dmd_denoising_steps"]
                    made = ev.student(paths["dmd"], C.LATENT_FRAMES, None, steps)
                file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(made, file)
            clips[name] = torch.load(file)
    finally:
        torch.set_num_threads(threads)
    return clips


def describe(clips: torch.Tensor) -> dict:
    """One row's motion, analysed (the module docstring)."""
    m = C.motion(clips)
    per_clip = m["speed"].mean(1)
    start = torch.stack([m["cy"][:, 0], m["cx"][:, 0]], 1)
    end = torch.stack([m["cy"][:, -1], m["cx"][:, -1]], 1)
    net = (end - start).norm(dim=1) / m["speed"].shape[1]
    odd = (per_clip > FAST) | (per_clip < SLOW)
    dirty = m["black"].any(1) | m["frozen"].any(1)
    biggest = m["speed"].argmax(1)
    jumps = m["speed"].amax(1) > JUMP
    q = torch.quantile(per_clip, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=per_clip.dtype))
    return {
        "clips": len(clips), **C.motion_figures(m),
        "speed_quantiles_5_25_50_75_95": q.tolist(), "speed_max": float(per_clip.max()),
        "share_faster_than_3.5": float((per_clip > FAST).float().mean()),
        "share_slower_than_1.5": float((per_clip < SLOW).float().mean()),
        "speed_spread_without_fast_or_slow": float(per_clip[~odd].std()),
        "speed_spread_without_fast_slow_black_frozen": float(per_clip[~(odd | dirty)].std()),
        "fast_or_slow_clips_with_black_or_frozen": float(dirty[odd].float().mean()) if int(odd.sum()) else 0.0,
        "net_speed": float(net.mean()), "net_speed_spread": float(net.std()),
        "jitter (speed - net speed)": float((per_clip - net).mean()),
        "speed_spread_by_pair": m["speed"].std(0).tolist(),
        "share_with_a_jump_over_6px": float(jumps.float().mean()),
        "jumps_by_pair": torch.bincount(biggest[jumps], minlength=m["speed"].shape[1]).tolist(),
    }


def _bootstrap(values: np.ndarray, statistic, seed: int = 0) -> tuple[float, float]:
    g = np.random.default_rng(seed)
    draws = [statistic(values[g.integers(0, len(values), len(values))]) for _ in range(BOOTSTRAP)]
    return float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def compare(teacher: torch.Tensor, student: torch.Tensor) -> dict:
    """The student against the teacher, clip by clip (the same noise and prompt for both)."""
    from scipy import stats

    mt, ms = C.motion(teacher), C.motion(student)
    speeds = np.stack([mt["speed"].mean(1).numpy(), ms["speed"].mean(1).numpy()], 1).astype(np.float64)
    n = len(speeds)

    def ratio(v: np.ndarray) -> float:
        return float(v[:, 1].std(ddof=1) / v[:, 0].std(ddof=1))

    def trimmed_ratio(v: np.ndarray) -> float:
        return C.trimmed_spread(torch.from_numpy(v[:, 1])) / C.trimmed_spread(torch.from_numpy(v[:, 0]))

    bt, bs = mt["black"].any(1).numpy(), ms["black"].any(1).numpy()
    frames = np.stack([mt["black"].float().mean(1).numpy(), ms["black"].float().mean(1).numpy()], 1)
    pooled = (bt.sum() + bs.sum()) / (2 * n)
    z = (bs.mean() - bt.mean()) / np.sqrt(max(pooled * (1 - pooled) * 2 / n, 1e-12))
    only_s, only_t = int((bs & ~bt).sum()), int((bt & ~bs).sum())
    mcnemar = stats.binomtest(only_s, only_s + only_t, 0.5).pvalue if only_s + only_t else 1.0
    return {
        "speed_spread_ratio": ratio(speeds), "speed_spread_ratio_95ci": _bootstrap(speeds, ratio),
        "trimmed_spread_ratio": trimmed_ratio(speeds), "trimmed_spread_ratio_95ci": _bootstrap(speeds, trimmed_ratio),
        "speed_correlation_teacher_student": float(np.corrcoef(speeds.T)[0, 1]),
        "clips_with_black": {"teacher": int(bt.sum()), "student": int(bs.sum()), "both": int((bt & bs).sum()),
                             "of": n},
        "clips_with_black_z": float(z), "clips_with_black_p_two_sided": float(2 * stats.norm.sf(abs(z))),
        "mcnemar_p": float(mcnemar),
        "black_frame_rate_difference": float(frames[:, 1].mean() - frames[:, 0].mean()),
        "black_frame_rate_difference_95ci": _bootstrap(frames, lambda v: float(v[:, 1].mean() - v[:, 0].mean())),
    }


def analyse(clips: dict[str, torch.Tensor]) -> dict:
    teacher, student = clips.values()
    return {"rows": {name: describe(c) for name, c in clips.items()}, "student_against_teacher": compare(teacher,
                                                                                                          student)}


def _f(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_f(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_f(x)}" for k, x in v.items())
    return str(v)


def markdown(result: dict) -> list[str]:
    rows = result["rows"]
    names = list(rows)
    keys = [k for k in rows[names[0]] if k != "black_by_frame"]
    lines = [f"**Case C's motion, analysed** ({result['command']}, {result['date']}, {result['seconds']:.0f} s): "
             f"{rows[names[0]]['clips']} clips per row, the case's prompts and starting noises (the teacher's first "
             "300 clips are the case's; the student's re-noising draws differ). Lists by frame pair start at pair "
             "0→1; pairs 0→1 and 4→5 cross a latent frame.", "",
             "| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {k} | " + " | ".join(_f(rows[n][k]) for n in names) + " |" for k in keys]
    lines += ["", "The student against the teacher (clips resampled in pairs for the intervals; black frames counted "
                  "on clips):", ""]
    lines += [f"- {k}: {_f(v)}" for k, v in result["student_against_teacher"].items()]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moving_digits_motion",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(C.__file__).resolve().parent / ".cache")
    parser.add_argument("--out", type=Path, default=Path(C.__file__).resolve().parent / "results" / "quality")
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--name", default="", help="a suffix for the output files (case_c_motion_NAME)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.time()
    result = analyse(sample(args.cache, args.n_eval))
    result.update(command="python -m benchmarks.moving_digits_motion " + " ".join(argv or []),
                  date=time.strftime("%Y-%m-%d"), seconds=time.time() - start)
    stem = "case_c_motion" + (f"_{args.name}" if args.name else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text("\n".join(markdown(result)))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
