"""``simpletuner-dmd sample``: the student as users run it, through the stock diffusers pipeline.

It loads the base pipeline folder (or a hub id where a hub is reachable), puts the student's LoRA into it
(``pytorch_lora_weights.safetensors``, or ``ema/`` with ``--ema``) and the student's own scheduler
(``scheduler/``, with its trained step count and guidance 1), and generates every prompt × seed. Each sample is
written as PNG frames, a GIF and (for videos) an mp4 under ``OUT/<prompt name>/seed-<seed>/student/``. With
``--teacher-steps N`` the base pipeline without the LoRA, at its own scheduler, ``N`` steps and
``--teacher-guidance``, samples the same noise beside it (``…/teacher/``), and each prompt gets ``sheet.png``:
one row per seed, teacher | student, first frames. A student distilled from the user's own LoRAs (the run's
``teacher_loras``) samples as its ``combined/`` LoRA on the stock base, and its teacher is the base with those LoRAs.

The fresh noise a few-step scheduler draws comes from ``scheduler.generator``, seeded per sample, so a seed gives
the same sample on every run (and the same as the reference host's validation for its seed).

A **block-causal student** (the export's ``simpletuner_dmd.json`` has ``streaming``: its family is causal) must not
run through the stock pipeline, which would run it bidirectionally. It streams instead: the family loads the base
network (with its block-causal switch), the student's LoRA goes onto it, and ``fewstep_sampling.sample_blocks``
generates block by block through the KV cache (``num_frame_per_block``, ``independent_first_frame``,
``context_noise``, ``kv_cache_window`` as trained). Each block is decoded as soon as it is done (the latents so far:
Wan's VAE is causal in time, so earlier frames do not change) and its new frames are written as
``frame-NNN.png`` at once; ``--frames`` may exceed the training length (the rolling cache window bounds the context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_file
from .errors import UserError
from .lora_files import load_into_pipeline, load_user_lora
from .plugins import get_plugin_manager, registered_families

STUDENT_FILE = "simpletuner_dmd.json"  # written by the reference host's export: what `sample` reads by default


@dataclass
class SampleRequest:
    base: str
    student: Path
    out: Path
    prompts: dict[str, str]
    seeds: list[int]
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    negative_prompt: str = ""
    teacher_steps: int = 0  # 0: no teacher samples
    teacher_guidance: float = 5.0
    ema: bool = False
    device: str | None = None
    fps: int = 16


def student_info(folder: Path) -> dict[str, Any]:
    """The export's description of a student folder; a folder without a student is one clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    info_file = folder / STUDENT_FILE
    weights = folder / "pytorch_lora_weights.safetensors"
    if not weights.is_file():
        what = "a full transformer (transformer/); load it with the pipeline directly" if (
            folder / "transformer").is_dir() else "no pytorch_lora_weights.safetensors"
        raise UserError(f"{folder}: not a student LoRA output folder ({what})")
    if info_file.is_file():
        try:
            return json.loads(info_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{info_file}: not valid JSON ({exc.msg})") from None
    return {}


def _save(frames, folder: Path, fps: int, *, frames_written: bool = False) -> Path:
    """``frames`` (F, H, W, 3) floats in [0, 1] → PNGs (unless ``frames_written``: streaming wrote them as they
    came), a GIF and an mp4 (F > 1); returns the file to show."""
    import imageio.v3 as iio
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = _to_bytes(frames)
    if not frames_written:
        _write_frames(frames, folder, first=0)
    if len(pixels) == 1:
        return folder / "frame-000.png"
    images = [Image.fromarray(frame) for frame in pixels]
    write_file(folder / "sample.gif", lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0))
    even = pixels[:, : pixels.shape[1] // 2 * 2, : pixels.shape[2] // 2 * 2]  # yuv420p needs even sides
    write_file(folder / "sample.mp4", lambda tmp: iio.imwrite(tmp, even, extension=".mp4", fps=fps,
                                                             codec="libx264", plugin="pyav")
               if _has_pyav() else _ffmpeg_mp4(tmp, even, fps))
    return folder / "sample.gif"


def _to_bytes(frames):
    import numpy as np

    return (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def _has_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def _ffmpeg_mp4(path: str, pixels, fps: int) -> None:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(path, (pixels.shape[2], pixels.shape[1]), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", output_params=["-f", "mp4"], quality=8)
    writer.send(None)
    for frame in pixels:
        writer.send(frame.tobytes())
    writer.close()


def _sheet(rows: list[list[Path]], path: Path) -> None:
    """A grid of the first frames: one row per seed, one column per variant."""
    from PIL import Image

    first = [[Image.open(p.parent / "frame-000.png").convert("RGB") for p in row] for row in rows]
    w, h = first[0][0].size
    sheet = Image.new("RGB", (w * len(first[0]), h * len(first)), "white")
    for r, row in enumerate(first):
        for c, image in enumerate(row):
            sheet.paste(image, (c * w, r * h))
    write_file(path, lambda tmp: sheet.save(tmp, format="PNG"))


def sample(request: SampleRequest, *, log=print) -> list[Path]:
    """Generate every prompt × seed (and the teacher's beside it when asked); returns the sheets written (or the
    student samples when there is no teacher)."""
    import torch
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    info = student_info(request.student)
    if info.get("streaming"):
        return sample_streaming(request, info, log=log)
    lora_folder = request.student / "ema" if request.ema else request.student
    if request.ema and not (lora_folder / "pytorch_lora_weights.safetensors").is_file():
        raise UserError(f"{request.student}: --ema, but the run kept no EMA (no ema/pytorch_lora_weights.safetensors)")
    width, height, frames = _shape(request, info)
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = DiffusionPipeline.from_pretrained(request.base)
    except (OSError, ValueError) as exc:
        raise UserError(f"sample: cannot load the base pipeline {request.base}: {str(exc).splitlines()[0]}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if info.get("boundary_ratio") is not None:  # a family with experts: the switch the student was trained with
        pipe.register_to_config(boundary_ratio=float(info["boundary_ratio"]))
    teacher_scheduler = pipe.scheduler
    # A student distilled from the user's own LoRAs (teacher_loras) runs as combined/ (their LoRAs and the student in
    # one) on the stock base; its teacher is the base with their LoRAs at their scales.
    user_loras = info.get("teacher_loras") or []
    if user_loras:
        lora_folder = lora_folder / info["combined_lora"]
    load_into_pipeline(_family_of(info), pipe, lora_folder, adapter_name="student")
    teacher_adapters = [f"teacher_{i}" for i in range(len(user_loras))]
    for name, entry in zip(teacher_adapters, user_loras):
        load_user_lora(pipe, entry, adapter_name=name)
    scheduler_dir = request.student / "scheduler"
    student_kwargs: dict[str, Any] = {}
    student_scheduler = teacher_scheduler
    if scheduler_dir.is_dir():
        from .fewstep_scheduler import FewStepFlowScheduler

        student_scheduler = FewStepFlowScheduler.from_pretrained(str(scheduler_dir))
        student_kwargs = {"num_inference_steps": len(student_scheduler.config.few_step_timesteps),
                          "guidance_scale": 1.0}
    else:
        student_kwargs = {"num_inference_steps": info.get("steps") or 30, "guidance_scale": 1.0}
    shape = dict(width=int(width), height=int(height))
    if _takes(pipe, "num_frames"):  # a video pipeline; an image pipeline has no frame count (and frames is 1)
        shape["num_frames"] = int(frames)
    elif int(frames) != 1:
        raise UserError(f"sample: --frames {frames}, but {type(pipe).__name__} makes images (one frame)")
    if info.get("max_sequence_length"):  # the prompt length the run encoded with (its tokenizer_max_length)
        shape["max_sequence_length"] = int(info["max_sequence_length"])

    def run(prompt: str, seed: int, *, teacher: bool):
        generator = torch.Generator().manual_seed(seed)
        if teacher:
            pipe.scheduler = teacher_scheduler
            if teacher_adapters:
                pipe.enable_lora()
                pipe.set_adapters(teacher_adapters, adapter_weights=[entry["scale"] for entry in user_loras])
            else:
                pipe.disable_lora()
            kwargs = {"num_inference_steps": request.teacher_steps, "guidance_scale": request.teacher_guidance,
                      "negative_prompt": request.negative_prompt or None}
        else:
            pipe.scheduler = student_scheduler
            pipe.enable_lora()
            if teacher_adapters:
                pipe.set_adapters(["student"])
            kwargs = dict(student_kwargs)
        if hasattr(pipe.scheduler, "generator"):
            pipe.scheduler.generator = generator  # the starting noise first, then each re-noise, as validation does
        with torch.no_grad():
            result = pipe(prompt=prompt, generator=generator, output_type="np", **shape, **kwargs)
        # (F, H, W, 3): a video pipeline's frames, or an image pipeline's one image as a one-frame clip
        return result.frames[0] if hasattr(result, "frames") else result.images[0][None]

    jobs = [(name, prompt, seed) for name, prompt in request.prompts.items() for seed in request.seeds]
    written: list[Path] = []
    by_prompt: dict[str, list[list[Path]]] = {}
    for name, prompt, seed in tqdm(jobs, desc="sampling", unit="sample"):
        folder = request.out / name / f"seed-{seed}"
        row = []
        if request.teacher_steps:
            row.append(_save(run(prompt, seed, teacher=True), folder / "teacher", request.fps))
        row.append(_save(run(prompt, seed, teacher=False), folder / "student", request.fps))
        by_prompt.setdefault(name, []).append(row)
        written.append(row[-1])
    if request.teacher_steps:
        written = []
        for name, rows in by_prompt.items():
            _sheet(rows, request.out / name / "sheet.png")
            written.append(request.out / name / "sheet.png")
    log(f"samples: {request.out}")
    return written


def _takes(pipe: Any, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(pipe.__call__).parameters


def _family_of(info: dict[str, Any]) -> Any:
    """The installed family the student folder names (its LoRA files and streaming are the family's); None for a
    folder that names none (written before the family was recorded: one LoRA file, loaded the default way)."""
    name = info.get("family")
    if name is None:
        return None
    families = registered_families(get_plugin_manager())
    if name not in families:
        raise UserError(f"sample: the student's family {name!r} is not installed")
    return families[name].cls()


def _shape(request: SampleRequest, info: dict[str, Any]) -> tuple[int, int, int]:
    width = request.width or info.get("width")
    height = request.height or info.get("height")
    frames = request.frames or info.get("frames")
    if not (width and height and frames):
        raise UserError("sample: --width, --height and --frames are needed (the student folder does not say them)")
    return int(width), int(height), int(frames)


def sample_streaming(request: SampleRequest, info: dict[str, Any], *, log=print) -> list[Path]:
    """A block-causal student, streamed block by block through its KV cache (the module docstring); frames are
    written as their block is done. Returns the samples written."""
    import torch

    from .fewstep_sampling import block_calls, sample_blocks

    if request.teacher_steps:
        raise UserError("sample: --teacher-steps is not supported for a block-causal (streaming) student; sample the "
                        "teacher with the bidirectional family's student folder or the stock pipeline")
    stream = info["streaming"]
    family = _family_of(info)
    lora_folder = request.student / "ema" if request.ema else request.student
    if not (lora_folder / "pytorch_lora_weights.safetensors").is_file():
        raise UserError(f"{lora_folder}: no pytorch_lora_weights.safetensors")
    width, height, frames = _shape(request, info)
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        network = family.load_network(request.base, dtype=torch.float32)
        components = family.load_components(request.base, text_encoder_path=None, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"sample: cannot load the base model {request.base}: {str(exc).splitlines()[0]}") from None
    network.load_lora_adapter(str(lora_folder), weight_name="pytorch_lora_weights.safetensors",
                              prefix="transformer", adapter_name="student")
    network.to(device).eval()
    for module in (components.vae, components.text_encoder):
        module.to(device)
    shape = family.latent_shape(components, width=width, height=height, frames=frames)
    steps = [int(t) for t in stream["timesteps"]]
    written: list[Path] = []
    for name, prompt in request.prompts.items():
        cond = family.encode_prompts(components, [prompt], max_length=info.get("max_sequence_length"))
        for seed in request.seeds:
            folder = request.out / name / f"seed-{seed}" / "student"
            folder.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn((1, *shape), generator=generator).to(device)
            flow = lambda x, t, c: family.predict_flow(network, x, t, c).float()  # noqa: E731
            predict, write, blocks = block_calls(family, network, flow, cond, noise,
                                                 frames_per_block=int(stream["num_frame_per_block"]),
                                                 independent_first_frame=bool(stream["independent_first_frame"]),
                                                 window=stream.get("kv_cache_window"))
            done: list[torch.Tensor] = []
            video: list = [None]  # the frames decoded so far, (F, H, W, 3): after the last block, the whole clip

            def on_block(b: int, x0: torch.Tensor, folder=folder, done=done, video=video, blocks=blocks) -> None:
                done.append(x0)
                pixels = family.decode_latents(components, torch.cat(done, dim=2))[0]  # (3, F, H, W) in [0, 1]
                shown = 0 if video[0] is None else len(video[0])
                video[0] = pixels.permute(1, 2, 3, 0).cpu().numpy()
                _write_frames(video[0][shown:], folder, first=shown)
                log(f"{name} seed {seed}: block {b + 1}/{len(blocks)} → frames {shown}–{len(video[0]) - 1}")

            with torch.no_grad():
                sample_blocks(predict, write, noise, steps, blocks, context_noise=float(stream["context_noise"]),
                              generator=generator, on_block=on_block)
            written.append(_save(video[0], folder, request.fps, frames_written=True))
    log(f"samples: {request.out}")
    return written


def _write_frames(frames, folder: Path, *, first: int) -> None:
    """``frames`` (n, H, W, 3) in [0, 1] as ``frame-{first + i:03d}.png``, each written atomically."""
    from PIL import Image

    for i, frame in enumerate(_to_bytes(frames)):
        image = Image.fromarray(frame)
        write_file(folder / f"frame-{first + i:03d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))


__all__ = ["STUDENT_FILE", "SampleRequest", "sample", "sample_streaming", "student_info"]
