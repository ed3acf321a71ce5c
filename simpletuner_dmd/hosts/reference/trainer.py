"""The reference host trainer: ``simpletuner-dmd train --config config.json``. One readable loop on accelerate.

What happens, top to bottom (``train``; each step names the function that does it):

1. ``_load``: read and validate the config (all errors at once, before any weights load; ``run_config.py``); pick
   the model family and method from the classes every plugin hands to ``register_model_families`` and
   ``register_methods`` (``plugins.py``).
2. ``set_up`` (steps 2–5, into one ``Run``): the accelerator and the family; the resume checkpoint, found before
   anything loads. The data: load the family's VAE and text encoder; encode the dataset's media and captions once into
   ``cache_dir`` (``_build_dataset``).
3. ``set_up``, the student (``build_models``): load the network (the teacher's weights, with the user's
   ``teacher_loras`` merged in: ``frozen_base``), quantize the frozen base (int8-quanto) if asked, add the student's
   LoRA adapter (``model_type: lora``) or make every weight trainable with a frozen teacher copy (``model_type: full``).
4. ``set_up``, the method: register the selected method's instance and call ``distill_setup`` (DMD adds its
   fake-score adapter and optimizer).
5. ``set_up``, the optimizer: the student's optimizer and LR schedule, ``accelerator.prepare``, resume
   (``_load_checkpoint``, which calls ``distill_load_state``) if asked.
6. The loop, in ``_run``: a baseline validation, then ``training_step`` per optimizer step::

       for each micro-batch:  distill_loss → backward (the method's loss, or the host's flow-matching loss)
       student: clip, optimizer.step, zero_grad (skipped when no micro-batch returned a student loss)
       distill_after_optimizer_step     (DMD: the fake score's update)
       LR schedule step, EMA update, distill_metrics → tracker and progress bar

   and after it ``checkpoint_and_validate``: checkpoint (``_save_checkpoint``, which calls ``distill_save_state``) and
   validation (``validation.py``; ``distill_sampler``) on their intervals and at the last step.
7. ``finish``: the digits FD report (``Validator.fd_report``), the student's LoRA in the diffusers format in
   ``output_dir`` (``export.py``), with the method's scheduler for stock pipelines (``distill_scheduler``) in
   ``output_dir/scheduler`` when it has one; the closing lines and the webhooks' and hub's last word (``notify.py``).

No exception in the loop is caught: a user error stops the run with one line (``cli.py``), a bug with its traceback.
The webhooks, the hub and the digits FD are optional modules beside the loop, each reached through one call
(``Notifier``, ``Validator.fd_report``) and doing nothing unless its keys are set.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm  # (latent_cache imports it too: no cost of its own here)

from ...adapters import named_adapter_parameters
from ...atomic import write_file
from ...config import read_json
from ...errors import ConfigError, UserError
from ...flow import add_noise, shift_sigma
from ...lora_files import MAIN_FILE, read_lora
from ...lr_schedules import build_lr_lambda
from ...nonfinite import NonFiniteGuard
from ...offload import ActivationOffload
from ...optimizers import adamw
from ...plugins import get_plugin_manager
from ...processes import from_main
from ...state_io import load_state, load_weights_into, rng_state, save_state, save_weights, set_rng_state
from ...teacher_loras import merge_teacher_loras
from ...types import Batch, RunContext, StepInfo, StepLoss, step_generator
from .backends import load_backend_config
from .batches import BucketBatchSampler, collate
from .checkpoint import begin_checkpoint, commit_checkpoint, latest_checkpoint, resolve_resume
from .context_parallel import layout, parallel_network
from .ema import EMA
from .export import Export, export_student
from .fsdp import fsdp_warning, sharding
from .latent_cache import build_cache
from .notify import Notifier
from .prompt_library import library_prompts
from .run_config import RunConfig, load_config, validate_config
from .validation import Validator

STUDENT_ADAPTER = "student"


def log(message: str) -> None:
    """One line above the progress bar, from the main process only (launchers set RANK in every process)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    tqdm.write(f"[simpletuner-dmd] {message}")  # above the progress bar, not inside it


@dataclass
class Models:
    network: torch.nn.Module  # the student (adapters on the frozen base, or a fully trainable copy)
    teacher: torch.nn.Module | None  # a separate frozen teacher (model_type full only)
    student_params: dict[str, torch.nn.Parameter]  # what the student's optimizer trains, by name


@dataclass
class Job:
    """What the checkpoint and export helpers need of a run: its config, family, plugins, accelerator and output
    folder, and the student's trained state (network and parameters, optimizer, LR schedule, EMA)."""

    host: dict
    family: Any
    pm: Any
    accelerator: Any
    out: Path
    models: Models
    optimizer: Any
    scheduler: Any
    ema: Any


