"""The reference host's final export: what a user takes away from ``output_dir``.

- ``scheduler/``: the method's scheduler for stock pipelines (``distill_scheduler``), when it has one;
- ``pytorch_lora_weights.safetensors``: the student in the diffusers layout (the stock pipeline's ``load_lora_weights``;
  a family may write more files: Wan 2.2 A14B one per expert);
- ``<family>_<method>_<K>step_lora_rank<r>.safetensors``: the same student in the family's original layout (ComfyUI
  and most published LoRAs), when the family writes one (``original_lora_state``);
- ``ema/``: both files again for the EMA weights;
- ``README.md``: the model card (hub format, YAML metadata first);
- ``simpletuner_dmd.json``: what ``simpletuner-dmd sample`` reads (family, base, steps, the validation shape).

Everything is written into a temp folder beside them and renamed into place once all of it is complete
(``atomic.write_together``), so a crash or a full disk never leaves a half-written export under its final names.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...atomic import write_together
from ...flow import boundary_scalings
from ...lora_files import loading_code
from ...sample import STUDENT_FILE


@dataclass
class Export:
    """What a run hands over to be exported (besides the trained networks in ``job``)."""

    method_name: str | None
    method_cls: type | None
    method_config: dict[str, Any]
    steps: int  # optimizer steps trained
    student_lora: Callable[[], dict[str, torch.Tensor]] | None = None  # the student adapter's state (model_type lora)
    peft_config: Any = None  # and its peft config
    final_logs: dict[str, float] = field(default_factory=dict)
    sample: Path | None = None  # the last validation sample of the student (GIF or PNG), if any


def export_student(job: Any, export: Export, *, log=print) -> list[Path]:
    """Write everything listed in the module docstring; returns the files and folders written. All of it is written
    into a temp folder first and renamed into ``output_dir`` only once complete (``atomic.write_together``)."""
    out = job.out
    notes: list[str] = []
    names = write_together(out, lambda stage: _write_export(job, export, stage, notes), tag="export")
    for note in notes:
        log(note)
    return [out / name for name in names]


def _write_export(job: Any, export: Export, stage: Path, notes: list[str]) -> None:
    models, family, host, ema, out = job.models, job.family, job.host, job.ema, job.out
    scheduler = job.pm.hook.distill_scheduler()
    if scheduler is not None:
        scheduler.save_config(stage / "scheduler")
    original_files: list[str] = []
    if host["model_type"] == "lora":
        config = export.peft_config
        original_name = original_lora_name(family.name, export.method_name, scheduler, config.r)
        variants = [(stage, None)] + ([(stage / "ema", ema)] if ema is not None else [])
        for folder, swap in variants:
            folder.mkdir(parents=True, exist_ok=True)
            with (swap.swap_into() if swap is not None else contextlib.nullcontext()):
                state = export.student_lora()
                family.save_lora(state, folder, config)
                if original_name:
                    original_files = _write_original(family, state, config, folder, original_name, export, notes)
                    original_name = original_name if original_files else None
        notes.append(f"student LoRA: {out / 'pytorch_lora_weights.safetensors'}"
                     + (f" (original layout: {', '.join(original_files)})" if original_files else ""))
    else:
        models.network.save_pretrained(stage / "transformer")
        notes.append(f"student transformer: {out / 'transformer'}")
    w, h = host["validation_resolution"]
    info = {"family": family.name, "base_model": host["pretrained_model_name_or_path"], "method": export.method_name,
            "model_type": host["model_type"], "optimizer_steps": export.steps,
            "steps": len(scheduler.config.few_step_timesteps) if scheduler is not None else None,
            "width": w, "height": h, "frames": host["validation_num_video_frames"],
            "validation_prompt": host["validation_prompt"], "negative_prompt": host["validation_negative_prompt"],
            "original_lora": original_files[0] if original_files else None, "original_lora_files": original_files,
            "ema": ema is not None,
            "max_sequence_length": host.get("tokenizer_max_length")}
    stream = streaming_info(family, export)
    if stream is not None:  # a block-causal student: `sample` streams it; a stock pipeline would run it wrongly
        info["streaming"] = stream
    (stage / STUDENT_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    card = model_card(host=host, family=family, export=export, scheduler=scheduler, original_files=original_files,
                      out=out, has_ema=ema is not None)
    (stage / "README.md").write_text(card, encoding="utf-8")


def streaming_info(family: Any, export: Export) -> dict[str, Any] | None:
    """How a block-causal student must be run (the method's ``streaming(config)``), for a causal family only."""
    if export.method_cls is None or not family.causal:
        return None
    return export.method_cls.streaming(export.method_config)


def original_lora_name(family_name: str, method_name: str | None, scheduler: Any, rank: int) -> str:
    """Named like the published few-step LoRAs: family, method, steps, rank (``wan_dmd_3step_lora_rank16``)."""
    parts = [family_name.replace(" ", "_")]
    if method_name:
        parts.append(method_name)
    if scheduler is not None:
        parts.append(f"{len(scheduler.config.few_step_timesteps)}step")
    return "_".join(parts) + f"_lora_rank{rank}.safetensors"


def _write_original(family, state, config, folder: Path, name: str, export: Export, notes: list[str]) -> list[str]:
    """The student in the original layout (``family.original_lora_state``), as ``name`` — or, for a family whose
    converter returns one state per part (``{tag: state}``: Wan 2.2's two experts), as ``<name>_<tag>`` per part.
    Returns the file names written (none: the family has no original layout, or a module has no name there)."""
    convert = family.original_lora_state
    if convert is None:
        return []
    try:
        original = convert(state, config)
    except ValueError as exc:  # a module the original layout has no name for: the diffusers file still serves
        notes.append(f"warning: no original-layout LoRA ({exc})")
        return []
    from safetensors.torch import save_file

    parts = original if all(isinstance(v, dict) for v in original.values()) else {None: original}
    stem = name.removesuffix(".safetensors")
    metadata = {"format": "pt", "simpletuner_dmd_method": export.method_name or "none"}
    written = []
    for tag, part in parts.items():
        file = name if tag is None else f"{stem}_{tag}.safetensors"
        save_file({k: v.contiguous() for k, v in part.items()}, str(folder / file), metadata=metadata)
        written.append(file)
    return written


# --------------------------------------------------------------------------- the model card


def _yaml_list(items: list[str]) -> str:
    return "\n".join(f"- {json.dumps(item)}" for item in items)


def model_card(*, host: dict, family: Any, export: Export, scheduler: Any, original_files: list[str], out: Path,
               has_ema: bool) -> str:
    """The hub's model card format: YAML metadata, then how to use the student (diffusers and ComfyUI), its
    schedule, the validation sample and the training figures."""
    base = host["pretrained_model_name_or_path"] or ""
    method = export.method_name
    frames = host["validation_num_video_frames"]
    video = frames > 1
    prompts = card_prompts(host)
    sampled = sample_prompt(prompts, export.sample, out)
    # the card's example prompt: the validation sample's, else the config's first
    prompt = (sampled or next(iter(prompts.values()), ("", "a prompt")))[1]
    tags = ["lora" if host["model_type"] == "lora" else "full-finetune", "diffusers", "simpletuner-dmd",
            "text-to-video" if video else "text-to-image", family.name]
    if method:
        tags += ["distillation", method]
    lines = ["---", f"base_model: {json.dumps(base)}", "library_name: diffusers", "license: other",
             f"pipeline_tag: {'text-to-video' if video else 'text-to-image'}", "tags:", _yaml_list(tags), "---", ""]
    title = f"{family.name} {method.upper() if method else 'LoRA'} student" + (
        f", {len(scheduler.config.few_step_timesteps)} steps" if scheduler is not None else "")
    lines += [f"# {title}", "", f"Trained with [simpletuner-dmd](https://pypi.org/project/simpletuner-dmd/) from "
              f"`{base}` ({export.steps} optimizer steps" + (f", `distillation_method: {method}`" if method else "")
              + ").", ""]

    if scheduler is not None:
        cfg = scheduler.config
        timesteps = [float(t) for t in cfg.few_step_timesteps]
        sigmas = [t / float(cfg.num_train_timesteps) for t in timesteps] + [0.0]
        rule = {"x0_renoise": "predict x̂0, then re-noise to the next σ with fresh noise (the last step returns x̂0)",
                "euler": "one Euler step of the flow ODE from each σ to the next"}[cfg.step_rule]
        lines += ["## Sampling settings", "", "| setting | value |", "| --- | --- |",
                  f"| steps | {_steps_cell(cfg, len(timesteps))} |",
                  f"| timesteps | {', '.join(f'{t:g}' for t in timesteps)} |",
                  f"| σ list | {', '.join(f'{s:.4g}' for s in sigmas)} |",
                  "| shift | none: the σ list above is explicit (σ = t / 1000); a scheduler's shift must not be "
                  "applied on top |",
                  f"| step rule | {rule} |",
                  "| guidance | 1 (CFG off: the teacher's guidance is distilled into the student) |",
                  "| LoRA strength | 1.0 |"]
        if cfg.consistency_timestep_scaling is not None:
            c_skip, _ = boundary_scalings(torch.tensor([min(timesteps)]),
                                          timestep_scaling=float(cfg.consistency_timestep_scaling))
            lines.append(f"| x̂0 rule | LCM's boundary scalings at timestep_scaling "
                         f"{cfg.consistency_timestep_scaling:g} (c_skip ≤ {float(c_skip):.2g} at these timesteps) |")
        lines += [""]
        for note in ([] if export.method_cls is None else export.method_cls.usage_notes(export.method_config)):
            lines += [note, ""]

    stream = streaming_info(family, export)
    if stream is not None:
        lines += ["## Run it block by block (block-causal student)", "",
                  f"This student was trained block-causally (family `{family.name}`): it generates the video block by "
                  "block, each block attending to the blocks before it through a KV cache. A stock pipeline runs the "
                  "network bidirectionally (every frame attending to every frame), which is not how this student was "
                  "trained: its samples there are not this student's. Stream it instead (frames are written as each "
                  "block is done; `--frames` may exceed the training length):", "", "```bash",
                  f"simpletuner-dmd sample --base {json.dumps(base)} --student path/to/this/folder \\",
                  f"    --prompt {json.dumps(prompt)} --out samples/", "```", "",
                  "| streaming setting | value |", "| --- | --- |",
                  f"| timesteps per block | {', '.join(f'{t:g}' for t in stream['timesteps'])} |",
                  f"| latent frames per block | {stream['num_frame_per_block']}"
                  + (" (the first frame alone)" if stream["independent_first_frame"] else "") + " |",
                  f"| context written to the KV cache at timestep | {stream['context_noise']:g} |",
                  f"| KV cache window (latent frames) | {stream['kv_cache_window'] or 'all'} |", ""]
    pipeline_cls = family.pipeline_class
    lines += ["## Use it in diffusers", "", "```python", "import torch", f"from diffusers import {pipeline_cls}"]
    if scheduler is not None:
        lines.append("from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler")
    lines += ["", f"pipe = {pipeline_cls}.from_pretrained({json.dumps(base)})", *loading_code(family)]
    call = [f"    prompt={json.dumps(prompt)},"]
    if scheduler is not None:
        lines.append('pipe.scheduler = FewStepFlowScheduler.from_pretrained("path/to/this/folder", '
                     'subfolder="scheduler")')
        call += [f"    num_inference_steps={len(scheduler.config.few_step_timesteps)},", "    guidance_scale=1.0,"]
    w, h = host["validation_resolution"]
    call.append(f"    width={w}, height={h},")
    if host.get("tokenizer_max_length"):  # a base trained with shorter prompts must be run with them
        call.append(f"    max_sequence_length={host['tokenizer_max_length']},")
    lines += [*_pipeline_call(family.video, frames, call), "```", ""]
    if scheduler is not None:
        lines += ["Stock pipelines pass no generator to the scheduler's fresh noise: set `pipe.scheduler.generator = "
                  "torch.Generator().manual_seed(…)` to make a sample reproducible.", ""]

    lines += ["## Use it in ComfyUI", ""]
    if len(original_files) == 1:
        lines += [f"Load `{original_files[0]}` (the original key layout of the model's own code) with "
                  "*LoraLoaderModelOnly*, strength 1.0."]
    elif original_files:
        lines += ["The original key layout of the model's own code comes as one file per part of the model; load "
                  "each with its own *LoraLoaderModelOnly* on the model it names (strength 1.0 each): "
                  + ", ".join(f"`{name}`" for name in original_files) + "."]
    if original_files:
        if scheduler is not None:
            sampler = "lcm" if scheduler.config.step_rule == "x0_renoise" else "euler"
            lines += [f"Sample with *SamplerCustom*: sampler `{sampler}` (its step is this student's step rule), "
                      f"cfg 1.0, and the σ list above as the sigmas (a manual-sigmas node), so that no shift or "
                      "scheduler reshapes it."]
        lines += [*[f"\n{note}" for note in family.card_notes],
                  "", "(This layout is the one diffusers converts on load, which the tests check; ComfyUI itself was "
                  "not run where this was made.)", ""]
    else:
        lines += ["No original-layout file was written for this student (see the training log).", ""]

    if export.sample is not None:
        rel = export.sample.relative_to(out) if export.sample.is_relative_to(out) else export.sample
        seed = host["validation_seed"] if host["validation_seed"] is not None else host["seed"]
        lines += ["## Validation sample", "", f"![validation sample]({rel.as_posix()})", "",
                  f"{_prompt_line(sampled, export.sample)}, seed {seed}.", ""]

    lines += ["## Training", "", "| setting | value |", "| --- | --- |",
              f"| family | {family.name} |", f"| model_type | {host['model_type']} |",
              f"| LoRA rank / alpha | {host['lora_rank']} / {host['lora_alpha'] or host['lora_rank']} |",
              f"| optimizer steps | {export.steps} |", f"| learning rate | {host['learning_rate']:g} |",
              f"| batch size × accumulation | {host['train_batch_size']} × {host['gradient_accumulation_steps']} |"]
    for key, value in sorted(export.method_config.items()):
        lines.append(f"| {method}.{key} | {_cell(value)} |")
    if export.final_logs:
        lines += ["", "Last step's figures:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.5g} |" for k, v in sorted(export.final_logs.items()) if not k.startswith("passes/")]
    if has_ema:
        lines += ["", "`ema/` holds the EMA weights in both layouts."]
    return "\n".join(lines) + "\n"


def _pipeline_call(video_pipeline: bool, frames: int, call: list[str]) -> list[str]:
    """The card's pipeline call. A video pipeline (the family's ``video``, True unless it says otherwise: Wan's
    ``WanPipeline``) takes ``num_frames`` (its default is 81) and returns ``frames`` even for one frame; an image
    pipeline returns ``images``."""
    if not video_pipeline:
        return ["image = pipe(", *call, ").images[0]  # a PIL image"]
    if frames == 1:
        return ["image = pipe(", *call, "    num_frames=1,", '    output_type="pil",',
                ").frames[0][0]  # a PIL image: the one frame of the first (and only) video"]
    return ["frames = pipe(", *call, f"    num_frames={frames},",
            ").frames[0]  # ({frames}, H, W, 3) floats in [0, 1]; "
            'diffusers.utils.export_to_video(frames, "student.mp4", fps=16) writes them as a video']


def card_prompts(host: dict) -> dict[str, tuple[str, str]]:
    """Prompt folder → (where the prompt comes from, the prompt), as the host names its validation folders
    (``validation/step-N/<folder>/``): ``validation_prompt`` in ``validation``, then each prompt-library entry."""
    from .prompt_library import read_prompt_library

    prompts: dict[str, tuple[str, str]] = {}
    if host["validation_prompt"]:
        prompts["validation"] = ("validation_prompt", host["validation_prompt"])
    for key in ("validation_prompt_library", "user_prompt_library"):
        if host.get(key):
            found, _, _ = read_prompt_library(host[key], key)  # (checked, with every problem, before training)
            for folder, prompt in found.items():
                prompts.setdefault(folder, (key, prompt))
    return prompts


def sample_prompt(prompts: dict[str, tuple[str, str]], sample: Path | None, out: Path) -> tuple[str, str] | None:
    """(where from, prompt) of the validation sample ``sample`` (``validation/step-N/<folder>/<variant>/…``), or
    None without a sample or when its folder is none of ``prompts``."""
    if sample is None or not sample.is_relative_to(out / "validation"):
        return None
    parts = sample.relative_to(out / "validation").parts
    return prompts.get(parts[1]) if len(parts) > 2 else None


def _prompt_line(source: tuple[str, str] | None, sample: Path) -> str:
    if source is None:
        return f"Prompt: the one of folder `{sample.parent.parent.name}`"
    where, prompt = source
    return f"Prompt: {json.dumps(prompt, ensure_ascii=False)}" + ("" if where == "validation_prompt" else
                                                                  f" (from `{where}`)")


def _steps_cell(cfg: Any, count: int) -> str:
    schedule = getattr(cfg, "sampling_schedule", None)
    if schedule is not None:  # a consistency student: any count its skipping schedule holds
        return (f"{count} (or any count from 1 to {len(schedule) - 1}: the scheduler picks the points as the "
                "method's own sampler does)")
    return f"{count} (no other count: the student was trained for these)"


def _cell(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|")


__all__ = ["Export", "export_student", "model_card", "original_lora_name"]
