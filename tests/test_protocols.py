"""The plugin contract as the Protocols in ``simpletuner_dmd.types`` write it: the built-in and the example plugins
satisfy it (members and signatures), every member is documented, and methods read only the listed host keys."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

from simpletuner_dmd import types as T
from simpletuner_dmd.family_base import FamilyBase
from simpletuner_dmd.method_base import MethodBase
from simpletuner_dmd.plugins import get_plugin_manager, registered_families, registered_methods

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugins():
    """The built-ins and the two example plugins (importable from examples/, registered as extras)."""
    sys.path[:0] = [str(REPO / "examples" / "gmm_family"), str(REPO / "examples" / "method_plugin")]
    try:
        import gmm_family.plugin
        import guidance_distill.plugin

        pm = get_plugin_manager(entry_points=False, extra=[gmm_family.plugin, guidance_distill.plugin])
        yield registered_methods(pm), registered_families(pm)
    finally:
        sys.path[:2] = []


def _protocol_members(protocol) -> dict[str, object]:
    """The members a Protocol declares itself (methods and annotated attributes), its bases' included."""
    out: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, T.Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        out.update({name: None for name in getattr(klass, "__annotations__", {})})
        out.update({name: value for name, value in vars(klass).items()
                    if callable(value) and not name.startswith("_")})
    return out


def _assert_same_signature(cls, name: str, expected) -> None:
    got = inspect.signature(getattr(cls, name))
    want = inspect.signature(expected)
    shape = [(p.name, p.kind) for p in want.parameters.values()]
    assert [(p.name, p.kind) for p in got.parameters.values()][:len(shape)] == shape, \
        f"{cls.__name__}.{name}{got} does not take {name}{want}"
    extra = list(got.parameters.values())[len(shape):]
    assert all(p.default is not inspect.Parameter.empty for p in extra), f"{cls.__name__}.{name}: extra required args"


def test_every_family_is_a_model_family_and_the_reference_hosts_are_loading_families(plugins):
    _, families = plugins
    assert {"wan", "gmm"} <= set(families)
    for name, entry in families.items():
        cls = entry.cls
        assert issubclass(cls, FamilyBase), f"{name}: the optional members' defaults are FamilyBase's"
        instance = cls(autocast_dtype=None)  # how hosts construct a family
        assert isinstance(instance, T.ModelFamily), name
        for member, spec in _protocol_members(T.LoadingFamily).items():
            if spec is not None and hasattr(cls, member):  # what a family defines is the Protocol's shape
                _assert_same_signature(cls, member, spec)
        # the reference host loads the built-ins, except the one that drives SimpleTuner's model object (which its
        # config_problems refuses by name there)
        if entry.distribution == "simpletuner-dmd" and not cls.simpletuner_fallback:
            assert isinstance(instance, T.LoadingFamily), name
            missing = [m for m in _protocol_members(T.LoadingFamily) if not hasattr(cls, m)]
            assert not missing, f"{name} lacks {missing}"


def test_every_method_is_a_method(plugins):
    methods, _ = plugins
    assert {"dmd", "lcm", "dcm", "guidance_distill"} <= set(methods)
    for name, entry in methods.items():
        cls = entry.cls
        assert issubclass(cls, MethodBase), f"{name}: the optional members' defaults are MethodBase's"
        assert cls.name == name and cls.summary and cls.schema.keys, name
        assert list(inspect.signature(cls.__init__).parameters) == ["self", "config"], name
        assert isinstance(cls(cls.schema.defaults()), T.Method), name
        hooks = {n for n, v in vars(cls).items() if hasattr(v, "simpletuner_dmd_impl")}
        assert {"distill_setup", "distill_loss"} <= hooks, f"{name} implements {sorted(hooks)}"


def test_methods_read_only_the_listed_host_keys():
    read: set[str] = set()
    for source in [*(REPO / "simpletuner_dmd" / "methods").rglob("*.py"),
                   *(REPO / "examples" / "method_plugin").rglob("*.py")]:
        read |= set(re.findall(r"host_config(?:\.get\(|\[)\s*[\"']([a-z_]+)[\"']", source.read_text()))
    assert read and read <= set(T.HOST_KEYS_FOR_METHODS), read - set(T.HOST_KEYS_FOR_METHODS)


@pytest.mark.parametrize("protocol", [T.ModelFamily, T.LoadingFamily, T.Method, T.Sampler])
def test_every_protocol_member_is_documented(protocol):
    assert len((protocol.__doc__ or "").split()) > 10
    source = inspect.getsource(protocol)
    for name, value in vars(protocol).items():
        if callable(value) and not name.startswith("_"):
            assert (value.__doc__ or "").strip(), f"{protocol.__name__}.{name} has no docstring"
    for name in getattr(protocol, "__annotations__", {}):
        line = next(line for line in source.splitlines() if re.match(rf"\s+{name}:", line))
        assert "#" in line, f"{protocol.__name__}.{name} has no comment"


def test_the_run_context_documents_every_field():
    doc = T.RunContext.__doc__
    for name in T.RunContext.__dataclass_fields__:
        assert f"``{name}" in doc, name
