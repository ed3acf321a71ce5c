"""The take-over points in SimpleTuner (3.1.x), applied in memory — no SimpleTuner file is edited.

``install()`` does four things, each idempotent:

1. **Argument parser.** SimpleTuner's ``--distillation_method`` is a closed choice list built from its field registry
   (``simpletuner_sdk/server/services/field_registry``) and cached (``helpers/configuration/cmd_args._ARG_PARSER_CACHE``).
   Every method registered with this plugin is added to the choices and the cached parser is dropped. Must run before
   SimpleTuner's ``Trainer`` is constructed (it parses the config there).
2. **Distiller factory.** ``DistillerFactory.create_distiller`` (``helpers/distillation/factory.py``) is wrapped: a
   method this plugin registers (``dmd`` included — the plugin's DMD replaces SimpleTuner's own port) is served by
   ``PluginDistiller``; any other name (``lcm``, ``dcm``, ``self_forcing``) goes to SimpleTuner's factory unchanged.
3. **The student's parameters.** SimpleTuner's optimizer, gradient clip and max-gradient metric take every parameter
   of the trained component that requires a gradient (``Trainer._get_trainable_parameters``). That method is wrapped
   to leave out the parameters a plugin method added to the same network (DMD's fake-score adapter), which the
   method's own optimizer trains.
4. **Negative prompt.** SimpleTuner unloads its text encoder (``Trainer.init_unload_text_encoder``) before it builds
   the distiller. That step is wrapped: for a plugin method, the negative prompt(s) are first encoded with SimpleTuner's
   own ``model.encode_text_batch`` and left on the model object for ``PluginDistiller``.
"""

from __future__ import annotations

from typing import Any

MARK = "_simpletuner_dmd_patched"


def plugin_method_names() -> list[str]:
    from ...plugins import get_plugin_manager, registered_methods

    return list(registered_methods(get_plugin_manager()))


def install() -> list[str]:
    """Apply every take-over point to the installed SimpleTuner; returns the method names the plugin serves."""
    served = plugin_method_names()
    _extend_method_choices(served)
    _route_factory(served)
    _filter_trainable_parameters()
    _encode_negative_before_unload(served)
    return served


def _extend_method_choices(served: list[str]) -> None:
    from simpletuner.helpers.configuration import cmd_args
    from simpletuner.simpletuner_sdk.server.services.field_registry.registry import field_registry

    field = field_registry._fields["distillation_method"]
    known = {c.get("value") if isinstance(c, dict) else c for c in (field.choices or [])}
    for name in served:
        if name not in known:
            field.choices.append({"value": name, "label": f"{name.upper()} (simpletuner-dmd)"})
    cmd_args._ARG_PARSER_CACHE = None


def _route_factory(served: list[str]) -> None:
    from simpletuner.helpers.distillation.factory import DistillerFactory

    current = DistillerFactory.__dict__["create_distiller"]
    if getattr(current, MARK, False):
        return
    original = current.__func__ if isinstance(current, staticmethod) else current

    def create_distiller(method, teacher_model, noise_scheduler, config, model_type="lora", model_family=None,
                         prediction_type=None, student_model=None):
        name = getattr(method, "value", method)
        if isinstance(name, str) and name.lower() in served:
            from .distiller import PluginDistiller

            return PluginDistiller(name.lower(), teacher_model=teacher_model, noise_scheduler=noise_scheduler,
                                   config=config, model_type=model_type, model_family=model_family,
                                   prediction_type=prediction_type, student_model=student_model)
        return original(method, teacher_model, noise_scheduler, config, model_type=model_type,
                        model_family=model_family, prediction_type=prediction_type, student_model=student_model)

    setattr(create_distiller, MARK, True)
    DistillerFactory.create_distiller = staticmethod(create_distiller)


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


def _encode_negative_before_unload(served: list[str]) -> None:
    from simpletuner.helpers.training.trainer import Trainer

    current = Trainer.init_unload_text_encoder
    if getattr(current, MARK, False):
        return

    def init_unload_text_encoder(self, *args: Any, **kwargs: Any):
        method = getattr(self.config, "distillation_method", None)
        if isinstance(method, str) and method.lower() in served:
            stash_negative_embeds(self.model, vars(self.config), method.lower())
        return current(self, *args, **kwargs)

    setattr(init_unload_text_encoder, MARK, True)
    Trainer.init_unload_text_encoder = init_unload_text_encoder


def stash_negative_embeds(model, config: dict, method: str) -> None:
    """Encode the texts ``PluginDistiller`` will ask for with SimpleTuner's encoder, while it is still loaded."""
    import torch

    from ...plugins import get_plugin_manager
    from .distiller import NEGATIVE_EMBEDS_ATTR, as_condition, log, method_config_for, negative_prompts_for

    _, method_config = method_config_for(config, method, get_plugin_manager())
    texts = negative_prompts_for(config, method_config)
    with torch.no_grad():
        embeds = {t: as_condition(model.encode_text_batch([t], is_negative_prompt=True)).detach() for t in texts}
    setattr(model, NEGATIVE_EMBEDS_ATTR, embeds)
    log(f"negative prompt encoded with SimpleTuner's text encoder before it is unloaded: {texts}")


__all__ = ["install", "plugin_method_names", "stash_negative_embeds"]
