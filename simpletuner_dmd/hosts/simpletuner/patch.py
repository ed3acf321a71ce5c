"""The take-over points in SimpleTuner (3.1.x and 4.x), applied in memory — no SimpleTuner file is edited.

``install()`` does these things, each idempotent, and leaves every method name the plugin does not register to
SimpleTuner:

1. **Argument parser.** SimpleTuner's ``--distillation_method`` is a closed choice list built from its field registry
   (``simpletuner_sdk/server/services/field_registry``) and cached (``helpers/configuration/cmd_args._ARG_PARSER_CACHE``).
   Every method registered with this plugin is added to the choices and the cached parser is dropped. Must run before
   SimpleTuner's ``Trainer`` is constructed (it parses the config there). ``extend_method_choices`` is defined in
   ``preflight.py``, whose checks build SimpleTuner's parser the same way.
2. **Distiller factory.** ``DistillerFactory.create_distiller`` (``helpers/distillation/factory.py``) builds
   ``PluginDistiller`` for a method this plugin registers (``dmd``, ``lcm`` and ``dcm`` included: the plugin's methods
   replace SimpleTuner's own ports). On 4.x the factory's class hooks — ``prepare_model_for_adapter``,
   ``adapter_dropout_override``, ``training_batch_requirements``, which all call ``DistillationMethod.from_string`` and
   so raise for a name outside SimpleTuner's enum — answer with ``PluginDistiller``'s class hooks for those names.
3. **The student's parameters.** SimpleTuner builds its optimizer from ``determine_params_to_optimize``
   (``helpers/training/optimizer_param.py``, imported by name into the trainer module) and clips and measures gradients
   over ``Trainer._get_trainable_parameters``: both take every parameter of the trained component that requires a
   gradient. Both are wrapped to leave out the parameters a plugin method added to that network (DMD's fake-score
   adapter), which the method's own optimizer trains.
4. **DDP.** A plugin method adds its own adapter to the trained network (DMD's fake score), which the student's
   backward never reaches: under several processes DDP needs ``find_unused_parameters``. SimpleTuner 4.x resolves it
   in ``Trainer._resolve_ddp_find_unused_parameters`` (config key ``find_unused_parameters``, else the model family's
   default); for a plugin method left unset it answers True, said in one line. A user's explicit value stands.
5. **Negative prompt.** SimpleTuner unloads its text encoder (``Trainer.init_unload_text_encoder``) before it builds
   the distiller. That step is wrapped: for a plugin method, the negative prompt(s) are first encoded with SimpleTuner's
   own ``model.encode_text_batch`` and left on the model object for ``PluginDistiller``.
6. **EMA.** SimpleTuner's EMA is built from ``Trainer._get_trainable_parameters`` (point 3: the student only), but
   ``Validation.enable_ema_for_inference`` and the checkpoint's EMA LoRA (``SaveHookManager._save_lora``) store and
   swap every parameter of the trained network that requires a gradient — with DMD's fake score beside the student,
   64 tensors against the EMA's 32. On 4.10.1 the validation's restore raised, SimpleTuner logged it, wrote no sample
   and left the EMA weights in the student; on 3.1.6 the checkpoint crashed. While either runs, the method's own
   parameters are marked as not requiring a gradient, so SimpleTuner stores, swaps and restores the student's tensors
   only.
7. **Checks before anything loads** (``preflight.py``): ``Trainer.parse_arguments`` is followed by the plugin's checks
   of the parsed config, so a mistake stops the training process before a model loads.
8. **The drift signal** (``validation_drift.py``): each validation round's raw samples, collected from
   ``Validation.evaluate_images``, go to a ``DriftMonitor`` after ``Validation._log_validations_to_trackers``: the
   values to SimpleTuner's trackers, a warning line on drift, ``drift.{png,json,csv}`` in ``validation_images/``.
9. **The user's own LoRAs** (``base_loras.py``): ``Trainer.init_load_base_model`` is followed by the merge of
   ``distillation_config``'s ``teacher_loras`` into the loaded network — before ``init_precision`` quantises it and
   before PEFT adds the student's LoRA — so the teacher is the user's model.

The critic-only steps (the student takes no step) are handled in ``distiller.py`` with a torch optimizer pre-step hook:
SimpleTuner's loop offers no way to skip its optimizer's step.
"""

from __future__ import annotations

import os
from typing import Any

from . import validation_drift
from .base_loras import merge_into_simpletuner_model
from .preflight import check_parsed_config, extend_method_choices
from .shared import HOST_PARAMETERS_ATTR, MARK, NEGATIVE_EMBEDS_ATTR, is_main_process, log, served_name


def served_methods() -> dict:
    """Every method registered with the plugin (built-ins and entry points), by name, with its distribution."""
    from ...plugins import get_plugin_manager, registered_methods

    return registered_methods(get_plugin_manager())


def plugin_method_names() -> list[str]:
    return list(served_methods())