@dataclass
class Run(Job):
    """The whole run as ``set_up`` leaves it: the ``Job`` and what the loop needs besides. ``state`` is what a
    checkpoint saves and a resume restores; ``logs`` the last optimizer step's metrics (the model card quotes them)."""

    rc: RunConfig
    notify: Notifier
    seed: int
    network: torch.nn.Module  # ``models.network`` as ``accelerator.prepare`` returned it (the DDP wrapper, if any)
    max_steps: int
    state: dict[str, int]  # global_step, batches_consumed
    batches: Iterator[tuple[int, Batch]]
    loss_fn: Callable[[Batch], torch.Tensor]  # the host's own loss (plain fine-tuning, or a method's host_loss)
    validate: Validator
    guard: NonFiniteGuard
    progress: Any  # the tqdm bar
    offload: Callable[[], Any]  # activation_offload's context, or a null one
    shown: tuple[str, ...]  # the metrics the method puts on the progress bar
    logs: dict[str, float] = field(default_factory=dict)


def train(config_path: str | Path, *, overrides: dict[str, Any] | None = None, plugins: tuple = ()) -> Path:
    """Run a whole training job; returns ``output_dir``. ``overrides`` replace config keys and ``plugins`` are extra
    plugin objects to register (tests, benchmarks). Webhooks hear of its start, checkpoints, validations, end and
    any error (which is then raised as it was); the hub receives checkpoints and the final output when asked."""
    pm = get_plugin_manager(extra=plugins)
    rc = _load(config_path, pm, overrides)
    notify = Notifier(rc.host, log=log)
    try:
        return _run(rc, pm, notify)
    except BaseException as exc:
        notify.failed(exc)
        raise
    finally:
        notify.close()


def _run(rc: RunConfig, pm, notify: Notifier) -> Path:
    """The recipe: set-up, a baseline validation, the loop of optimizer steps with its checkpoints and validations,
    the finish."""
    run = set_up(rc, pm, notify)
    host = run.host
    if not host["validation_disable"] and not host["disable_benchmark"] and run.state["global_step"] == 0:
        # the baseline (SimpleTuner's "benchmark"): the untrained student beside the teacher
        _validation_round(run, 0, "baseline samples before training")
    try:  # the bar is closed on the way out too, so an error line starts on a line of its own
        while run.state["global_step"] < run.max_steps:
            run.logs = training_step(run)
            checkpoint_and_validate(run)
    finally:
        run.progress.close()
    return finish(run)


