"""The drift signal (``simpletuner_dmd.drift``) on SimpleTuner's own validation samples, while a plugin method runs.

SimpleTuner (3.1.x and 4.x) hands each validation prompt's raw samples — before any benchmark or EMA image is
stitched beside them — to ``Validation.evaluate_images`` (its model-evaluator hook), and ends every round with
``Validation._log_validations_to_trackers`` on the main process. ``install`` wraps both: the first collects the
round's samples (PIL images, or a list of PIL frames per video), the second, after SimpleTuner's own logging, gives
them to a ``DriftMonitor``, logs its values to SimpleTuner's trackers (``accelerator.log``, at SimpleTuner's global
step) and writes ``drift.{png,json,csv}`` into SimpleTuner's ``validation_images`` folder.

SimpleTuner samples no teacher: its validation draws the student alone (its step-0 ``base_model`` benchmark is the
untrained student on the student's own few-step schedule). So the reference here is **the first validation round's
samples** (the base-model benchmark when SimpleTuner runs it, else the first round after training began): the signal
says how far the student has moved from where it started, not from the many-step teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .shared import MARK, is_main_process, log, served_name

ROUND_ATTR = "_simpletuner_dmd_drift_round"  # on SimpleTuner's Validation: the round's samples, by prompt
MONITOR_ATTR = "_simpletuner_dmd_drift_monitor"


def media_to_frames(samples: list[Any], size: tuple[int, int] | None = None):
    """SimpleTuner's validation media — PIL images, or lists of PIL frames (videos) — as one tensor ``(B, 3, F, H,
    W)`` in [0, 1]; every sample resized to ``size`` (width, height; default the first sample's) and cut to the
    fewest frames, so a round of mixed resolutions still gives one batch."""
    import numpy as np
    import torch

    clips = [list(s) if isinstance(s, (list, tuple)) else [s] for s in samples]
    size = size or clips[0][0].size
    frames = min(len(c) for c in clips)
    arrays = [np.stack([np.asarray(f.convert("RGB").resize(size)) for f in clip[:frames]]) for clip in clips]
    return torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3).float() / 255


def install(served: list[str]) -> None:
    """Wrap ``Validation.evaluate_images`` and ``Validation._log_validations_to_trackers`` (idempotent)."""
    from simpletuner.helpers.training.validation import Validation

    evaluate = Validation.evaluate_images
    if not getattr(evaluate, MARK, False):
        def evaluate_images(self, images=None, *args, **kwargs):
            if images and _monitored(self, served):
                record = getattr(self, ROUND_ATTR, None)
                if record is None:
                    record = {}
                    setattr(self, ROUND_ATTR, record)
                for shortname, media in images.items():
                    record.setdefault(shortname, []).extend(m for m in media if m is not None)
            return evaluate(self, images, *args, **kwargs)

        setattr(evaluate_images, MARK, True)
        Validation.evaluate_images = evaluate_images

    log_round = Validation._log_validations_to_trackers
    if not getattr(log_round, MARK, False):
        def _log_validations_to_trackers(self, *args, **kwargs):
            result = log_round(self, *args, **kwargs)
            record = getattr(self, ROUND_ATTR, None)
            setattr(self, ROUND_ATTR, None)
            if record and is_main_process():
                observe_round(self, record)
            return result

        setattr(_log_validations_to_trackers, MARK, True)
        Validation._log_validations_to_trackers = _log_validations_to_trackers


def _monitored(validation, served: list[str]) -> bool:
    return served_name(getattr(validation.config, "distillation_method", None), served) is not None


def observe_round(validation, record: dict[str, list]) -> dict[str, float]:
    """One round of SimpleTuner's validation samples to the run's ``DriftMonitor`` (made at the first round, in
    SimpleTuner's ``validation_images`` folder); its values go to SimpleTuner's trackers."""
    from ...drift import DriftMonitor

    monitor = getattr(validation, MONITOR_ATTR, None)
    if monitor is None:
        monitor = DriftMonitor(Path(validation.save_dir), warn=lambda m: log(f"warning: {m}"), quiet_steps=())
        setattr(validation, MONITOR_ATTR, monitor)
    groups, samples = [], []
    for i, media in enumerate(record.values()):
        groups += [i] * len(media)
        samples += media
    if not samples:
        return {}
    frames = media_to_frames(samples)
    step = int(getattr(validation, "global_step", 0) or 0)
    values = monitor.observe(step, {"samples": frames}, groups)
    validation.accelerator.log(values, step=step)
    return values


__all__ = ["install", "media_to_frames", "observe_round"]