def install(served: list[str] | None = None) -> list[str]:
    """Apply every take-over point to the installed SimpleTuner; returns the method names the plugin serves
    (``served``, when the caller has looked them up already)."""
    served = plugin_method_names() if served is None else served
    extend_method_choices(served)
    _route_factory(served)
    _filter_optimizer_parameters()
    _filter_trainable_parameters()
    _find_unused_parameters(served)
    _encode_negative_before_unload(served)
    _ema_swaps_the_student_only()
    _check_config_after_parsing(served)
    _merge_teacher_loras_after_loading(served)
    validation_drift.install(served)
    return served


def _route_factory(served: list[str]) -> None:
    """Each of the factory's static methods that takes a method name answers with ``PluginDistiller`` for the plugin's
    names and calls SimpleTuner's original for every other name."""
    from simpletuner.helpers.distillation.factory import DistillerFactory

    from .distiller import PluginDistiller

    def create_distiller(name, teacher_model, noise_scheduler, config, model_type="lora", model_family=None,
                         prediction_type=None, student_model=None):
        return PluginDistiller(name, teacher_model=teacher_model, noise_scheduler=noise_scheduler, config=config,
                               model_type=model_type, model_family=model_family, prediction_type=prediction_type,
                               student_model=student_model)

    answers = {
        "create_distiller": create_distiller,
        # SimpleTuner 4.x's class hooks; 3.1.x has none of them
        "prepare_model_for_adapter": lambda name, model, config: PluginDistiller.prepare_model_for_adapter(
            model, config, method_name=name),
        "adapter_dropout_override": lambda name: PluginDistiller.adapter_dropout_override(method_name=name),
        "training_batch_requirements": lambda name, config: PluginDistiller.training_batch_requirements(
            config, method_name=name),
    }
    for hook, answer in answers.items():
        current = DistillerFactory.__dict__.get(hook)
        if current is None or getattr(current, MARK, False):
            continue
        setattr(DistillerFactory, hook, staticmethod(_routed(current, answer, served)))


def _routed(current, answer, served: list[str]):
    original = current.__func__ if isinstance(current, staticmethod) else current

    def routed(method, *args, **kwargs):
        name = served_name(method, served)
        return original(method, *args, **kwargs) if name is None else answer(name, *args, **kwargs)

    setattr(routed, MARK, True)
    return routed


def _filter_optimizer_parameters() -> None:
    """Route ``determine_params_to_optimize`` (the list SimpleTuner's optimizer is built from) through the distiller's
    ``host_parameters`` filter. The trainer module imported the function by name, so its binding there is replaced
    too."""
    from simpletuner.helpers.training import optimizer_param, trainer

    current = optimizer_param.determine_params_to_optimize
    if getattr(current, MARK, False):
        return

    def determine_params_to_optimize(*args: Any, **kwargs: Any):
        params = current(*args, **kwargs)
        model = kwargs.get("model", args[1] if len(args) > 1 else None)
        keep = getattr(model, HOST_PARAMETERS_ATTR, None)  # set by PluginDistiller on SimpleTuner's model object
        if keep is None:
            return params
        kept = keep(params)
        from .distiller import parameter_count

        log(f"SimpleTuner's optimizer holds the student's {parameter_count(kept)} tensors; the method's own "
            f"{parameter_count(params) - parameter_count(kept)} are left to its optimizer")
        return kept

    setattr(determine_params_to_optimize, MARK, True)
    optimizer_param.determine_params_to_optimize = determine_params_to_optimize
    if getattr(trainer, "determine_params_to_optimize", None) is current:
        trainer.determine_params_to_optimize = determine_params_to_optimize


def _filter_trainable_parameters() -> None:
    from simpletuner.helpers.training.trainer import Trainer

    current = Trainer._get_trainable_parameters
    if getattr(current, MARK, False):
        return

    def _get_trainable_parameters(self, *args: Any, **kwargs: Any):
        params = current(self, *args, **kwargs)
        distiller = getattr(self, "distiller", None)
        if distiller is None or not hasattr(distiller, "host_parameters"):
            return params
        return distiller.host_parameters(params)

    setattr(_get_trainable_parameters, MARK, True)
    Trainer._get_trainable_parameters = _get_trainable_parameters


def _find_unused_parameters(served: list[str]) -> None:
    from simpletuner.helpers.training.trainer import Trainer

    current = getattr(Trainer, "_resolve_ddp_find_unused_parameters", None)  # SimpleTuner 4.x
    if current is None or getattr(current, MARK, False):
        return

    def _resolve_ddp_find_unused_parameters(self, *args: Any, **kwargs: Any):
        if (getattr(self.config, "find_unused_parameters", None) is None
                and served_name(getattr(self.config, "distillation_method", None), served) is not None):
            if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and is_main_process():
                log("find_unused_parameters: true for DDP (the method's own adapter sits on the trained network, "
                    "outside the student's backward)")
            return True
        return current(self, *args, **kwargs)

    setattr(_resolve_ddp_find_unused_parameters, MARK, True)
    Trainer._resolve_ddp_find_unused_parameters = _resolve_ddp_find_unused_parameters