def set_up(rc: RunConfig, pm, notify: Notifier) -> Run:
    """Steps 2–5 of the module docstring: the accelerator, the data, the student, the method, the optimizer and the
    resume; returns the ``Run`` the loop steps (its progress bar open, its network in train mode)."""
    # accelerate takes longer to import than the rest of the host
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    host = rc.host
    for warning in rc.warnings:
        log(f"warning: {warning}")
    out = Path(host["output_dir"])
    seed = host["seed"] if host["seed"] is not None else 0

    if host["torch_num_threads"]:
        torch.set_num_threads(host["torch_num_threads"])
    mixed = host["mixed_precision"]
    if mixed != "no" and not torch.cuda.is_available():
        log(f"warning: mixed_precision: {mixed} needs a GPU; this run computes in fp32 on the CPU")
        mixed = "no"
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed]
    if host["optimizer"] == "adamw_bf16":
        log("note: optimizer adamw_bf16 maps to torch AdamW on fp32 trainable weights (bf16 compute via autocast)")
    _configure_wandb(host, out)
    accelerator = Accelerator(
        gradient_accumulation_steps=host["gradient_accumulation_steps"],
        mixed_precision="no",  # autocast is per network call (see families), never one region around a step
        log_with=None if host["report_to"] == "none" else host["report_to"],
        project_dir=str(out),
        # Two adapters share one wrapped network and each backward reaches one of them only.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    notify.main = accelerator.is_main_process  # only the main process talks to webhooks and the hub
    one_process_fsdp = fsdp_warning(host, accelerator.num_processes)
    if one_process_fsdp:
        log(f"warning: {one_process_fsdp}")
    spread = layout(host, accelerator)  # context_parallel_size: groups of processes share one sample
    # per-process noise, the same within a context-parallel group; draws that must agree use StepInfo.generator
    set_seed(seed + spread.data_parallel_rank)
    family = rc.family_cls(autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype)
    if family.configure is not None:  # the family's own host keys (Wan 2.2 A14B: boundary_ratio), before it loads
        family.configure(host)

    # Before anything loads, so a damaged checkpoint named by the user costs no model loading. The main process
    # resolves (it may clean up a crashed save's temporary folder, checks files against the manifest) and tells the
    # others.
    resume_dir = from_main(accelerator, resolve_resume(out, host["resume_from_checkpoint"],
                                                        warn=lambda m: log(f"warning: {m}"))
                            if accelerator.is_main_process else None)

    # ---- 2. data: latents and text embeddings, computed once into the cache
    components = family.load_components(host["pretrained_model_name_or_path"],
                                        text_encoder_path=host["pretrained_t5_model_name_or_path"],
                                        dtype=weight_dtype)
    quantize_frozen(components.text_encoder, host["text_encoder_1_precision"], "text encoder")
    components.vae.to(accelerator.device)
    components.text_encoder.to(accelerator.device)
    text_length = {} if host["tokenizer_max_length"] is None else {"max_length": host["tokenizer_max_length"]}
    encode_prompts = lambda texts: family.encode_prompts(components, texts, **text_length)
    dataset = _build_dataset(host, family, components, encode_prompts, accelerator)
    prompts = _validation_prompts(host)
    prompt_conds = {name: encode_prompts([text]) for name, text in prompts.items()}
    if family.clip_condition is not None and prompt_conds:  # image-to-video: every prompt from validation_image
        clip = family.clip_condition(components, _validation_clip(host, family).to(accelerator.device))
        prompt_conds = {name: family.attach_clip_condition(cond, clip) for name, cond in prompt_conds.items()}
    negative_cond = encode_prompts([host["validation_negative_prompt"]])
    empty_cond = encode_prompts([""])  # caption dropout in the host's own loss

    # ---- 3. the student
    new_network = lambda: frozen_base(host, family, weight_dtype)
    models = build_models(host, family, accelerator, new_network=new_network, distilling=rc.method_cls is not None)

    # ---- 4. the method
    method = None
    shown = () if rc.method_cls is None else tuple(rc.method_cls.progress_metrics)  # the method names its bar's logs
    if rc.method_cls is not None:
        method = rc.method_cls(rc.method_config)
        pm.register(method, name=f"method:{rc.method_name}")
        pm.hook.distill_setup(run=RunContext(
            host_config=host, method_config=rc.method_config, family=family, student=models.network,
            accelerator=accelerator, encode_prompts=encode_prompts,
            negative_prompt=host["validation_negative_prompt"], output_dir=out, model_type=host["model_type"],
            student_adapter=STUDENT_ADAPTER if host["model_type"] == "lora" else None,
            load_base=lambda: new_network().to(accelerator.device),
            teacher=models.teacher, seed=seed, warn=lambda m: log(f"warning: {m}"),
            data_parallel_rank=spread.data_parallel_rank,
        ))
    components.text_encoder = None  # every prompt is encoded now; free the encoder
    log(f"method: {rc.method_name or 'none (plain fine-tuning)'}; family: {family.name}; "
        f"trainable student parameters: {sum(p.numel() for p in models.student_params.values()):,}")

    # ---- 5. optimizer, schedule, prepare, resume
    sampler = BucketBatchSampler(dataset, host["train_batch_size"], seed=seed,
                                 drop_last=not host["disable_bucket_pruning"])
    max_steps = _max_steps(host, sampler)
    optimizer = adamw(models.student_params.values(), kind=host["optimizer"], lr=host["learning_rate"],
                      betas=(host["adam_beta1"], host["adam_beta2"]), eps=host["adam_epsilon"],
                      weight_decay=host["adam_weight_decay"])
    lr_lambda = build_lr_lambda(host["lr_scheduler"], warmup_steps=host["lr_warmup_steps"], total_steps=max_steps,
                                min_lr_ratio=host["lr_end"] / host["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    # every adapter exists by now: the base split (context_parallel_size) and/or sharded (fsdp_enable), else DDP
    split = spread.context_parallel > 1
    network = parallel_network(models.network, host, accelerator)
    if network is None:
        network, optimizer = accelerator.prepare(models.network, optimizer)
    else:
        optimizer = accelerator.prepare_optimizer(optimizer)
    if split:
        log(f"context_parallel_size: each sample's tokens split over {spread.context_parallel} processes (Ulysses), "
            f"{spread.data_parallel_size} data-parallel group(s)")
    if sharding(host, accelerator):
        log(f"fsdp_enable: the frozen base sharded over {accelerator.num_processes} processes (FSDP2)")
    ema = EMA(dict(models.student_params), host["ema_decay"], host["ema_update_interval"]) if host["use_ema"] else None

    state = {"global_step": 0, "batches_consumed": 0}
    job = Job(host=host, family=family, pm=pm, accelerator=accelerator, out=out, models=models, optimizer=optimizer,
              scheduler=scheduler, ema=ema)
    if resume_dir is not None:
        state = _load_checkpoint(job, resume_dir)
        log(f"resumed from {resume_dir} at step {state['global_step']}")
    elif host["resume_from_checkpoint"]:
        log(f"resume_from_checkpoint: no checkpoint in {out} yet; starting from step 0")
    sampler.skip_to(state["batches_consumed"])

    if host["report_to"] != "none":
        accelerator.init_trackers(host["tracker_project_name"], config=_loggable(host, rc),
                                  init_kwargs={"wandb": {"name": host["tracker_run_name"], "dir": str(out)}})

    notify.started(f"training started: {rc.method_name or 'plain fine-tuning'} on {family.name} "
                   f"({host['pretrained_model_name_or_path']}), steps {state['global_step']} → {max_steps}",
                   step=state["global_step"])

    # ---- what the loop needs: the batches, the host's loss, validation, the guard, the progress bar
    batches = _batches(dataset, sampler, state["batches_consumed"], accelerator, family,
                       rank=spread.data_parallel_rank, world=spread.data_parallel_size)
    loss_fn = _host_loss_fn(family, network, host, empty_cond)
    # validation runs on the main process alone: it calls the bare module, never the (DDP) wrapper
    validate = Validator(host=host, family=family, components=components, models=models, pm=pm,
                         distilling=method is not None, ema=ema, prompt_conds=prompt_conds, negative_cond=negative_cond,
                         accelerator=accelerator, out=out, seed=seed, every_process=sharding(host, accelerator) or split,
                         warn=lambda message: log(f"warning: {message}"))
    guard = NonFiniteGuard("student", host["nonfinite_skip_limit"])
    progress = tqdm(total=max_steps, initial=state["global_step"], desc="training",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    network.train()
    # activation_offload: what the student's and the critic's forwards save for their backward lives on the CPU
    offload = ActivationOffload if host["activation_offload"] else contextlib.nullcontext
    return Run(**vars(job), rc=rc, notify=notify, seed=seed, network=network, max_steps=max_steps, state=state,
               batches=batches, loss_fn=loss_fn, validate=validate, guard=guard, progress=progress, offload=offload,
               shown=shown)


def training_step(run: Run) -> dict[str, float]:
    """Step 6 of the module docstring, once: ``gradient_accumulation_steps`` micro-batches, the student's optimizer
    step, ``distill_after_optimizer_step``, the LR schedule and the EMA; returns the step's logs (the micro-batches'
    means, the method's ``distill_metrics``, the LR), which also go to the trackers and the progress bar."""
    host, pm, accelerator, network, state = run.host, run.pm, run.accelerator, run.network, run.state
    accum = host["gradient_accumulation_steps"]
    step_logs: dict[str, list[float]] = {}
    step_losses: list[torch.Tensor] = []
    student_stepped = False
    for micro in range(accum):
        state["batches_consumed"], batch = next(run.batches)
        info = _step_info(run.seed, state["global_step"], micro, accum, accelerator, network)
        with accelerator.accumulate(network), run.offload() as saved:
            result: StepLoss | None = pm.hook.distill_loss(batch=batch, step=info,
                                                           host_loss=lambda b=batch: run.loss_fn(b))
            if result is None:  # no method, or the method lets the host's loss stand
                result = StepLoss(run.loss_fn(batch))
                result.logs["loss"] = float(result.loss.detach())
            if result.loss is not None:
                accelerator.backward(result.loss)
                step_losses.append(result.loss.detach())
                student_stepped = True
        for key, value in result.logs.items():
            step_logs.setdefault(key, []).append(value)
        if saved is not None:
            step_logs.setdefault("activation_offload_gib", []).append(saved.offloaded_bytes / 2 ** 30)
    if student_stepped:
        finite = run.guard.finite(run.models.student_params.values(), *step_losses)
        run.guard.record(finite, state["global_step"])  # raises after too many in a row
        if finite:
            _clip(accelerator, list(run.models.student_params.values()), host)
            run.optimizer.step()
        student_stepped = finite
    run.optimizer.zero_grad(set_to_none=True)
    info = _step_info(run.seed, state["global_step"], accum - 1, accum, accelerator, network)
    with run.offload():  # the critic's forward and backward
        pm.hook.distill_after_optimizer_step(step=info)
    run.scheduler.step()
    state["global_step"] += 1
    if run.ema is not None:
        run.ema.update(state["global_step"])

    logs = {key: sum(values) / len(values) for key, values in step_logs.items()}
    for extra in pm.hook.distill_metrics(step=info):
        logs.update(extra or {})
    logs["lr"] = run.scheduler.get_last_lr()[0]
    logs["student_updated"] = float(student_stepped)
    logs["nonfinite/student_skipped"] = float(run.guard.skipped)
    accelerator.log(logs, step=state["global_step"])
    run.progress.update(1)
    run.progress.set_postfix({k: f"{logs[k]:.4g}" for k in (*run.shown, "loss", "lr") if k in logs})
    return logs


def checkpoint_and_validate(run: Run) -> None:
    """After an optimizer step: a checkpoint and a validation round when the step is on their interval, and both
    after the last step."""
    host, out, step = run.host, run.out, run.state["global_step"]
    final = step == run.max_steps
    if final or (host["checkpoint_step_interval"] and step % host["checkpoint_step_interval"] == 0):
        with _disk_space(f"checkpoint-{step}", out):
            _save_checkpoint(run, run.state)
        run.notify.checkpoint(out / f"checkpoint-{step}", step)
    if not host["validation_disable"] and (
            final or (host["validation_step_interval"] and step % host["validation_step_interval"] == 0)):
        _validation_round(run, step, "validation samples")


def finish(run: Run) -> Path:
    """Step 7 of the module docstring: the FD report, the export, the closing lines and the notifications; returns
    ``output_dir``."""
    host, accelerator, out, steps = run.host, run.accelerator, run.out, run.state["global_step"]
    fd = None if host["validation_disable"] else run.validate.fd_report(steps)

    # the student, in the formats users load (diffusers, the original layout), with its model card
    if accelerator.is_main_process:
        rc, models = run.rc, run.models
        export = Export(method_name=rc.method_name, method_cls=rc.method_cls, method_config=rc.method_config,
                        steps=steps, final_logs=run.logs,
                        sample=run.validate.last_student_sample, student_lora=lambda: _student_lora(models),
                        peft_config=models.network.peft_config.get(STUDENT_ADAPTER)
                        if host["model_type"] == "lora" else None)
        with _disk_space("the final export", out):
            export_student(run, export, log=log)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    log(f"done: {steps} steps; student written to {out}")
    if fd:  # the last line: does the student draw like its teacher?
        log(f"{_fd_line(fd)} ({out / 'fd.json'})")
    run.notify.finished(out, steps)  # the hub's final upload (a failure: one line, non-zero exit)
    return out


# =========================================================================== helpers, in the order the run uses them


def _load(config_path, pm, overrides) -> RunConfig:
    """Step 1: the validated config, with ``overrides`` replacing keys of the file."""
    if not overrides:
        return load_config(config_path, pm)
    raw = read_json(config_path, "config")
    raw.update(overrides)
    return validate_config(raw, pm, path=Path(config_path))


def _configure_wandb(host: dict, out: Path) -> None:
    if host["report_to"] != "wandb":
        return
    os.environ.setdefault("WANDB_MODE", "offline")  # works with no network; WANDB_MODE=online syncs
    os.environ.setdefault("WANDB_DIR", str(out))
    os.environ.setdefault("WANDB_CACHE_DIR", str(out / "wandb-cache"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"wandb: mode {os.environ['WANDB_MODE']}, files in {os.environ['WANDB_DIR']}")


def quantize_frozen(module: torch.nn.Module, precision: str, what: str) -> None:
    """Quantize a frozen module's weights to int8 with optimum-quanto when ``precision`` is "int8-quanto" (the
    host's ``base_model_precision`` / ``text_encoder_1_precision`` values); any other value leaves it as it is."""
    if precision != "int8-quanto":
        return
    from optimum.quanto import freeze, qint8, quantize

    quantize(module, weights=qint8)
    freeze(module)
    log(f"{what}: weights quantized to int8 (optimum-quanto)")


def _build_dataset(host, family, components, encode_prompts, accelerator):
    backends = load_backend_config(host["data_backend_config"], warn=lambda m: log(f"warning: {m}"))
    for backend in backends:  # the config's resolution is the default of every media dataset
        if backend.get("dataset_type") not in ("image", "video"):
            continue
        backend.setdefault("resolution", host["resolution"])
        backend.setdefault("resolution_type", host["resolution_type"])
        backend.setdefault("minimum_image_size", host["minimum_image_size"])
        backend.setdefault("aspect_bucket_rounding", host["aspect_bucket_rounding"])
    with accelerator.main_process_first():
        encode_clip = None if family.clip_condition is None else (lambda px: family.clip_condition(components, px))
        dataset = build_cache(backends, lambda px: family.encode_pixels(components, px), encode_prompts,
                              encode_clip=encode_clip,
                              frame_stride=family.frame_stride, size_multiple=family.size_multiple,
                              vae_batch_size=host["vae_batch_size"], cache_tag=_cache_tag(host),
                              progress=accelerator.is_main_process, warn=lambda m: log(f"warning: {m}"),
                              compress=host["compress_disk_cache"],
                              delete_problematic=host["delete_problematic_images"] and accelerator.is_main_process)
    if dataset.skipped and accelerator.is_main_process:
        report = Path(host["output_dir"]) / "data_report.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"skipped": dataset.skipped}, indent=1)
        write_file(report, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        deleted = sum(1 for item in dataset.skipped if item["deleted"])
        log(f"{len(dataset.skipped)} media files skipped ({deleted} deleted); the list: {report}")
    return dataset


def _cache_tag(host: dict) -> str:
    """What cached tensors depend on besides their file: the model and, when set, the text length."""
    tag = str(host["pretrained_model_name_or_path"])
    return tag if host["tokenizer_max_length"] is None else f"{tag}|tokens={host['tokenizer_max_length']}"


def _validation_prompts(host: dict) -> dict[str, str]:
    """Folder name → prompt: ``validation_prompt`` (folder ``validation``) and the prompt-library files' entries
    (checked already, with every problem, when the config was validated)."""
    prompts: dict[str, str] = {}
    if host["validation_prompt"]:
        prompts["validation"] = host["validation_prompt"]
    library, problems, _ = library_prompts(host)
    if problems:
        raise ConfigError(problems)
    prompts.update(library)
    return prompts


def _validation_clip(host: dict, family) -> torch.Tensor:
    """``validation_image`` as a clip ``(1, 3, F, H, W)`` in [-1, 1] for a family's ``clip_condition``: the image
    (RGB, resized to ``validation_resolution`` with PIL's bicubic when its size differs) as the first of
    ``validation_num_video_frames`` frames, zeros after."""
    import numpy as np
    from PIL import Image

    width, height = host["validation_resolution"]
    path = host.get("validation_image")
    if not path:
        raise ConfigError([f"validation_image: the {family.name} family samples from a first frame; give an image"])
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except OSError as exc:
        raise UserError(f"validation_image: cannot read {path}: {exc}") from exc
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    first = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1) * 2.0 - 1.0
    clip = torch.zeros(1, 3, host["validation_num_video_frames"], height, width)
    clip[0, :, 0] = first
    return clip


def frozen_base(host, family, dtype) -> torch.nn.Module:
    """A fresh copy of the base network from ``pretrained_model_name_or_path``, every parameter frozen, with the
    user's ``teacher_loras`` merged in (before ``build_models`` quantizes it and ``fsdp_enable`` shards it): every copy
    of the base — the student's, a full student's teacher, a method's ``load_base`` — is the user's model."""
    network = family.load_network(host["pretrained_model_name_or_path"], dtype=dtype)
    network.requires_grad_(False)
    if host.get("teacher_loras"):
        for line in merge_teacher_loras(network, family, host["teacher_loras"]):
            log(line)
    return network


def load_student_lora(network: torch.nn.Module, path: str | Path, family: Any) -> str:
    """Load a student LoRA written by ``family.save_lora`` (its output folder, or the one file of a one-file family)
    into the student adapter of ``network``; every tensor must find its module at the same shape. Returns what was
    loaded, for the log."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    source = path / MAIN_FILE if path.is_dir() else path
    if not source.is_file():
        raise UserError(f"init_lora: {source} not found (an output folder with {MAIN_FILE}, or that file)")
    state = read_lora(family, path)
    own = {k: v.shape for k, v in _peft_state(network).items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k]) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        first = (f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)}, here "
                 f"{tuple(own[wrong[0]])}; another lora_rank?)" if wrong else
                 f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                 f"{len(unexpected)} unknown (e.g. {unexpected[0]})")
        raise UserError(f"init_lora: {source} does not fit this student's LoRA: {first}")
    set_peft_model_state_dict(network, state, adapter_name=STUDENT_ADAPTER)
    return f"loaded {len(state)} LoRA tensors from {source}"


def _peft_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(network, adapter_name=STUDENT_ADAPTER)


def build_models(host: dict, family, accelerator, *, new_network: Callable[[], torch.nn.Module],
                 distilling: bool) -> Models:
    """The student the host trains, from ``new_network()`` (a frozen copy of the base, e.g. loaded from the model
    folder): quantized and given the student's LoRA (``model_type: lora``), or made trainable with a separate frozen
    teacher when a method distils a full student. Benchmarks and tests build their students through this too."""
    network = new_network()
    if host["quantize_via"] == "accelerator":
        network.to(accelerator.device)
    teacher = None
    if host["model_type"] == "lora":
        quantize_frozen(network, host["base_model_precision"], "base model")
        from peft import LoraConfig

        rank = host["lora_rank"]
        network.add_adapter(LoraConfig(r=rank, lora_alpha=host["lora_alpha"] or rank,
                                       lora_dropout=host["lora_dropout"], init_lora_weights=True,
                                       target_modules=list(family.lora_target_modules)),
                            adapter_name=STUDENT_ADAPTER)
        network.set_adapter(STUDENT_ADAPTER)
        if host.get("init_lora"):
            log(f"init_lora: {load_student_lora(network, host['init_lora'], family)}")
        params = named_adapter_parameters(network, STUDENT_ADAPTER)
    else:
        if host["base_model_precision"] != "no_change":
            log("warning: base_model_precision: ignored with model_type full (every weight trains)")
        network.requires_grad_(True)
        params = dict(network.named_parameters())
        if distilling:  # a distilled full student needs its teacher kept apart
            teacher = new_network().to(accelerator.device).eval()
    for p in params.values():
        p.data = p.data.float()  # trainable weights stay fp32; compute runs in the autocast dtype
        p.requires_grad_(True)
    if host["gradient_checkpointing"]:
        network.enable_gradient_checkpointing()
    network.to(accelerator.device)
    return Models(network, teacher, params)


def _max_steps(host: dict, sampler) -> int:
    """``max_train_steps``, or ``num_train_epochs`` of the sampler's batches; with both set, ``max_train_steps``
    unless ``ignore_final_epochs`` is false, when the first to end stops the run."""
    per_epoch = max(1, len(sampler) // host["gradient_accumulation_steps"])
    epochs = host["num_train_epochs"] * per_epoch
    if host["max_train_steps"]:
        if host["num_train_epochs"] and not host["ignore_final_epochs"]:
            return min(host["max_train_steps"], epochs)
        return host["max_train_steps"]
    return epochs


def _batches(dataset, sampler, consumed: int, accelerator, family=None, *, rank: int, world: int
             ) -> Iterator[tuple[int, Batch]]:
    """``(batches consumed so far, batch)``, batch after batch of one shared, seeded order; data-parallel group r of
    W (a process, or a context-parallel group of them, ``context_parallel.Layout``) takes the batches r, r + W, … of
    it, so a resume (which skips ``batches_consumed``, counted over all groups) sees the same batches on every
    process. The count goes into the state the checkpoint saves."""
    while True:
        for indices in sampler:
            mine = consumed % world == rank
            consumed += 1
            if not mine:
                continue
            items = collate([dataset[i] for i in indices])
            cond = items["prompt_embeds"].to(accelerator.device)
            extras: dict[str, Any] = {"paths": items["paths"]}
            if "clip" in items:  # the family's clip_condition (image-to-video's first frame): see types.Batch
                clip = {name: t.to(accelerator.device) for name, t in items["clip"].items()}
                extras.update(text_cond=cond, clip_condition=clip)
                cond = family.attach_clip_condition(cond, clip)
            # Counted to the end of this round of W batches (one per process): what every process has taken once
            # each has its batch of this micro-step. (The count after its own batch alone is one short on process 0,
            # which saves it, and a resume on W > 1 processes gave process 1 its last batch again.)
            round_end = -(-consumed // world) * world
            yield round_end, Batch(latents=items["latents"].to(accelerator.device), cond=cond,
                                   captions=items["captions"], extras=extras)


def _step_info(seed: int, global_step: int, micro: int, accum: int, accelerator, network) -> StepInfo:
    generator = step_generator(seed, global_step, micro)  # the same on every process
    return StepInfo(global_step, micro, accum, accelerator.sync_gradients, generator, network)


def _fd_line(report: dict) -> str:
    """``digits FD (500 samples a row; lower is closer to the real data): ema 41.2 · teacher 50 steps 35.0 · …``"""
    rows = " · ".join(f"{name} {value:.1f}" for name, value in report["rows"].items())
    return f"{report['metric']} ({report['samples']} samples a row; lower is closer to the real data): {rows}"


def _host_loss_fn(family, network, host, empty_cond) -> Callable[[Batch], torch.Tensor]:
    """The host's own loss: flow matching on the batch (what plain LoRA fine-tuning optimises)."""
    def loss_fn(batch: Batch) -> torch.Tensor:
        x0 = batch.latents
        cond = batch.extras.get("text_cond", batch.cond)  # the text alone, when a clip condition rides beside it
        p = host["caption_dropout_probability"]
        if p > 0:
            drop = torch.rand(x0.shape[0], device=x0.device) < p
            cond = torch.where(drop.view(-1, 1, 1), family.repeat_condition(empty_cond, x0.shape[0]), cond)
        if "clip_condition" in batch.extras:
            cond = family.attach_clip_condition(cond, batch.extras["clip_condition"])
        sigma = shift_sigma(torch.rand(x0.shape[0]), host["flow_schedule_shift"]).to(x0.device)
        noise = torch.randn_like(x0)
        t = sigma * 1000.0
        flow = family.predict_flow(network, add_noise(x0, noise, t), t, cond)
        return torch.mean((flow.float() - (noise.float() - x0.float())) ** 2)

    return loss_fn


def _clip(accelerator, params, host) -> None:
    limit = host["max_grad_norm"]
    if limit <= 0:
        return
    if host["grad_clip_method"] == "value":
        accelerator.clip_grad_value_(params, limit)
    else:
        accelerator.clip_grad_norm_(params, limit)


def _validation_round(run: Run, step: int, what: str) -> None:
    """One round of validation samples, logged as ``what: folder`` and sent to the webhooks."""
    folder = run.validate(step)
    if folder is not None:
        log(f"{what}: {folder}")
        run.notify.validated(folder, step)



# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(job: Job, state: dict) -> None:
    """Everything a resume needs, in a temporary folder made complete and renamed by ``checkpoint.py``."""
    host, family, pm, accelerator, out, models = job.host, job.family, job.pm, job.accelerator, job.out, job.models
    optimizer, scheduler, ema = job.optimizer, job.scheduler, job.ema

    accelerator.wait_for_everyone()
    tmp = from_main(accelerator, begin_checkpoint(out, state["global_step"]) if accelerator.is_main_process else None)
    save_state(tmp / f"rng-{accelerator.process_index}", rng_state())  # each process's own random streams
    if accelerator.is_main_process:
        save_weights(models.student_params, tmp / "student.safetensors")
        save_state(tmp / "optimizer", optimizer.state_dict())
        save_state(tmp / "scheduler", scheduler.state_dict())
        if ema is not None:
            save_state(tmp / "ema", ema.state_dict())
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if host["model_type"] == "lora":  # every checkpoint also holds a loadable LoRA
            family.save_lora(_student_lora(models), tmp, models.network.peft_config[STUDENT_ADAPTER])
    pm.hook.distill_save_state(checkpoint_dir=tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = commit_checkpoint(tmp, out, state["global_step"], host["checkpoints_total_limit"])
        log(f"checkpoint written: {final}")


def _load_checkpoint(job: Job, folder: Path) -> dict:
    """Restore what ``_save_checkpoint`` wrote (and the method's state); returns the trainer state."""
    pm, accelerator, models, optimizer, scheduler, ema = (job.pm, job.accelerator, job.models, job.optimizer,
                                                          job.scheduler, job.ema)

    for name in ("student.safetensors", "trainer_state.json", "optimizer.json", "scheduler.json", "rng-0.json"):
        if not (folder / name).is_file():
            raise UserError(f"checkpoint {folder} is missing {name}")
    load_weights_into(models.student_params, folder / "student.safetensors", "student's weights")
    optimizer.load_state_dict(load_state(folder / "optimizer"))
    scheduler.load_state_dict(load_state(folder / "scheduler"))
    if ema is not None:
        if not (folder / "ema.json").is_file():
            raise UserError(f"use_ema is on but checkpoint {folder} has no EMA state")
        ema.load_state_dict(load_state(folder / "ema"))
    state = json.loads((folder / "trainer_state.json").read_text())
    pm.hook.distill_load_state(checkpoint_dir=folder)
    rng = folder / f"rng-{accelerator.process_index}"
    if not rng.with_suffix(".json").is_file():  # resumed with more processes than saved: seed this one from rank 0's
        log(f"warning: checkpoint {folder} has no random state for process {accelerator.process_index}; using "
            "process 0's")
        rng = folder / "rng-0"
    set_rng_state(load_state(rng))
    return state


@contextlib.contextmanager
def _disk_space(what: str, out: Path):
    """A full disk while writing ``what`` becomes one user error naming the last complete checkpoint, from which the
    same command resumes once there is space (checkpoints and the export are written beside their final names and
    renamed into place, so nothing under a final name is half-written). Every other error propagates unchanged."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        last = latest_checkpoint(out)
        resume = f"run again to resume from {last.name}" if last is not None else "run again (no checkpoint yet)"
        raise UserError(f"no space left on the device of {out} while writing {what}: free space and {resume}"
                        ) from exc


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, also when a library reports the OS error in its own exception (safetensors does)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(marker in text for marker in ("No space left on device", "os error 28", "Disk quota exceeded"))


def _student_lora(models) -> dict[str, torch.Tensor]:
    return _peft_state(models.network)


# --------------------------------------------------------------------------- trackers


def _loggable(host: dict, rc: RunConfig) -> dict:
    flat = {k: v for k, v in host.items() if isinstance(v, (int, float, str, bool))}
    flat.update({f"distillation/{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                 for k, v in rc.method_config.items()})
    flat["distillation_method"] = rc.method_name or "none"
    return flat


__all__ = ["train"]
