"""The reference host's final export: what a user takes away from ``output_dir``.

- ``scheduler/``: the method's scheduler for stock pipelines (``distill_scheduler``), when it has one;
- ``pytorch_lora_weights.safetensors``: the student in the diffusers layout (the stock pipeline's ``load_lora_weights``;
  a family may write more files: Wan 2.2 A14B one per expert);
- ``<family>_<method>_<K>step_lora_rank<r>.safetensors``: the same student in the family's original layout (ComfyUI
  and most published LoRAs), when the family writes one (``original_lora_state``);
- ``combined/``: with ``teacher_loras``, one LoRA for the stock base holding the user's LoRAs (at their scales) and
  the student, concatenated by rank (``teacher_loras.combined_lora``), in both layouts;
- ``ema/``: the files above again for the EMA weights;
- ``README.md``: the model card (hub format, YAML metadata first; its text is ``card_template.py``'s pieces);
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
from ...teacher_loras import combined_lora, read_teacher_loras
from . import card_template as card
from .prompt_library import read_prompt_library

COMBINED = "combined"  # the folder of the one LoRA for the stock base (a run with teacher_loras)


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
    combined_files: list[str] = []
    if host["model_type"] == "lora":
        config = export.peft_config
        original_name = original_lora_name(family.name, export.method_name, scheduler, config.r)
        users = read_teacher_loras(family, host["teacher_loras"]) if host.get("teacher_loras") else None
        variants = [(stage, None)] + ([(stage / "ema", ema)] if ema is not None else [])
        for folder, swap in variants:
            folder.mkdir(parents=True, exist_ok=True)
            with (swap.swap_into() if swap is not None else contextlib.nullcontext()):
                state = export.student_lora()
                family.save_lora(state, folder, config)
                if original_name:
                    original_files = _write_original(family, state, config, folder, original_name, export, notes)
                    original_name = original_name if original_files else None
                if users is not None:
                    combined_files = _write_combined(family, state, config, users, folder / COMBINED, export,
                                                     scheduler, notes)
        notes.append(f"student LoRA: {out / 'pytorch_lora_weights.safetensors'}"
                     + (f" (original layout: {', '.join(original_files)})" if original_files else ""))
        if users is not None:
            notes.append(f"combined LoRA (your teacher_loras and the student, for the stock base): "
                         f"{out / COMBINED / 'pytorch_lora_weights.safetensors'}"
                         + (f" (original layout: {', '.join(combined_files)})" if combined_files else ""))
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
    if host.get("teacher_loras"):  # the student runs on the user's model: with their LoRAs, or combined/ alone
        info.update(teacher_loras=host["teacher_loras"],
                    combined_lora=COMBINED if host["model_type"] == "lora" else None)
    if family.boundary_ratio is not None:  # a family with experts: where they switched in training (`sample` sets it)
        info["boundary_ratio"] = family.boundary_ratio
    stream = streaming_info(family, export)
    if stream is not None:  # a block-causal student: `sample` streams it; a stock pipeline would run it wrongly
        info["streaming"] = stream
    (stage / STUDENT_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    card = model_card(host=host, family=family, export=export, scheduler=scheduler, original_files=original_files,
                      out=out, has_ema=ema is not None, combined_files=combined_files)
    (stage / "README.md").write_text(card, encoding="utf-8")


def _write_combined(family, state, config, users, folder: Path, export: Export, scheduler: Any,
                    notes: list[str]) -> list[str]:
    """``combined/``: the user's ``teacher_loras`` and the student as one LoRA for the stock base
    (``teacher_loras.combined_lora``), in the diffusers layout (``family.save_lora``) and, when the family has one,
    the original layout; returns the original-layout file names."""
    combined, combined_config = combined_lora(state, config, users, family.lora_parts)
    folder.mkdir(parents=True, exist_ok=True)
    family.save_lora(combined, folder, combined_config)
    name = original_lora_name(family.name, export.method_name, scheduler, combined_config.r)
    return _write_original(family, combined, combined_config, folder,
                           name.replace("_lora_rank", "_combined_lora_rank"), export, notes)


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
               has_ema: bool, combined_files: list[str] = ()) -> str:
    """The hub's model card format: YAML metadata, then how to use the student (diffusers and ComfyUI), its
    schedule, the validation sample and the training figures. The text is ``card_template``'s; this computes the
    values and picks the pieces."""
    base = host["pretrained_model_name_or_path"] or ""
    method = export.method_name
    video = host["validation_num_video_frames"] > 1
    prompts = card_prompts(host)
    sampled = sample_prompt(prompts, export.sample, out)
    # the card's example prompt: the validation sample's, else the config's first
    prompt = (sampled or next(iter(prompts.values()), ("", "a prompt")))[1]
    tags = ["lora" if host["model_type"] == "lora" else "full-finetune", "diffusers", "simpletuner-dmd",
            "text-to-video" if video else "text-to-image", family.name]
    if method:
        tags += ["distillation", method]
    steps = len(scheduler.config.few_step_timesteps) if scheduler is not None else None
    return card.CARD.substitute(
        base=base, base_json=json.dumps(base), pipeline_tag="text-to-video" if video else "text-to-image",
        tags=_yaml_list(tags),
        title=f"{family.name} {method.upper() if method else 'LoRA'} student" + (
            f", {steps} steps" if steps is not None else ""),
        steps=export.steps, method_clause=f", `distillation_method: {method}`" if method else "",
        own_model=_own_model(host, base, combined_files), sampling=_sampling(scheduler, export),
        streaming=_streaming(family, export, base, prompt),
        diffusers=_diffusers(host, family, scheduler, base, prompt),
        comfyui=_comfyui(family, scheduler, original_files), sample=_sample(host, export, sampled, out),
        training=_training(host, family, export, has_ema))


def _own_model(host: dict, base: str, combined_files: list[str]) -> str:
    """A LoRA student distilled from the user's ``teacher_loras``: use it with them at their scales, or ``combined/``
    alone on the stock base."""
    if not host.get("teacher_loras") or host["model_type"] != "lora":
        return ""
    loras = "".join(card.OWN_LORA.substitute(path=entry["path"], scale=f"{entry['scale']:g}",
                                             into="" if entry["into"] == "transformer" else f", into `{entry['into']}`")
                    for entry in host["teacher_loras"])
    original = "" if not combined_files else card.COMBINED_ORIGINAL.substitute(
        files=", ".join(f"`{COMBINED}/{name}`" for name in combined_files))
    return card.OWN_MODEL.substitute(base=base, loras=loras, combined_original=original)


def _sampling(scheduler: Any, export: Export) -> str:
    """The student's schedule (a method with a scheduler), and the method's usage notes under it."""
    if scheduler is None:
        return ""
    cfg = scheduler.config
    timesteps = [float(t) for t in cfg.few_step_timesteps]
    sigmas = [t / float(cfg.num_train_timesteps) for t in timesteps] + [0.0]
    x0_rule = ""
    if cfg.consistency_timestep_scaling is not None:
        c_skip, _ = boundary_scalings(torch.tensor([min(timesteps)]),
                                      timestep_scaling=float(cfg.consistency_timestep_scaling))
        x0_rule = card.X0_RULE.substitute(scaling=f"{cfg.consistency_timestep_scaling:g}",
                                          c_skip=f"{float(c_skip):.2g}")
    notes = [] if export.method_cls is None else export.method_cls.usage_notes(export.method_config)
    return card.SAMPLING.substitute(
        steps_cell=_steps_cell(cfg, len(timesteps)), timesteps=", ".join(f"{t:g}" for t in timesteps),
        sigmas=", ".join(f"{s:.4g}" for s in sigmas), step_rule=card.STEP_RULES[cfg.step_rule], x0_rule=x0_rule,
        usage_notes="".join(card.USAGE_NOTE.substitute(note=note) for note in notes))


def _streaming(family: Any, export: Export, base: str, prompt: str) -> str:
    """How a block-causal student is run block by block (``streaming_info``), for such a student only."""
    stream = streaming_info(family, export)
    if stream is None:
        return ""
    return card.STREAMING.substitute(
        family=family.name, base_json=json.dumps(base), prompt_json=json.dumps(prompt),
        timesteps=", ".join(f"{t:g}" for t in stream["timesteps"]),
        frames_per_block=f"{stream['num_frame_per_block']}"
        + (card.FIRST_FRAME_ALONE if stream["independent_first_frame"] else ""),
        context_noise=f"{stream['context_noise']:g}", window=stream["kv_cache_window"] or "all")


def _diffusers(host: dict, family: Any, scheduler: Any, base: str, prompt: str) -> str:
    """The stock pipeline's code: load the student (and the scheduler), set the pipeline up as the run had it (the
    family's ``pipeline_setup_code``: Wan 2.2 A14B's boundary), then one call (with the second expert's guidance
    off too, for a family with experts)."""
    w, h = host["validation_resolution"]
    args = card.CALL_ARGS.substitute(
        prompt_json=json.dumps(prompt), width=w, height=h,
        steps_args="" if scheduler is None else card.STEPS_ARGS.substitute(
            steps=len(scheduler.config.few_step_timesteps),
            guidance_2=card.GUIDANCE_2 if family.expert_guidance is not None else ""),
        max_sequence_length=card.MAX_SEQUENCE_LENGTH.substitute(length=host["tokenizer_max_length"])
        if host.get("tokenizer_max_length") else "")  # a base trained with shorter prompts must be run with them
    if family.clip_condition is not None:  # image-to-video: the first frame the validation samples continued
        image = Path(host.get("validation_image") or "first_frame.png").name
        args = card.FIRST_FRAME_ARG.substitute(image_json=json.dumps(image)) + args
    return card.DIFFUSERS.substitute(
        pipeline_class=family.pipeline_class, base_json=json.dumps(base),
        loading="\n".join(loading_code(family) + (family.pipeline_setup_code() if family.pipeline_setup_code else [])),
        scheduler_import=("" if scheduler is None else card.SCHEDULER_IMPORT)
        + (card.FIRST_FRAME_IMPORT if family.clip_condition is not None else ""),
        scheduler_load="" if scheduler is None else card.SCHEDULER_LOAD,
        call=_pipeline_call(family.video, host["validation_num_video_frames"], args),
        generator_note="" if scheduler is None else card.GENERATOR_NOTE)


def _pipeline_call(video_pipeline: bool, frames: int, args: str) -> str:
    """The card's pipeline call. A video pipeline (the family's ``video``, True unless it says otherwise: Wan's
    ``WanPipeline``) takes ``num_frames`` (its default is 81) and returns ``frames`` even for one frame; an image
    pipeline returns ``images``."""
    if not video_pipeline:
        return card.CALL_IMAGE.substitute(args=args)
    if frames == 1:
        return card.CALL_ONE_FRAME.substitute(args=args)
    return card.CALL_VIDEO.substitute(args=args, frames=frames)


def _comfyui(family: Any, scheduler: Any, original_files: list[str]) -> str:
    """Which original-layout file(s) to load (one, or one per part), the sampler and the family's notes; or that none
    was written."""
    if not original_files:
        return card.COMFYUI.substitute(body=card.COMFYUI_NONE)
    sampler = "" if scheduler is None else card.COMFYUI_SAMPLER.substitute(
        sampler="lcm" if scheduler.config.step_rule == "x0_renoise" else "euler")
    notes = "".join(card.COMFYUI_NOTE.substitute(note=note) for note in family.card_notes)
    if len(original_files) == 1:
        body = card.COMFYUI_ONE_FILE.substitute(file=original_files[0], sampler=sampler, notes=notes)
    else:
        body = card.COMFYUI_PER_PART.substitute(files=", ".join(f"`{name}`" for name in original_files),
                                                sampler=sampler, notes=notes)
    return card.COMFYUI.substitute(body=body)


def _sample(host: dict, export: Export, sampled: tuple[str, str] | None, out: Path) -> str:
    """The last validation sample of the student, with its prompt and seed, when there is one."""
    if export.sample is None:
        return ""
    rel = export.sample.relative_to(out) if export.sample.is_relative_to(out) else export.sample
    seed = host["validation_seed"] if host["validation_seed"] is not None else host["seed"]
    return card.SAMPLE.substitute(path=rel.as_posix(), prompt_line=_prompt_line(sampled, export.sample), seed=seed)


def _training(host: dict, family: Any, export: Export, has_ema: bool) -> str:
    """The run's settings, the method's config, the last step's figures (no pass counts) and the EMA note."""
    rows = "".join(card.ROW.substitute(key=f"{export.method_name}.{key}", value=_cell(value))
                   for key, value in sorted(export.method_config.items()))
    last_logs = "" if not export.final_logs else card.LAST_LOGS.substitute(rows="".join(
        card.ROW.substitute(key=k, value=f"{v:.5g}") for k, v in sorted(export.final_logs.items())
        if not k.startswith("passes/")))
    return card.TRAINING.substitute(
        family=family.name, model_type=host["model_type"], rank=host["lora_rank"],
        alpha=host["lora_alpha"] or host["lora_rank"], steps=export.steps, learning_rate=f"{host['learning_rate']:g}",
        batch_size=host["train_batch_size"], accumulation=host["gradient_accumulation_steps"], method_rows=rows,
        last_logs=last_logs, ema_note=card.EMA_NOTE if has_ema else "")


def card_prompts(host: dict) -> dict[str, tuple[str, str]]:
    """Prompt folder → (where the prompt comes from, the prompt), as the host names its validation folders
    (``validation/step-N/<folder>/``): ``validation_prompt`` in ``validation``, then each prompt-library entry."""
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
        return card.STEPS_ANY_COUNT.substitute(count=count, most=len(schedule) - 1)
    return card.STEPS_FIXED.substitute(count=count)


def _cell(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|")


__all__ = ["Export", "export_student", "model_card", "original_lora_name"]