def _encode_negative_before_unload(served: list[str]) -> None:
    from simpletuner.helpers.training.trainer import Trainer

    current = Trainer.init_unload_text_encoder
    if getattr(current, MARK, False):
        return

    def init_unload_text_encoder(self, *args: Any, **kwargs: Any):
        method = served_name(getattr(self.config, "distillation_method", None), served)
        if method is not None:
            stash_negative_embeds(self.model, vars(self.config), method)
        return current(self, *args, **kwargs)

    setattr(init_unload_text_encoder, MARK, True)
    Trainer.init_unload_text_encoder = init_unload_text_encoder


def _merge_teacher_loras_after_loading(served: list[str]) -> None:
    from simpletuner.helpers.training.trainer import Trainer

    current = Trainer.init_load_base_model
    if getattr(current, MARK, False):
        return

    def init_load_base_model(self, *args: Any, **kwargs: Any):
        result = current(self, *args, **kwargs)
        if served_name(getattr(self.config, "distillation_method", None), served) is not None:
            from ...plugins import get_plugin_manager
            from .distiller import simpletuner_family_class

            config = vars(self.config)
            family_cls = simpletuner_family_class(get_plugin_manager(), config.get("model_family"),
                                                  config.get("model_flavour"))
            merge_into_simpletuner_model(self.model, config, family_cls, log if is_main_process() else _quiet)
        return result

    setattr(init_load_base_model, MARK, True)
    Trainer.init_load_base_model = init_load_base_model


def _quiet(message: str) -> None:
    """Drops a log line: every process merges, the main one says so."""


def method_parameters(model) -> list:
    """The parameters a plugin method added to SimpleTuner's trained network and trains itself (DMD's fake score):
    those that require a gradient but are not the host's (``PluginDistiller.host_parameters``). Empty when no plugin
    method is running."""
    keep = getattr(model, HOST_PARAMETERS_ATTR, None)
    if keep is None:
        return []
    trainable = [p for p in model.get_trained_component(unwrap_model=False).parameters() if p.requires_grad]
    kept = {id(p) for p in keep(trainable)}
    return [p for p in trainable if id(p) not in kept]


def _ema_swaps_the_student_only() -> None:
    """SimpleTuner swaps its EMA into "every parameter of the trained network that requires a gradient" in two places:
    ``Validation.enable_ema_for_inference`` and the checkpoint's ``SaveHookManager._save_lora`` (the ``ema/`` LoRA).
    While either runs, the method's own parameters (DMD's fake score) are marked as not requiring a gradient, so both
    store, swap and restore exactly the student's tensors — the ones the EMA was built from."""
    from simpletuner.helpers.training.save_hooks import SaveHookManager
    from simpletuner.helpers.training.validation import Validation

    for owner, name in ((Validation, "enable_ema_for_inference"), (SaveHookManager, "_save_lora")):
        current = getattr(owner, name)
        if not getattr(current, MARK, False):
            setattr(owner, name, _with_method_parameters_frozen(current))


def _with_method_parameters_frozen(current):
    def wrapped(self, *args: Any, **kwargs: Any):
        hidden = method_parameters(self.model)
        for p in hidden:
            p.requires_grad_(False)
        try:
            return current(self, *args, **kwargs)
        finally:  # not a handler: the method's parameters train again whatever happened
            for p in hidden:
                p.requires_grad_(True)

    setattr(wrapped, MARK, True)
    return wrapped


def _check_config_after_parsing(served: list[str]) -> None:
    from simpletuner.helpers.training.trainer import Trainer

    current = Trainer.parse_arguments
    if getattr(current, MARK, False):
        return

    def parse_arguments(self, *args: Any, **kwargs: Any):
        result = current(self, *args, **kwargs)
        config = getattr(self, "config", None)
        if config is not None:
            check_parsed_config(vars(config), served)
        return result

    setattr(parse_arguments, MARK, True)
    Trainer.parse_arguments = parse_arguments


def stash_negative_embeds(model, config: dict, method: str) -> None:
    """Encode the texts ``PluginDistiller`` will ask for with SimpleTuner's encoder, while it is still loaded."""
    import torch

    from ...plugins import get_plugin_manager
    from .distiller import detached, method_config_for, negative_prompts_for

    pm = get_plugin_manager()
    texts = negative_prompts_for(config, method_config_for(config, method, pm).config)
    with torch.no_grad():  # as SimpleTuner's encoder returns them: the family makes its condition of them later
        embeds = {t: detached(model.encode_text_batch([t], is_negative_prompt=True)) for t in texts}
    setattr(model, NEGATIVE_EMBEDS_ATTR, embeds)
    log(f"negative prompt encoded with SimpleTuner's text encoder before it is unloaded: {texts}")


__all__ = ["HOST_PARAMETERS_ATTR", "extend_method_choices", "install", "method_parameters", "plugin_method_names",
           "served_methods", "stash_negative_embeds"]
