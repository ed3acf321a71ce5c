"""A drift signal: pixel statistics of the student's validation samples against the teacher's, at every validation.

Users of few-step students report the same failures (docs/quality.md, "The drift signal"): samples that darken, turn
yellow, over-saturate, or collapse to one look as training goes on, seen only by eye, a day too late. Each of those
moves a simple statistic of the decoded frames, which needs no extra model:

- ``brightness``: the mean luma (Rec. 601 weights; the mean itself for one channel);
- ``mean_<channel>`` and ``std_<channel>``: each channel's mean (a colour cast: yellowing lifts red and green against
  blue) and its spread over the pixels (contrast), the channels named ``r``, ``g``, ``b`` (``grey`` for one);
- ``saturation``: the mean chroma, max − min over the channels of each pixel (0 for grey; chroma rather than HSV's
  ratio, which is unstable on near-black pixels); three channels only — a grey sample has none, so it is not computed;
- ``sample_spread``: the mean over pixels of the standard deviation across the samples (collapse to one look): across
  the seeds of each prompt where a prompt has several samples, else across the round's samples (its prompts);
- ``frame_change``: for videos, the mean absolute change between consecutive frames (a video that freezes, or
  flickers).

``frame_statistics`` computes them on frames ``(B, C, F, H, W)`` in [0, 1]. ``DriftMonitor`` keeps them over the
validation rounds, against a reference (the teacher's samples on the same prompts and noise, or — where a host has no
teacher sample — the first round's own), warns in one line per statistic that leaves its band, and writes
``drift.json``, ``drift.csv`` and ``drift.png`` (each statistic over the steps, every sample set against the
reference) into the validation folder.

A statistic leaves its band when ``|value − reference| > relative · |reference| + absolute`` (``BANDS``): relative to
the reference, with an absolute floor so that a statistic near 0 (the chroma of a grey teacher, the frame change of
a still one) does not warn on noise, and wide enough that the tiny models' student, which differs from its teacher
sample by sample, stays inside while it tracks the teacher (measured on the main job: docs/quality.md).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_file

LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Band:
    """How far a statistic may move from its reference: ``relative`` of the reference plus ``absolute``."""

    relative: float
    absolute: float

    def allows(self, value: float, reference: float) -> bool:
        return abs(value - reference) <= self.relative * abs(reference) + self.absolute


# by the statistic's kind (its name up to the first "_": mean_r → mean); pixel values in [0, 1]
BANDS: dict[str, Band] = {
    "brightness": Band(0.1, 0.02),
    "mean": Band(0.1, 0.02),
    "std": Band(0.15, 0.02),
    "saturation": Band(0.25, 0.03),
    "sample": Band(0.25, 0.02),  # sample_spread
    "frame": Band(0.5, 0.01),  # frame_change
}


def channel_names(channels: int) -> list[str]:
    return ["grey"] if channels == 1 else ["r", "g", "b"] if channels == 3 else [f"c{i}" for i in range(channels)]


def frame_statistics(frames: torch.Tensor, groups: Sequence[int] | None = None) -> dict[str, float]:
    """The drift statistics of ``frames`` ``(B, C, F, H, W)`` (or images ``(B, C, H, W)``) in [0, 1].

    ``groups``: the prompt of each sample (one per sample); ``sample_spread`` is the spread across the samples of
    each prompt that has several, averaged, else across all samples (absent with a single sample)."""
    x = frames.detach().float().cpu()
    if x.ndim == 4:
        x = x[:, :, None]
    if x.ndim != 5:
        raise ValueError(f"frames must be (B, C, F, H, W) or (B, C, H, W), got {tuple(frames.shape)}")
    x = x.clamp(0, 1)
    _, c, f = x.shape[:3]
    stats: dict[str, float] = {}
    if c == 3:
        luma = sum(w * x[:, i] for i, w in enumerate(LUMA))
        stats["brightness"] = float(luma.mean())
    else:
        stats["brightness"] = float(x.mean())
    for i, name in enumerate(channel_names(c)):
        stats[f"mean_{name}"] = float(x[:, i].mean())
        stats[f"std_{name}"] = float(x[:, i].std(unbiased=False))
    if c == 3:
        stats["saturation"] = float((x.amax(1) - x.amin(1)).mean())
    spread = _sample_spread(x, groups)
    if spread is not None:
        stats["sample_spread"] = spread
    if f > 1:
        stats["frame_change"] = float((x[:, :, 1:] - x[:, :, :-1]).abs().mean())
    return stats


def _sample_spread(x: torch.Tensor, groups: Sequence[int] | None) -> float | None:
    if groups is not None and len(groups) != len(x):
        raise ValueError(f"groups names {len(groups)} samples, frames have {len(x)}")
    sets = []
    if groups is not None:
        for g in dict.fromkeys(groups):
            members = [i for i, gi in enumerate(groups) if gi == g]
            if len(members) > 1:
                sets.append(x[members])
    if not sets and len(x) > 1:
        sets = [x]
    if not sets:
        return None
    return float(sum(float(s.std(0, unbiased=False).mean()) for s in sets) / len(sets))


def band_of(statistic: str, bands: dict[str, Band] = BANDS) -> Band:
    return bands[statistic] if statistic in bands else bands[statistic.split("_")[0]]


def out_of_band(stats: dict[str, float], reference: dict[str, float],
                bands: dict[str, Band] = BANDS) -> dict[str, tuple[float, float]]:
    """The statistics of ``stats`` outside their band around ``reference``: name → (value, reference's value)."""
    return {k: (v, reference[k]) for k, v in stats.items()
            if k in reference and not band_of(k, bands).allows(v, reference[k])}


def drift_line(step: int, samples: str, moved: dict[str, tuple[float, float]], reference_label: str,
               plot: Path) -> str:
    """One line for a sample set's statistics out of band in one round, each with the reference's value."""
    listed = ", ".join(f"{k} {v:.3f} vs {r:.3f}" for k, (v, r) in moved.items())
    return f"drift at step {step}, {samples} against {reference_label}: {listed} (outside the band; {plot})"


class DriftMonitor:
    """The drift statistics of each validation round, against a reference, with warnings and the files a user opens.

    ``DriftMonitor(folder, warn=...)``; ``set_reference(frames, groups, label)`` once (the teacher's samples of the
    validation prompts); then ``observe(step, {"student": frames, ...}, groups)`` every round, which returns the
    round's tracker values (``drift/<samples>/<statistic>``, ``drift/<reference label>/<statistic>``) and calls
    ``warn`` with one line per sample set that has a statistic out of its band (``drift_line``: each such statistic
    with its value and the reference's). Without a reference, the first round's first sample set becomes the
    reference (its label says so: ``"<name> at step N"``). Rounds at ``quiet_steps`` (the baseline before training,
    where the untrained student is not yet meant to match) are recorded and plotted but never warn.

    A resumed run continues the history: the rounds (and the reference) of an earlier ``drift.json`` in ``folder``
    are kept up to the first step this run observes; rounds from that step on are replaced. A run that starts again
    from an earlier step than any kept round (a new run in the same folder) drops them all, and the reference it read
    with them."""

    def __init__(self, folder: Path, *, warn: Callable[[str], None], bands: dict[str, Band] = BANDS,
                 quiet_steps: Sequence[int] = (0,)):
        self.folder, self.warn, self.bands, self.quiet_steps = Path(folder), warn, bands, set(quiet_steps)
        self.reference: dict[str, float] | None = None
        self.reference_label = "teacher"
        self.rounds: list[dict] = []  # {"step", "values": {samples: stats}, "warnings": [...]}
        self._read_reference = False  # the reference came from an earlier run's drift.json
        earlier = self.folder / "drift.json"
        if earlier.is_file():
            report = json.loads(earlier.read_text())
            self.rounds = report["rounds"]
            self.reference, self.reference_label = report["reference"]["values"], report["reference"]["label"]
            self._read_reference = True

    def set_reference(self, frames: torch.Tensor, groups: Sequence[int] | None = None, label: str = "teacher") -> None:
        self.reference, self.reference_label = frame_statistics(frames, groups), label
        self._read_reference = False

    def observe(self, step: int, samples: dict[str, torch.Tensor], groups: Sequence[int] | None = None
                ) -> dict[str, float]:
        values = {name: frame_statistics(frames, groups) for name, frames in samples.items()}
        kept = [r for r in self.rounds if r["step"] < step]
        if self._read_reference and self.rounds and not kept:  # a new run: the file's reference is not its own
            self.reference, self._read_reference = None, False
        self.rounds = kept
        if self.reference is None:
            first = next(iter(values))
            self.reference, self.reference_label = values[first], f"{first} at step {step}"
        warnings = []
        if step not in self.quiet_steps:
            for name, stats in values.items():
                moved = out_of_band(stats, self.reference, self.bands)
                warnings += [{"samples": name, "statistic": k, "value": v, "reference": r}
                             for k, (v, r) in moved.items()]
                if moved:
                    self.warn(drift_line(step, name, moved, self.reference_label, self.folder / "drift.png"))
        self.rounds.append({"step": step, "values": values, "warnings": warnings})
        self.write()
        tracked = {f"drift/{name}/{k}": v for name, stats in values.items() for k, v in stats.items()}
        tracked.update({f"drift/{_slug(self.reference_label)}/{k}": v for k, v in self.reference.items()})
        return tracked

    # ------------------------------------------------------------------ files

    def write(self) -> None:
        """``drift.json`` (every round, the reference, the bands, the warnings), ``drift.csv`` (one row per round,
        samples and statistic) and ``drift.png``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        report = {"reference": {"label": self.reference_label, "values": self.reference},
                  "bands": {k: {"relative": b.relative, "absolute": b.absolute} for k, b in self.bands.items()},
                  "quiet_steps": sorted(self.quiet_steps), "rounds": self.rounds}
        write_file(self.folder / "drift.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))

        def rows(tmp):
            with open(tmp, "w", newline="") as out:
                w = csv.writer(out)
                w.writerow(["step", "samples", "statistic", "value", "reference", "low", "high", "warned"])
                for r in self.rounds:
                    warned = {(x["samples"], x["statistic"]) for x in r["warnings"]}
                    for name, stats in r["values"].items():
                        for k, v in stats.items():
                            ref = self.reference.get(k)
                            low, high = _limits(band_of(k, self.bands), ref) if ref is not None else ("", "")
                            w.writerow([r["step"], name, k, f"{v:.6g}", "" if ref is None else f"{ref:.6g}",
                                        low if low == "" else f"{low:.6g}", high if high == "" else f"{high:.6g}",
                                        int((name, k) in warned)])

        write_file(self.folder / "drift.csv", rows)
        write_file(self.folder / "drift.png", lambda tmp: plot_drift(self.rounds, self.reference,
                                                                   self.reference_label, self.bands).save(tmp, "PNG"))


def _limits(band: Band, ref: float) -> tuple[float, float]:
    """The band's limits as a user reads them (the plot's shading, the CSV's columns): every statistic is a mean,
    spread or change of pixel values, none below 0, so the lower limit stops there."""
    width = band.relative * abs(ref) + band.absolute
    return max(0.0, ref - width), ref + width


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


COLOURS = [(220, 80, 60), (60, 120, 220), (60, 170, 90), (200, 140, 30), (150, 80, 200)]


def plot_drift(rounds: list[dict], reference: dict[str, float] | None, label: str,
               bands: dict[str, Band] = BANDS):
    """A PIL image: one panel per statistic, its value per sample set over the validation steps (a line each), the
    reference as a dashed line and its band shaded; warned rounds marked with a ring. PIL only (matplotlib is not a
    dependency of the package)."""
    from PIL import Image, ImageDraw

    names = list(dict.fromkeys(k for r in rounds for stats in r["values"].values() for k in stats))
    sets = list(dict.fromkeys(n for r in rounds for n in r["values"]))
    cols = 3
    pw, ph, pad, head = 260, 150, 8, 24
    rows_n = max(1, math.ceil(len(names) / cols))
    image = Image.new("RGB", (cols * (pw + pad) + pad, head + rows_n * (ph + pad) + 20), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0 = pad
    for i, name in enumerate(sets):  # the legend
        draw.line((x0, 12, x0 + 18, 12), fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((x0 + 22, 6), name, fill=(0, 0, 0))
        x0 += 30 + 7 * len(name)
    draw.line((x0, 12, x0 + 18, 12), fill=(90, 90, 90), width=1)
    draw.text((x0 + 22, 6), f"{label} (band shaded)", fill=(0, 0, 0))
    steps = [r["step"] for r in rounds]
    lo_step, hi_step = (min(steps), max(steps)) if steps else (0, 1)
    for p, stat in enumerate(names):
        left, top = pad + (p % cols) * (pw + pad), head + (p // cols) * (ph + pad)
        inner = (left + 36, top + 16, left + pw - 6, top + ph - 18)
        draw.rectangle((left, top, left + pw, top + ph), outline=(200, 200, 200))
        draw.text((left + 4, top + 2), stat, fill=(0, 0, 0))
        ref = (reference or {}).get(stat)
        values = [v for r in rounds for s in r["values"].values() for k, v in s.items() if k == stat]
        limits = _limits(band_of(stat, bands), ref) if ref is not None else None
        span = values + (list(limits) if limits else [])
        lo, hi = (min(span), max(span)) if span else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.01, hi + 0.01
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

        def xy(step, value, _lo=lo, _hi=hi, _in=inner):
            fx = 0.5 if hi_step == lo_step else (step - lo_step) / (hi_step - lo_step)
            return (_in[0] + fx * (_in[2] - _in[0]), _in[3] - (value - _lo) / (_hi - _lo) * (_in[3] - _in[1]))

        if limits:
            _, y_hi = xy(lo_step, limits[1])
            _, y_lo = xy(lo_step, limits[0])
            draw.rectangle((inner[0], y_hi, inner[2], y_lo), fill=(236, 236, 236))
            _, y_ref = xy(lo_step, ref)
            for xs in range(int(inner[0]), int(inner[2]), 8):
                draw.line((xs, y_ref, min(xs + 4, inner[2]), y_ref), fill=(90, 90, 90))
        draw.text((left + 2, inner[1] - 4), f"{hi:.3g}", fill=(110, 110, 110))
        draw.text((left + 2, inner[3] - 8), f"{lo:.3g}", fill=(110, 110, 110))
        draw.text((inner[0], inner[3] + 3), f"step {lo_step}", fill=(110, 110, 110))
        draw.text((inner[2] - 52, inner[3] + 3), f"step {hi_step}", fill=(110, 110, 110))
        for j, set_name in enumerate(sets):
            colour = COLOURS[j % len(COLOURS)]
            points = [(r["step"], r["values"][set_name][stat], any(
                w["samples"] == set_name and w["statistic"] == stat for w in r["warnings"]))
                for r in rounds if set_name in r["values"] and stat in r["values"][set_name]]
            coords = [xy(s, v) for s, v, _ in points]
            if len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            for (cx, cy), (_, _, warned) in zip(coords, points):
                draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
                if warned:
                    draw.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), outline=(200, 0, 0), width=2)
    return image


__all__ = ["BANDS", "Band", "DriftMonitor", "band_of", "channel_names", "drift_line", "frame_statistics", "out_of_band",
           "plot_drift"]
