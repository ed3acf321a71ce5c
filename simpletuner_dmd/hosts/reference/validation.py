"""The reference host's validation: samples for each validation prompt with the method's sampler (``distill_sampler``,
or the host's Euler sampler for plain fine-tuning), saved as PNG frames and a GIF under
``output_dir/validation/step-N/<prompt>/<student|ema|teacher>/`` (with the undecoded ``latents.safetensors``) and
logged to the trackers.

The teacher's reference samples (Euler, the base with its adapters off; one per ``validation_teacher_steps`` count,
default ``validation_num_inference_steps``, at ``validation_teacher_guidance``) are made once, at the first validation
of a distillation run, and kept. Every round also writes a comparison sheet, ``step-N/sheet.png`` (rows: the
prompts, same seed; columns: the teacher's samples, then the student's), and ``validation/sheets.gif``, one frame per
round so far: the student's column changing along training beside the fixed teacher. Every round also feeds the
same decoded samples to the drift signal (``simpletuner_dmd.drift``): each student column's pixel statistics against
the first teacher column's (``validation_teacher_steps``' first count), logged to the trackers as ``drift/...``, a
warning line when one leaves its band, and ``validation/drift.{png,json,csv}``. With
``validation_fd_features`` the run ends with ``fd_report``: the Fréchet distance of every column to the real data.
Validation runs on the main process alone and calls the bare module, never the (DDP) wrapper; with a sharded or
split base (``fsdp_enable``, ``context_parallel_size``: ``every_process``) every process runs the same sampler calls,
since each call gathers the base from all of them or splits the sample's tokens over them, and the main process alone
decodes, writes and logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...adapters import AdapterSwitch
from ...atomic import write_file
from ...drift import DriftMonitor
from ...guidance import applies
from .fd import load_feature_space


class Validator:
    """``Validator(...)(step)`` makes, saves and logs one round of validation samples."""

    def __init__(self, *, host: dict, family: Any, components: Any, models: Any, pm: Any, distilling: bool, ema: Any,
                 prompt_conds: dict[str, Any], negative_cond: Any, accelerator: Any, out: Path, seed: int,
                 every_process: bool = False, warn: Callable[[str], None] = print):
        self.host, self.family, self.components, self.models = host, family, components, models
        self.every_process = every_process  # a sharded or split base: every process samples, the main writes
        self.pm, self.ema, self.accelerator, self.out = pm, ema, accelerator, out
        self.prompt_conds, self.negative_cond = prompt_conds, negative_cond
        self.seed = host["validation_seed"] if host["validation_seed"] is not None else seed
        self.shape = family.latent_shape(components, width=host["validation_resolution"][0],
                                         height=host["validation_resolution"][1],
                                         frames=host["validation_num_video_frames"])
        self.teacher_pending = distilling  # the teacher's reference samples, once
        self.last_student_sample: Path | None = None  # the latest round's first student (or EMA) sample
        counts = host.get("validation_teacher_steps")
        # variant name → step count: "teacher" alone by default, "teacher-50", "teacher-3"… when the key is set
        self.teacher_steps = ({"teacher": host["validation_num_inference_steps"]} if not counts
                              else {f"teacher-{n}": n for n in counts})
        guidance = host.get("validation_teacher_guidance")
        self.teacher_guidance = host["validation_guidance"] if guidance is None else guidance
        guidance_2 = host.get("validation_teacher_guidance_2")
        if applies(family, self.teacher_guidance, guidance_2):  # a family with experts: one scale each, as the
            self.teacher_guidance = (self.teacher_guidance, guidance_2)  # stock pipeline's guidance_scale(_2)
        self.teacher_pixels: dict[str, dict[str, torch.Tensor]] = {}  # prompt → teacher variant → (3, F, H, W)
        self.sheets: list[tuple[int, Path]] = []  # (step, sheet.png) of every round so far
        # without a teacher (plain fine-tuning) the drift's reference is the first round's samples
        self.drift = DriftMonitor(out / "validation", warn=warn)
        self.drift_reference_set = False  # this run's teacher samples given to it (a resume's file has its own)

    def __call__(self, step: int) -> Path | None:
        """The folder the samples went to (None on the other processes, or with no validation prompt)."""
        main = self.accelerator.is_main_process
        if not (main or self.every_process) or not self.prompt_conds:
            return None
        network = self.models.network
        network.eval()
        folder = self.out / "validation" / f"step-{step}"
        images = {}
        first_student = None
        cells: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for prompt_name, cond in self.prompt_conds.items():
                cells[prompt_name] = dict(self.teacher_pixels.get(prompt_name, {}))
                for variant, (sampler, guidance) in self._samplers().items():
                    latents = self._sample(sampler, cond, guidance)
                    if not main:  # it took part in the sharded base's calls; the main process writes
                        continue
                    target = folder / prompt_name / variant
                    pixels = self.family.decode_latents(self.components, latents)[0]
                    images[f"validation/{prompt_name}/{variant}"] = save_sample(pixels, target)
                    save_latents(target / "latents.safetensors", latents, seed=self.seed)
                    cells[prompt_name][variant] = pixels.cpu()
                    if variant in self.teacher_steps:
                        self.teacher_pixels.setdefault(prompt_name, {})[variant] = pixels.cpu()
                    elif first_student is None:
                        first_student = images[f"validation/{prompt_name}/{variant}"]
        self.last_student_sample = first_student
        self.teacher_pending = False
        network.train()
        if not main:
            return None
        sheet = self._write_sheets(folder, step, cells)
        if sheet is not None:
            images["validation/sheet"] = sheet
        log_media(self.accelerator, images, step)
        self._drift(step, cells)
        return folder

    def _drift(self, step: int, cells: dict[str, dict[str, torch.Tensor]]) -> None:
        """The round's samples (one per prompt, ``(3, F, H, W)``) to the drift monitor: the first teacher column
        is the reference (set once per run), every other column that has all prompts is a sample set; the values go
        to the trackers under ``drift/``."""
        teacher = next(iter(self.teacher_steps))
        if not self.drift_reference_set and all(teacher in row for row in cells.values()):
            self.drift.set_reference(torch.stack([row[teacher] for row in cells.values()]),
                                     label=self._column_label(teacher))
            self.drift_reference_set = True
        variants = [v for v in dict.fromkeys(v for row in cells.values() for v in row)
                    if v not in self.teacher_steps and all(v in row for row in cells.values())]
        if variants:
            values = self.drift.observe(step, {v: torch.stack([row[v] for row in cells.values()]) for v in variants})
            self.accelerator.log(values, step=step)

    def _column_label(self, variant: str) -> str:
        if variant in self.teacher_steps:
            return f"teacher {self.teacher_steps[variant]} steps"
        return variant

    def _write_sheets(self, folder: Path, step: int, cells: dict[str, dict[str, torch.Tensor]]) -> Path | None:
        """``folder/sheet.png`` (and ``sheet.gif`` for videos) and ``validation/sheets.gif`` (every round)."""
        columns = [v for v in self.teacher_steps if any(v in row for row in cells.values())]
        columns += dict.fromkeys(v for row in cells.values() for v in row if v not in self.teacher_steps)
        if not cells or not columns:
            return None
        frames = sheet_frames(cells, columns, [self._column_label(c) for c in columns], title=f"step {step}")
        path = folder / "sheet.png"
        frames[0].save(path)
        if len(frames) > 1:
            frames[0].save(folder / "sheet.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
        self.sheets.append((step, path))
        rounds = [Image.open(p).convert("RGB") for _, p in self.sheets]
        size = (max(r.width for r in rounds), max(r.height for r in rounds))
        rounds = [r if r.size == size else r.resize(size) for r in rounds]
        rounds[0].save(self.out / "validation" / "sheets.gif", save_all=True, append_images=rounds[1:],
                       duration=[700] * (len(rounds) - 1) + [2000], loop=0)
        return path

    def fd_report(self, step: int) -> dict | None:
        """With ``validation_fd_features``: the Fréchet distance of ``validation_fd_samples`` samples of every column
        (each teacher step count, the student or its EMA), the validation prompts in turn, to the real data, written
        to ``output_dir/fd.json``. None on the other processes or without the key."""
        path = self.host.get("validation_fd_features")
        main = self.accelerator.is_main_process
        if not path or not (main or self.every_process) or not self.prompt_conds:
            return None
        space = load_feature_space(path)
        n, batch = self.host["validation_fd_samples"], 100
        conds = list(self.prompt_conds.values())
        network = self.models.network
        network.eval()
        variants = {**{k: v for k, v in self._samplers().items() if k not in self.teacher_steps},
                    **{name: (self._teacher(count), self.teacher_guidance) for name, count in self.teacher_steps.items()}}
        generator = torch.Generator().manual_seed(self.seed + 1)
        noise = torch.randn((n, *self.shape), generator=generator)
        result: dict[str, float] = {}
        bar = tqdm(total=n * len(variants), desc=space.name, dynamic_ncols=True, disable=not main)
        with torch.no_grad():
            for variant, (sampler, guidance) in variants.items():
                pixels = []
                for i in range(0, n, batch):
                    chunk = noise[i:i + batch].to(self.accelerator.device)
                    cond = self.family.concat_conditions([conds[(i + j) % len(conds)] for j in range(len(chunk))])
                    g = torch.Generator().manual_seed(self.seed + 2 + i)
                    latents = sampler(chunk, cond, self.negative_cond, guidance, g)
                    bar.update(len(chunk))
                    if not main:  # it took part in the sharded base's calls
                        continue
                    frames = self.family.decode_latents(self.components, latents).cpu()  # (B, 3, F, H, W)
                    pixels.append(frames.permute(0, 2, 1, 3, 4).flatten(0, 1))  # every frame counts
                if main:
                    result[variant] = space.fd(torch.cat(pixels))
        bar.close()
        network.train()
        if not main:
            return None
        report = {"metric": space.name, "samples": n, "step": step, "feature_space": str(path),
                  "classifier_held_out_accuracy": space.held_out_accuracy,
                  "rows": {self._column_label(k): v for k, v in result.items()}}
        write_file(self.out / "fd.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
        return report

    def _samplers(self) -> dict[str, Any]:
        host = self.host
        student = self.pm.hook.distill_sampler() or self._euler(self.models.network)
        guidance = self.host["validation_guidance"]
        variants = {"student": (student, guidance)}
        if self.ema is not None and host["ema_validation"] in ("ema_only", "comparison"):
            def ema_sampler(*args):
                with self.ema.swap_into():
                    return student(*args)

            variants = ({"ema": (ema_sampler, guidance)} if host["ema_validation"] == "ema_only"
                        else {**variants, "ema": (ema_sampler, guidance)})
        if self.teacher_pending:
            for name, count in self.teacher_steps.items():
                variants[name] = (self._teacher(count), self.teacher_guidance)
        return variants

    def _euler(self, network, steps: int | None = None):
        return self.family.euler_sampler(network, steps=steps or self.host["validation_num_inference_steps"],
                                         shift=self.host["flow_schedule_shift"])

    def _teacher(self, steps: int):
        """The teacher's Euler sampler: the separate frozen copy, or the student's base with every adapter off."""
        models = self.models
        euler = self._euler(models.teacher or models.network, steps)
        if models.teacher is not None or self.host["model_type"] != "lora":
            return euler
        switch = AdapterSwitch(models.network)

        def run(*args):
            with switch.disabled():
                return euler(*args)

        return run

    def _sample(self, sampler, cond, guidance: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((1, *self.shape), generator=generator).to(self.accelerator.device)
        return sampler(noise, cond, self.negative_cond, guidance, generator)


def save_sample(pixels: torch.Tensor, folder: Path, fps: int = 8) -> Path:
    """``pixels`` ``(3, F, H, W)`` in [0, 1] → ``folder/frame-000.png``… and ``folder/sample.gif`` when F > 1.

    Returns the file to show: the GIF for a video, the PNG for an image."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = (pixels.detach().float().clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)
    images = [Image.fromarray(frame) for frame in frames]
    for i, image in enumerate(images):
        image.save(folder / f"frame-{i:03d}.png")
    if len(images) == 1:
        return folder / "frame-000.png"
    gif = folder / "sample.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return gif


