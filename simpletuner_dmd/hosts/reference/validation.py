"""The reference host's validation: samples for each validation prompt with the method's sampler (``distill_sampler``,
or the host's Euler sampler for plain fine-tuning), saved as PNG frames and a GIF under
``output_dir/validation/step-N/<prompt>/<student|ema|teacher>/`` (with the undecoded ``latents.safetensors``) and
logged to the trackers.

The teacher's reference sample (Euler, ``validation_num_inference_steps``, the base with its adapters off) is made
once, at the first validation of a distillation run. Validation runs on the main process alone and calls the bare
module, never the (DDP) wrapper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...adapters import AdapterSwitch
from .media import save_sample


class Validator:
    """``Validator(...)(step)`` makes, saves and logs one round of validation samples."""

    def __init__(self, *, host: dict, family: Any, components: Any, models: Any, pm: Any, distilling: bool, ema: Any,
                 prompt_conds: dict[str, Any], negative_cond: Any, accelerator: Any, out: Path, seed: int):
        self.host, self.family, self.components, self.models = host, family, components, models
        self.pm, self.ema, self.accelerator, self.out = pm, ema, accelerator, out
        self.prompt_conds, self.negative_cond = prompt_conds, negative_cond
        self.seed = host["validation_seed"] if host["validation_seed"] is not None else seed
        self.shape = family.latent_shape(components, width=host["validation_resolution"][0],
                                         height=host["validation_resolution"][1],
                                         frames=host["validation_num_video_frames"])
        self.teacher_pending = distilling  # the teacher's reference sample, once
        self.last_student_sample: Path | None = None  # the latest round's first student (or EMA) sample

    def __call__(self, step: int) -> Path | None:
        """The folder the samples went to (None on the other processes, or with no validation prompt)."""
        if not self.accelerator.is_main_process or not self.prompt_conds:
            return None
        network = self.models.network
        network.eval()
        folder = self.out / "validation" / f"step-{step}"
        images = {}
        first_student = None
        with torch.no_grad():
            for prompt_name, cond in self.prompt_conds.items():
                for variant, sampler in self._samplers().items():
                    latents = self._sample(sampler, cond)
                    target = folder / prompt_name / variant
                    images[f"validation/{prompt_name}/{variant}"] = save_sample(
                        self.family.decode_latents(self.components, latents)[0], target)
                    save_latents(target / "latents.safetensors", latents, seed=self.seed)
                    if first_student is None and variant != "teacher":
                        first_student = images[f"validation/{prompt_name}/{variant}"]
        self.last_student_sample = first_student
        self.teacher_pending = False
        network.train()
        log_media(self.accelerator, images, step)
        return folder

    def _samplers(self) -> dict[str, Any]:
        host = self.host
        student = self.pm.hook.distill_sampler() or self._euler(self.models.network)
        variants = {"student": student}
        if self.ema is not None and host["ema_validation"] in ("ema_only", "comparison"):
            def ema_sampler(*args):
                with self.ema.swap_into():
                    return student(*args)

            variants = {"ema": ema_sampler} if host["ema_validation"] == "ema_only" else {**variants,
                                                                                            "ema": ema_sampler}
        if self.teacher_pending:
            variants["teacher"] = self._teacher()
        return variants

    def _euler(self, network):
        return self.family.euler_sampler(network, steps=self.host["validation_num_inference_steps"],
                                         shift=self.host["flow_schedule_shift"])

    def _teacher(self):
        """The teacher's Euler sampler: the separate frozen copy, or the student's base with every adapter off."""
        models = self.models
        euler = self._euler(models.teacher or models.network)
        if models.teacher is not None or self.host["model_type"] != "lora":
            return euler
        switch = AdapterSwitch(models.network)

        def run(*args):
            with switch.disabled():
                return euler(*args)

        return run

    def _sample(self, sampler, cond) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((1, *self.shape), generator=generator).to(self.accelerator.device)
        return sampler(noise, cond, self.negative_cond, self.host["validation_guidance"], generator)


def save_latents(path: Path, latents: torch.Tensor, *, seed: int) -> None:
    """The sample's final latents (``latents``, before decoding) and its seed, to compare other samplers against."""
    from safetensors.torch import save_file

    from ...atomic import write_file

    write_file(path, lambda tmp: save_file({"latents": latents.detach().float().cpu().contiguous()}, tmp,
                                           metadata={"seed": str(seed)}))


def log_media(accelerator, images: dict[str, Path], step: int) -> None:
    """The saved samples to the trackers: wandb (images, GIFs as videos) and tensorboard (the first frame)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({key: (wandb.Video(str(path), format="gif") if path.suffix == ".gif"
                               else wandb.Image(str(path))) for key, path in images.items()}, step=step)
        elif tracker.name == "tensorboard":
            import numpy as np
            from PIL import Image

            for key, path in images.items():
                first = np.asarray(Image.open(path).convert("RGB"))
                tracker.writer.add_image(key, first, step, dataformats="HWC")


__all__ = ["Validator", "log_media", "save_latents"]
