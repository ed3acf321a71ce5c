"""The plugin manager: built-ins and third-party plugins go through the same door.

A fresh manager per call of ``get_plugin_manager`` (no import-time registry). Built-in plugins are listed in
``BUILTIN_PLUGINS`` and registered exactly as entry-point plugins are: by importing a module and handing it to
``pm.register``. Third-party packages declare::

    [project.entry-points.simpletuner_dmd]
    my_family = "my_package.plugin"

A plugin that fails to import is reported with its name and distribution; duplicate method or family names stop
start-up naming both providers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError
from .family_base import FamilyBase
from .method_base import MethodBase

BUILTIN_PLUGINS: tuple[str, ...] = (
    "simpletuner_dmd.methods.dmd.plugin",
    "simpletuner_dmd.methods.lcm.plugin",
    "simpletuner_dmd.methods.dcm.plugin",
    "simpletuner_dmd.methods.ode_init.plugin",
    "simpletuner_dmd.families.wan",
    "simpletuner_dmd.families.wan_causal",
    "simpletuner_dmd.families.wan_experts",
    "simpletuner_dmd.families.wan_ti2v",
    "simpletuner_dmd.families.wan_i2v",
    "simpletuner_dmd.families.sd3",
    "simpletuner_dmd.hosts.simpletuner.model_family",
)

DISTRIBUTION = "simpletuner-dmd"


@dataclass(frozen=True)
class Registered:
    name: str
    cls: type
    plugin: str  # the plugin module or object name
    distribution: str  # the distribution that provides it


def get_plugin_manager(*, entry_points: bool = True, extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """A new plugin manager with the hookspecs, the built-ins, every ``simpletuner_dmd`` entry point and ``extra``."""
    pm = PluginManager()
    for module_name in BUILTIN_PLUGINS:
        _register(pm, importlib.import_module(module_name), module_name, DISTRIBUTION)
    if entry_points:
        _load_entry_points(pm)
    for plugin in extra:
        _register(pm, plugin, None, None)
    try:
        pm.check_pending()  # a misspelled hookimpl fails here, at start-up
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        dist = pm.distributions.get(name) or _distribution_of(exc.plugin)
        raise PluginError(f"plugin {name!r} from distribution {dist!r} is broken: {_one_line(exc)}") from exc
    return pm


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with this project's hookspecs, plus the distribution of each plugin by name: an entry point
    knows its distribution, which is more reliable than guessing from the module's top-level package (editable
    installs, a distribution without a RECORD)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}


def _register(pm: PluginManager, plugin: object, name: str | None, dist: str | None) -> None:
    try:
        name = pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # e.g. a hookimpl whose arguments the hookspec does not have
        label = name or getattr(plugin, "__name__", None) or repr(plugin)
        raise PluginError(f"plugin {label!r} from distribution {dist or _distribution_of(plugin)!r} is broken: "
                          f"{_one_line(exc)}") from exc
    if name is not None and dist is not None:
        pm.distributions[name] = dist


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # One by one (not pm.load_setuptools_entrypoints) so a broken plugin is reported with its name.
    for ep in metadata.entry_points(group=hookspecs.PROJECT):
        dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
        # already there: an entry point of the same name, or one naming a built-in module (registered by module name)
        if pm.has_plugin(ep.name) or pm.has_plugin(ep.value):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # re-raised with the plugin's name; the cause keeps the traceback
            raise PluginError(
                f"plugin {ep.name!r} from distribution {dist!r} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        _register(pm, plugin, ep.name, dist)


def _distribution_of(plugin: object) -> str:
    """The installed distribution whose top-level package holds the plugin's module."""
    module = getattr(plugin, "__module__", None) if not hasattr(plugin, "__file__") else plugin.__name__
    top = (module or "").split(".")[0]
    names = metadata.packages_distributions().get(top)
    return names[0] if names else ("(not installed)" if top != "simpletuner_dmd" else DISTRIBUTION)


def _give_defaults(cls: type, base: type) -> None:
    """A class registered without deriving from ``base`` (``FamilyBase``, ``MethodBase``: a plugin written before
    them) gets ``base``'s default for each optional member it lacks, set on the class itself, so that hosts and methods
    read every declared member as a plain attribute of any registered class. (``simpletuner_names`` is left unset: the
    bridge reads it from the class's own ``vars()``, where absent already means none.)"""
    if not isinstance(cls, type) or issubclass(cls, base):
        return
    for member, default in vars(base).items():
        if not member.startswith("_") and member != "simpletuner_names" and not hasattr(cls, member):
            setattr(cls, member, default)


def _collect(pm: pluggy.PluginManager, hook_name: str, kind: str, base: type) -> dict[str, Registered]:
    found: dict[str, Registered] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        classes: list[type] = []
        impl.function(classes.append)
        for cls in classes:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"{kind} class {cls!r} from plugin {impl.plugin_name!r} has no string 'name'")
            _give_defaults(cls, base)
            dist = getattr(pm, "distributions", {}).get(impl.plugin_name) or _distribution_of(impl.plugin)
            entry = Registered(name, cls, impl.plugin_name, dist)
            if name in found:
                other = found[name]
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by {other.plugin!r} ({other.distribution}) "
                    f"and by {entry.plugin!r} ({entry.distribution})"
                )
            found[name] = entry
    return dict(sorted(found.items()))


def registered_methods(pm: pluggy.PluginManager) -> dict[str, Registered]:
    methods = _collect(pm, "register_methods", "method", MethodBase)
    folded: dict[str, Registered] = {}
    for name, entry in methods.items():  # matched without regard to case (find_method): names must differ in more
        other = folded.setdefault(name.casefold(), entry)
        if other is not entry:
            raise PluginError(f"method {name!r} is registered twice: as {other.name!r} by {other.plugin!r} "
                              f"({other.distribution}) and as {name!r} by {entry.plugin!r} ({entry.distribution}); "
                              f"method names are matched without regard to case")
    return methods


def find_method(name: object, methods: dict[str, Registered]) -> str | None:
    """The registered name of the method ``distillation_method`` names, matched without regard to case or
    surrounding blanks (as SimpleTuner's own registry matches it: "DMD" is dmd), or None. The one place method names
    are normalised."""
    if not isinstance(name, str):
        return None
    wanted = name.strip().casefold()
    return next((registered for registered in methods if registered.casefold() == wanted), None)


def registered_families(pm: pluggy.PluginManager) -> dict[str, Registered]:
    return _collect(pm, "register_model_families", "model family", FamilyBase)


def get_method_class(pm: pluggy.PluginManager, name: str) -> type:
    methods = registered_methods(pm)
    found = find_method(name, methods)
    if found is None:
        raise PluginError(_unknown("distillation_method", name, methods))
    return methods[found].cls


def get_family_class(pm: pluggy.PluginManager, name: str) -> type:
    families = registered_families(pm)
    if name not in families:
        raise PluginError(_unknown("model_family", name, families))
    return families[name].cls


def _unknown(key: str, name: str, known: dict[str, Registered]) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown value {name!r}{hint}; installed: {', '.join(known) or 'none'}"