def sheet_frames(cells: dict[str, dict[str, torch.Tensor]], columns: list[str], labels: list[str], *,
                 title: str) -> list:
    """The comparison sheet as PIL images, one per video frame: a header with ``title`` and the column labels, then
    one row per prompt (its name on the left), each cell that column's sample ``(3, F, H, W)`` in [0, 1], scaled up
    to at least 64 pixels with nearest neighbours. A missing cell stays black."""
    any_cell = next(c for row in cells.values() for c in row.values())
    _, n_frames, h, w = any_cell.shape
    scale = max(1, -(-64 // min(h, w)))
    cw, ch = w * scale, h * scale
    pad, head, left = 4, 40, 96
    width, height = left + len(columns) * (cw + pad), head + len(cells) * (ch + pad)
    frames = []
    for f in range(n_frames):
        sheet = Image.new("RGB", (width, height), (24, 24, 24))
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 2), title, fill=(200, 200, 200))
        for j, label in enumerate(labels):  # wrapped to the cell's width, two lines at most
            words, text_lines = label.split(), [""]
            for word in words:
                if text_lines[-1] and len(text_lines[-1]) + 1 + len(word) > max(4, cw // 6):
                    text_lines.append("")
                text_lines[-1] = f"{text_lines[-1]} {word}".strip()
            for k, text in enumerate(text_lines[:2]):
                draw.text((left + j * (cw + pad), 14 + 12 * k), text, fill=(255, 255, 255))
        for i, (prompt, row) in enumerate(cells.items()):
            y = head + i * (ch + pad)
            draw.text((4, y + ch // 2 - 5), prompt[:15], fill=(255, 255, 255))
            for j, column in enumerate(columns):
                if column not in row:
                    continue
                frame = row[column][:, min(f, row[column].shape[1] - 1)]
                array = (frame.float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                sheet.paste(Image.fromarray(array).resize((cw, ch), Image.NEAREST), (left + j * (cw + pad), y))
        frames.append(sheet)
    return frames


def save_latents(path: Path, latents: torch.Tensor, *, seed: int) -> None:
    """The sample's final latents (``latents``, before decoding) and its seed, to compare other samplers against."""
    write_file(path, lambda tmp: save_file({"latents": latents.detach().float().cpu().contiguous()}, tmp,
                                           metadata={"seed": str(seed)}))


def log_media(accelerator, images: dict[str, Path], step: int) -> None:
    """The saved samples to the trackers: wandb (images, GIFs as videos) and tensorboard (the first frame)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb  # only with report_to wandb; slow to import

            tracker.log({key: (wandb.Video(str(path), format="gif") if path.suffix == ".gif"
                               else wandb.Image(str(path))) for key, path in images.items()}, step=step)
        elif tracker.name == "tensorboard":
            for key, path in images.items():
                first = np.asarray(Image.open(path).convert("RGB"))
                tracker.writer.add_image(key, first, step, dataformats="HWC")


__all__ = ["Validator", "log_media", "save_latents", "save_sample", "sheet_frames"]
