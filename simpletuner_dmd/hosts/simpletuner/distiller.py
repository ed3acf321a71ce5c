"""SimpleTuner's distiller interface, served by any method registered with this plugin.

SimpleTuner's trainer (3.1.6 and 4.10.1) calls a distiller object in this order (``patch.py`` makes its factory build
this one)::

    class hooks, 4.x (safety_check, data set-up, collate, before PEFT):
        adapter_dropout_override()                 -> None: lora_dropout stays as the user set it
        training_batch_requirements(config)        -> set(): no cached input beyond SimpleTuner's own
        prepare_model_for_adapter(model, config)   (nothing: the methods add their adapters in distill_setup)
    construction                                   -> distill_setup(run)
    on_load_checkpoint(dir)   (resume)             -> distill_load_state(dir)
    per micro-batch:
        prepare_batch, pre_training_step           (pass-through)
        compute_distill_loss(batch, pred, loss)    -> distill_loss(batch, step, host_loss) → the loss SimpleTuner
        generator_loss_step(batch, pred, loss)        back-propagates (pass-through: the work is done above)
    once per optimizer step (after the student's optimizer.step and zero_grad, only when gradients sync):
        discriminator_step(prepared_batch)         -> distill_after_optimizer_step(step) + distill_metrics(step)
        post_training_step                         (pass-through)
    on_save_checkpoint(step, dir)                  -> distill_save_state(dir); dir/scheduler (distill_scheduler)
    validation (4.x): supports_special_scheduler_validation(), get_scheduler()  -> distill_scheduler(), its
                                                      re-noising seeded from validation_seed

At construction the method's scheduler is also written to ``output_dir/scheduler`` (main process), beside the LoRA
SimpleTuner saves there at the end.

Nothing here imports SimpleTuner: the distiller talks to SimpleTuner's model object by duck typing (``model.config``,
``model.accelerator``, ``model.get_trained_component()``, ``model.encode_text_batch``), so it can be exercised with a
stand-in object of that shape (the equivalence test does).

Which of the plugin's families serves SimpleTuner's ``(model_family, model_flavour)``, and how SimpleTuner's batch and
text encoding become the family's latents and condition, is declared by the families themselves, in optional class
members (nothing here names a family):

- ``simpletuner_names``: ``((simpletuner_model_family, model_flavour or None), ...)``, the family's own declaration
  (not inherited). A declaration naming the flavour wins over one for every flavour (``None``); a SimpleTuner family
  nobody declares is served by the plugin's family of the same name (``wan``), else by the family that drives
  SimpleTuner's own model object (``simpletuner_fallback``: ``model_family.SimpleTunerModelFamily``, handed the model
  object through ``bind_simpletuner_model``).
- ``from_simpletuner_batch(prepared_batch) -> (latents (B, C, F, H, W), cond)``; without it, SimpleTuner's
  ``latents`` and ``encoder_hidden_states`` as they are (Wan's batch).
- ``from_simpletuner_text(encoded) -> cond (1, ...)``: SimpleTuner's ``model.encode_text_batch([text])`` output as
  the family's condition; without it, Wan's ``{"prompt_embeds", ...}`` (``as_condition``).

Metrics reach SimpleTuner's tracker because SimpleTuner keeps the very dict ``compute_distill_loss`` returns and merges
it into its log line *after* ``discriminator_step``: the critic's metrics are added to that dict in place.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ...config import MethodSelection, validate_method_config
from ...errors import ConfigError, PluginError, UserError
from ...plugins import get_family_class, get_plugin_manager, registered_families
from ...processes import from_main
from ...types import Batch, RunContext, StepInfo, StepLoss, step_generator
from . import base_loras
from .shared import HOST_PARAMETERS_ATTR, NEGATIVE_EMBEDS_ATTR, log

STATE_FILE = "simpletuner_dmd_bridge.json"


def method_config_for(config: Mapping[str, Any], method_name: str, pm, *, family_cls: type | None = None
                      ) -> MethodSelection:
    """The method and its validated config from SimpleTuner's config (``distillation_config`` as SimpleTuner parsed
    it: a dict, or a string), through the core's ``validate_method_config`` as every host. Raises ``ConfigError``
    with every problem."""
    _, method_section, _ = base_loras.split(config.get("distillation_config"))  # less the plugin's teacher_loras
    selection, problems = validate_method_config(method_name, method_section, pm, family_cls=family_cls, host=config)
    if problems:
        raise ConfigError(problems)
    return selection


def negative_prompts_for(config: Mapping[str, Any], method_config: Mapping[str, Any]) -> list[str]:
    """Every text a method may ask ``encode_prompts`` for at setup: the host's negative prompt and, when the method
    config names its own (DMD's ``negative_prompt``), that one."""
    texts = [config.get("validation_negative_prompt") or ""]
    own = method_config.get("negative_prompt")
    if isinstance(own, str) and own not in texts:
        texts.append(own)
    return texts


def parameter_count(parameters) -> int:
    """How many tensors a parameter list (or a list of parameter groups) holds."""
    return sum(len(e.get("params", [])) if isinstance(e, Mapping) else 1 for e in parameters)


def simpletuner_family_class(pm, model_family: Any, model_flavour: Any = None) -> type:
    """The plugin's family class for SimpleTuner's ``model_family`` and ``model_flavour``: the one family whose own
    ``simpletuner_names`` declares that pair, else the one declaring the SimpleTuner family for every flavour
    (``None``), else the plugin's family named like SimpleTuner's, else the family that serves any SimpleTuner model
    (``simpletuner_fallback``: ``model_family.SimpleTunerModelFamily``; whether SimpleTuner's family is flow-matching
    is the caller's check). Two families declaring the same pair is a ``PluginError`` naming both."""
    families = registered_families(pm)
    by_flavour: list = []
    any_flavour: list = []
    for entry in families.values():
        for st_family, st_flavour in vars(entry.cls).get("simpletuner_names", ()):
            if st_family != model_family:
                continue
            if st_flavour is None:
                any_flavour.append(entry)
            elif st_flavour == model_flavour:
                by_flavour.append(entry)
    for found in (by_flavour, any_flavour):
        if len(found) > 1:
            claims = ", ".join(f"{e.name} ({e.distribution})" for e in found)
            raise PluginError(f"SimpleTuner's model_family {model_family!r} (model_flavour {model_flavour!r}) is "
                              f"claimed by several families: {claims}")
        if found:
            return found[0].cls
    if str(model_family) in families:
        return families[str(model_family)].cls
    fallback = [e for e in families.values() if e.cls.simpletuner_fallback]
    if len(fallback) > 1:
        claims = ", ".join(f"{e.name} ({e.distribution})" for e in fallback)
        raise PluginError(f"several families serve every SimpleTuner model family (simpletuner_fallback): {claims}")
    if fallback:
        return fallback[0].cls
    return get_family_class(pm, str(model_family))


def from_simpletuner_batch(family: Any, prepared_batch: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
    """SimpleTuner's prepared batch → ``(latents (B, C, F, H, W), cond)`` for ``family``: its own
    ``from_simpletuner_batch`` when it has one, else SimpleTuner's ``latents`` and ``encoder_hidden_states`` as they
    are (Wan's batch: ``(B, 16, F, h, w)`` and ``(B, L, D)``)."""
    convert = family.from_simpletuner_batch
    if convert is not None:
        return convert(prepared_batch)
    return prepared_batch["latents"], prepared_batch["encoder_hidden_states"]


def as_condition(encoded: Any, family: Any = None) -> torch.Tensor:
    """SimpleTuner's ``encode_text_batch`` output for one text → the family's condition ``(1, ...)``: the family's own
    ``from_simpletuner_text`` when it has one; else Wan's (``{"prompt_embeds", "attention_masks"}``, or the raw
    ``(embeds, masks)``) → the ``(1, L, D)`` tensor its batches carry as ``encoder_hidden_states``."""
    convert = None if family is None else family.from_simpletuner_text
    if convert is not None:
        return convert(encoded)
    if isinstance(encoded, Mapping):
        encoded = encoded["prompt_embeds"]
    elif isinstance(encoded, (tuple, list)):
        encoded = encoded[0]
    if encoded.ndim == 2:
        encoded = encoded.unsqueeze(0)
    return encoded


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it: a tensor, or a mapping, sequence or dataclass of them (a
    family's condition, SimpleTuner's text-embed-cache output)."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def detached(value: Any) -> Any:
    return map_tensors(value, lambda t: t.detach())


def validation_steps_for(method_name: str, scheduler: Any, config: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """SimpleTuner's validation asks the method's scheduler for ``validation_num_inference_steps``. A count the student
    cannot sample (the quickstart's 3 for a DCM student trained on 4 phases, once ``distillation_method`` alone was
    changed) becomes the student's own trained count, said in one warning: ``(count to use, warning)``, or
    ``(None, None)`` when the config's count stands."""
    asked = config.get("validation_num_inference_steps")
    if scheduler is None or asked is None or config.get("validation_disable"):
        return None, None
    trained = len(scheduler.config.few_step_timesteps)
    schedule = getattr(scheduler.config, "sampling_schedule", None)  # LCM: any count from 1 to its N
    if int(asked) == trained or (schedule is not None and 1 <= int(asked) <= len(schedule) - 1):
        return None, None
    can = f"samples 1 to {len(schedule) - 1} steps" if schedule is not None else f"samples its {trained} trained steps"
    return trained, (f"validation_num_inference_steps {asked}: the {method_name} student {can}; SimpleTuner's "
                     f"validation samples {trained}")


def validation_seed(config: Mapping[str, Any]) -> int | None:
    """The seed SimpleTuner 4.x's validation gives each pipeline call's generator (``Validation._get_generator``:
    ``validation_seed or seed or 0``, read from the process's own config), or None under ``validation_randomize``,
    where it passes none."""
    if config.get("validation_randomize"):
        return None
    return int(config.get("validation_seed") or config.get("seed") or 0)


class PluginDistiller:
    """One plugin method inside SimpleTuner's trainer. Built by the patched ``DistillerFactory.create_distiller`` with
    the same arguments SimpleTuner gives its own distillers."""

    # ------------------------------------------------------------------ SimpleTuner 4.x's class hooks

    @classmethod
    def adapter_dropout_override(cls, *, method_name: str) -> float | None:
        """None: SimpleTuner's ``safety_check`` leaves ``lora_dropout`` as the user set it. (SimpleTuner forces 0 for
        its own methods.) None of the plugin's methods needs a particular value: the teacher is the base with every
        adapter off, so dropout never reaches it, and the fake score's adapter copies the student's settings."""
        return None

    @classmethod
    def training_batch_requirements(cls, config: Mapping[str, Any], *, method_name: str) -> set[str]:
        """No cached input beyond SimpleTuner's latents and prompt embeddings: DMD's (and LCM's, DCM's) negative prompt
        is encoded once at set-up, before SimpleTuner unloads its text encoder (``patch.py``), not per batch."""
        return set()

    @classmethod
    def prepare_model_for_adapter(cls, model, config: Mapping[str, Any], *, method_name: str) -> None:
        """Nothing: the methods add their adapters (DMD's fake score) in ``distill_setup``, after SimpleTuner's PEFT
        set-up, as a second adapter beside the student's."""

    def __init__(self, method_name: str, *, teacher_model, noise_scheduler=None, config: Mapping[str, Any],
                 model_type: str = "lora", model_family: str | None = None, prediction_type: str | None = None,
                 student_model=None, plugin_manager=None, load_base: Callable[[], torch.nn.Module] | None = None):
        self.model = teacher_model  # SimpleTuner's model object (ImageModelFoundation); the student is its LoRA
        self.config = config
        self.method_name = method_name
        self.pm = plugin_manager or get_plugin_manager()
        if student_model is not None:
            raise UserError("the simpletuner-dmd bridge expects SimpleTuner's single-model setup (student_model=None)")
        if prediction_type not in (None, "flow_matching"):
            raise UserError(f"distillation_method {method_name}: {model_family} predicts {prediction_type}; the "
                            "plugin's methods need a flow-matching model family")
        if model_type == "lora" and str(config.get("lora_type", "standard")).lower() != "standard":
            raise UserError(f"lora_type {config.get('lora_type')!r}: the bridge supports standard (peft) LoRA only")

        family_cls = simpletuner_family_class(self.pm, model_family or config.get("model_family"),
                                              config.get("model_flavour"))
        selection = method_config_for(config, method_name, self.pm, family_cls=family_cls)
        method_cls, self.method_config = selection.cls, selection.config
        for warning in selection.warnings:
            log(f"warning: {warning}")
        weight_dtype = config.get("weight_dtype") or torch.float32
        self.family = family_cls(autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype)
        if self.family.bind_simpletuner_model is not None:
            self.family.bind_simpletuner_model(teacher_model)
        self.accelerator = teacher_model.accelerator
        # SimpleTuner's seed as it parsed it: its `seed: 0` (the default) and -1 are replaced by a fresh value at each
        # launch (cmd_args.py: int(time.time()), randint), so a resumed run takes this from the checkpoint instead
        # (on_load_checkpoint), as SimpleTuner's own RNG streams come from random_states_*.pkl. Every process parses
        # on its own (int(time.time()) may fall on either side of a second): the main process's value is everyone's,
        # so the per-step draws that must agree across processes (DMD's exit index) do.
        self.seed = from_main(self.accelerator, int(config.get("seed") or 0))
        self.accumulation = int(config.get("gradient_accumulation_steps") or 1)
        self.global_step = 0  # optimizer steps completed (restored on resume)
        self._micro = 0
        self._logs: dict[str, float] = {}

        student = teacher_model.get_trained_component()
        self.student = student
        adapter = None
        if model_type == "lora":
            names = list(getattr(student, "peft_config", {}) or {})
            if len(names) != 1:
                raise UserError(f"expected SimpleTuner's one LoRA adapter on the {type(student).__name__}, found "
                                f"{names or 'none'}")
            adapter = names[0]  # SimpleTuner's add_lora_adapter() names it "default"
        trainable_before = {id(p) for p in student.parameters() if p.requires_grad}

        if load_base is None:
            def load_base():
                net = self.family.load_network(str(config.get("pretrained_transformer_model_name_or_path")
                                                   or config["pretrained_model_name_or_path"]), dtype=weight_dtype)
                base_loras.merge_into(net, self.family, config, log)  # the user's model, as SimpleTuner's base
                return net.requires_grad_(False).to(self.accelerator.device)

        dropout = config.get("lora_dropout")
        if model_type == "lora" and dropout:
            log(f"lora_dropout {dropout} kept as set ({method_name} needs no particular value)")

        self.method = method_cls(self.method_config)
        self.pm.register(self.method, name=f"method:{method_name}")
        self.run = RunContext(
            host_config=dict(config), method_config=self.method_config, family=self.family, student=student,
            accelerator=self.accelerator, encode_prompts=self._encode_prompts,
            negative_prompt=config.get("validation_negative_prompt") or "",
            output_dir=Path(str(config.get("output_dir") or ".")), model_type=model_type, student_adapter=adapter,
            load_base=load_base,
            teacher=load_base().eval() if model_type == "full" else None,  # a full student needs a frozen teacher
            seed=self.seed, warn=lambda m: log(f"warning: {m}"),
        )
        self.pm.hook.distill_setup(run=self.run)

        # SimpleTuner's optimizer, gradient clip and max-gradient metric take every parameter of the trained
        # component that requires a gradient (Trainer._get_trainable_parameters), and its optimizer is built after
        # this constructor. Parameters the method made trainable on that component (DMD's fake-score adapter) belong
        # to the method's own optimizer: patch.py filters them out of SimpleTuner's list (host_parameters).
        method_ids = {id(p) for p in student.parameters() if p.requires_grad and id(p) not in trainable_before}
        self.method_params = [p for p in student.parameters() if id(p) in method_ids]
        self._method_param_ids = method_ids
        self.student_params = self.host_parameters(student.parameters())
        setattr(teacher_model, HOST_PARAMETERS_ATTR, self.host_parameters)  # for determine_params_to_optimize
        # Critic-only optimizer steps: SimpleTuner steps its optimizer whatever the loss was. Right before that step
        # the student's gradients are set to None, so AdamW leaves those parameters (and their moments) untouched.
        self._student_ids = {id(p) for p in self.student_params}
        self._student_loss_this_step = False
        self.skipped_student_steps = 0
        self._scheduler_logged = False
        self._check_validation_steps(config)
        self.scheduler_folder = self._save_scheduler(self.run.output_dir, announce=True)
        self._pre_step_hook = register_optimizer_step_pre_hook(self._before_optimizer_step)
        log(f"{method_name} serves SimpleTuner's distiller interface; family {self.family.name}; student "
            f"{'adapter ' + repr(adapter) if adapter else 'full model'}: "
            f"{sum(p.numel() for p in self.student_params):,} trainable parameters; "
            f"{sum(p.numel() for p in self.method_params):,} parameters of the method's own on the same network")

    def host_parameters(self, parameters) -> list:
        """What SimpleTuner's optimizer and clip may hold: trainable parameters that are not the method's own.
        Parameter groups (dicts with ``params``) keep their settings and lose the method's parameters."""
        out = []
        for entry in parameters:
            if isinstance(entry, Mapping):
                kept = self.host_parameters(entry.get("params", []))
                if kept:
                    out.append({**entry, "params": kept})
            elif entry.requires_grad and id(entry) not in self._method_param_ids:
                out.append(entry)
        return out

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Torch's global pre-step hook, until it meets SimpleTuner's optimizer (the one holding the student's
        parameters; the distiller is built before it): from then on a hook on that optimizer alone."""
        if not any(id(p) in self._student_ids for group in optimizer.param_groups for p in group["params"]):
            return  # the method's own optimizer, or another one
        self._pre_step_hook.remove()
        self._pre_step_hook = optimizer.register_step_pre_hook(self._skip_student_step)
        self._skip_student_step(optimizer, args, kwargs)

    def _skip_student_step(self, optimizer, args, kwargs) -> None:
        """On an optimizer step whose micro-batches returned no student loss (DMD's critic-only steps), the student's
        gradients are set to None right before SimpleTuner's ``optimizer.step()``: torch's optimizers skip such
        parameters entirely — no step, no momentum, no weight decay."""
        if self._student_loss_this_step or not self.accelerator.sync_gradients:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._student_ids:
                    p.grad = None
        self.skipped_student_steps += 1

    # ------------------------------------------------------------------ setup helpers

    def _encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """SimpleTuner unloads its text encoder before it builds the distiller, so ``patch.py`` encodes the negative
        prompt(s) with SimpleTuner's own encoder just before that unload and leaves them on the model object. When the
        encoder is still loaded (e.g. ``train_text_encoder``) texts are encoded now."""
        cached: dict[str, Any] = getattr(self.model, NEGATIVE_EMBEDS_ATTR, None) or {}
        out = []
        for text in texts:
            if text in cached:
                cond = as_condition(cached[text], self.family)
            elif getattr(self.model, "text_encoders", None):
                with torch.no_grad():
                    cond = as_condition(self.model.encode_text_batch([text], is_negative_prompt=True), self.family)
            else:
                raise UserError(
                    f"the text {text!r} was not encoded before SimpleTuner unloaded its text encoder; start training "
                    "with `simpletuner-dmd simpletuner-train` (or `python -m simpletuner_dmd.hosts.simpletuner`), "
                    "which encode the negative prompt with SimpleTuner's encoder before the unload")
            out.append(map_tensors(cond, lambda t: t.to(self.accelerator.device)))
        return out[0] if len(out) == 1 else self.family.concat_conditions(out)

    def _step_info(self, micro: int) -> StepInfo:
        generator = step_generator(self.seed, self.global_step, micro)  # the same draws as the reference host
        # Training passes go through SimpleTuner's prepared module (DDP-wrapped under several processes, so the
        # student's gradients are averaged); the bare one would leave every process training on its own.
        network = self.model.get_trained_component(unwrap_model=False)
        return StepInfo(self.global_step, micro, self.accumulation, bool(self.accelerator.sync_gradients), generator,
                        network=network)

    # ------------------------------------------------------------------ SimpleTuner's distiller interface

    def compute_distill_loss(self, prepared_batch: dict, model_output: Any, original_loss: torch.Tensor):
        latents, cond = from_simpletuner_batch(self.family, prepared_batch)
        batch = Batch(latents=latents, cond=cond, captions=list(prepared_batch.get("prompts") or []),
                      extras={"simpletuner": prepared_batch})
        info = self._step_info(self._micro)
        self._micro += 1
        result: StepLoss | None = self.pm.hook.distill_loss(batch=batch, step=info, host_loss=lambda: original_loss)
        logs: dict[str, float] = {}
        self._logs = logs  # SimpleTuner keeps this dict: discriminator_step adds the critic's metrics to it
        if result is None:  # the method lets SimpleTuner's own loss stand
            self._student_loss_this_step = True
            return original_loss, logs
        logs.update(result.logs)
        if result.loss is None:
            return self._no_student_update(original_loss), logs
        self._student_loss_this_step = True
        return result.loss, logs

    def _no_student_update(self, original_loss: torch.Tensor) -> torch.Tensor:
        """SimpleTuner back-propagates whatever is returned and then always clips and steps its optimizer. The loss
        returned is ``0 * Σ student parameters``: graph-valid and cheap (no backward through the network), every
        student gradient an exact zero (so every process's DDP hook fires, and SimpleTuner's default
        ``grad_clip_method: value`` finds gradients to clip). ``_before_optimizer_step`` then sets those gradients to
        None, so the student does not move at all on this step."""
        if not self.student_params:
            return original_loss * 0.0
        return sum(p.sum() for p in self.student_params).to(original_loss.dtype) * 0.0

    def generator_loss_step(self, prepared_batch: dict, model_output: Any, current_loss: torch.Tensor):
        return current_loss, {}

    def discriminator_step(self, prepared_batch: dict | None = None, **kwargs: Any) -> None:
        info = self._step_info(self.accumulation - 1)
        self.pm.hook.distill_after_optimizer_step(step=info)
        metrics: dict[str, float] = {}
        for extra in self.pm.hook.distill_metrics(step=info):
            metrics.update(extra or {})
        self._logs.update(metrics)
        self._student_loss_this_step = False
        self.global_step += 1
        self._micro = 0
        if self.accelerator.is_main_process:
            shown = {k: v for k, v in self._logs.items() if "/" not in k}
            log(f"step {self.global_step}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))

    def _save_scheduler(self, folder: Path, *, announce: bool = False) -> Path | None:
        """The method's scheduler (``distill_scheduler``) saved to ``folder/scheduler`` by the main process, beside
        the LoRA SimpleTuner writes there, so ``FewStepFlowScheduler.from_pretrained(folder, subfolder="scheduler")``
        gives a stock pipeline the student's schedule and step rule. It depends on the method's config alone, which
        is fixed once the method is set up: written then into ``output_dir`` (there before any LoRA, and whatever
        way the run ends), and into each checkpoint beside its LoRA. None: a method without a scheduler."""
        scheduler = self.pm.hook.distill_scheduler()
        if scheduler is None or not self.accelerator.is_main_process:
            return None
        target = Path(folder) / "scheduler"
        scheduler.save_pretrained(str(target))
        if announce:
            log(f"{self.method_name}'s scheduler for stock pipelines written to {target} "
                f"({type(scheduler).__name__}, timesteps {', '.join(f'{float(t):g}' for t in scheduler.timesteps)}; "
                f"FewStepFlowScheduler.from_pretrained(output_dir, subfolder='scheduler'))")
        return target

    def on_save_checkpoint(self, step: int, ckpt_dir: str) -> None:
        folder = Path(ckpt_dir)
        self.pm.hook.distill_save_state(checkpoint_dir=folder)
        self._save_scheduler(folder)
        if self.accelerator.is_main_process and self.run.student_adapter is not None:  # teacher_loras: one LoRA
            combined = base_loras.write_combined(self.student, self.run.student_adapter, self.family, self.config,
                                                 folder / "combined")
            if combined is not None:
                log(f"combined LoRA (your teacher_loras and the student, for the stock base): {combined}")
        if self.accelerator.is_main_process:
            (folder / STATE_FILE).write_text(json.dumps({"method": self.method_name, "global_step": self.global_step,
                                                          "simpletuner_step": int(step), "seed": self.seed}))

    def on_load_checkpoint(self, ckpt_dir: str) -> None:
        folder = Path(ckpt_dir)
        state_file = folder / STATE_FILE
        if not state_file.is_file():
            raise UserError(f"checkpoint {folder} has no {STATE_FILE}: it was not written by a "
                            f"distillation_method {self.method_name} run through simpletuner-dmd")
        state = json.loads(state_file.read_text())
        if state.get("method") != self.method_name:
            raise UserError(f"checkpoint {folder} was written by distillation_method {state.get('method')!r}, "
                            f"this run uses {self.method_name!r}")
        if "seed" in state and int(state["seed"]) != self.seed:
            # The per-step draws (StepInfo.generator: DMD's exit index, …) continue the checkpointed run's: SimpleTuner
            # gives a `seed: 0` run a new seed at every launch, which would make the resumed steps draw differently.
            log(f"seed {self.seed} -> {state['seed']}: the checkpoint's, so the resumed steps draw as the run would "
                f"have without the interruption")
            self.seed = self.run.seed = int(state["seed"])
        self.pm.hook.distill_load_state(checkpoint_dir=folder)
        self.global_step = int(state["global_step"])
        self._micro = 0
        log(f"restored {self.method_name} state from {folder} at step {self.global_step}")

    # ------------------------------------------------------------------ the rest of SimpleTuner's interface

    def prepare_batch(self, batch, model, state):
        return batch

    def pre_training_step(self, model, step) -> None:
        pass

    def post_training_step(self, model, step) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def requires_distillation_cache(self) -> bool:
        return False

    def get_required_distillation_cache_type(self):
        return None

    def get_ode_generator_provider(self):
        return None

    def _check_validation_steps(self, config: Mapping[str, Any]) -> None:
        """``config`` is SimpleTuner's own (``vars`` of its parsed arguments), which its validation reads later."""
        steps, warning = validation_steps_for(self.method_name, self.pm.hook.distill_scheduler(), config)
        if steps is not None:
            log(f"warning: {warning}")
            config["validation_num_inference_steps"] = steps

    def consumes_caption_batches(self) -> bool:
        return False

    def prepare_model_output(self, model_output) -> None:  # SimpleTuner 4.x calls it before compute_distill_loss
        pass

    def supports_special_scheduler_validation(self) -> bool:  # SimpleTuner 4.x
        """True when the method samples with a schedule of its own (DMD), so SimpleTuner validates with it."""
        return self.get_scheduler() is not None

    def get_scheduler(self, scheduler_name: str | None = None):
        """SimpleTuner 4.x's validation puts this scheduler into its pipeline: the method's few-step schedule and
        step rule (``distill_scheduler``). None (a method without one): SimpleTuner keeps its own scheduler.

        Its re-noising (DMD's, LCM's fresh noise between steps) is seeded as SimpleTuner seeds each validation call's
        initial noise (``Validation._get_generator``: ``validation_seed or seed or 0``, afresh for every pipeline
        call, none under ``validation_randomize``): ``generator_seed`` re-seeds the scheduler's own CPU generator at
        every ``set_timesteps``, i.e. every pipeline call, since stock pipelines pass no generator to ``step``. A
        validation sample is then reproduced by the stock pipeline with ``generator=`` and
        ``scheduler.generator`` both seeded with that value (and it no longer draws from torch's global RNG)."""
        scheduler = self.pm.hook.distill_scheduler()
        if scheduler is None:
            return None
        seed = validation_seed(self.config)
        if seed is not None and hasattr(scheduler, "generator_seed"):
            scheduler.generator_seed = seed
        if not self._scheduler_logged:
            self._scheduler_logged = True
            noise = ("its re-noising unseeded (validation_randomize)" if seed is None else
                     f"its re-noising seeded with validation_seed {seed} at every call")
            log(f"validation samples with {self.method_name}'s own schedule: {type(scheduler).__name__}, timesteps "
                f"{', '.join(f'{float(t):g}' for t in scheduler.timesteps)}; {noise}")
        return scheduler

    def toggle_adapter(self, enable: bool = False) -> None:
        component = self.model.get_trained_component()
        component.enable_lora() if enable else component.disable_lora()


__all__ = ["PluginDistiller", "STATE_FILE", "NEGATIVE_EMBEDS_ATTR", "method_config_for", "negative_prompts_for",
           "as_condition", "detached", "from_simpletuner_batch", "map_tensors", "parameter_count", "simpletuner_family_class",
           "validation_seed", "validation_steps_for"]
