"""The optional plugin contract in one place: ``FamilyBase`` and ``MethodBase`` declare every member the package reads
of a family or a method class (with its default and a docstring), the required ones are the Protocols, and nothing in
``simpletuner_dmd/`` reads a member of a family or a method that neither declares."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from simpletuner_dmd import types as T
from simpletuner_dmd.family_base import FamilyBase
from simpletuner_dmd.method_base import MethodBase

REPO = Path(__file__).resolve().parents[1]

# The names the package binds a family or a method class to (bare, or as an attribute: self.family, run.family,
# rc.family_cls, export.method_cls); ``cls`` of a registry entry (entry.cls) may be either.
FAMILY_NAMES = {"family", "family_cls"}
METHOD_NAMES = {"method_cls"}
EITHER_NAMES = {"cls"}


def _protocol_members(*protocols) -> set[str]:
    out: set[str] = set()
    for protocol in protocols:
        for klass in protocol.__mro__:
            if getattr(klass, "_is_protocol", False) and klass is not T.Protocol:
                out |= set(getattr(klass, "__annotations__", {}))
                out |= {name for name, value in vars(klass).items() if callable(value) and not name.startswith("_")}
    return out


def _base_members(base: type) -> set[str]:
    return {name for name in [*vars(base), *getattr(base, "__annotations__", {})] if not name.startswith("_")}


def declared() -> dict[str, set[str]]:
    """The members a family and a method class may be read for: the bases' and the Protocols'."""
    family = _base_members(FamilyBase) | _protocol_members(T.LoadingFamily)
    method = _base_members(MethodBase) | _protocol_members(T.Method)
    return {"family": family, "method": method, "either": family | method}


def _role(node: ast.expr) -> str | None:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    if name in FAMILY_NAMES:
        return "family"
    if name in METHOD_NAMES:
        return "method"
    if name in EITHER_NAMES and isinstance(node, ast.Attribute):  # entry.cls; a bare ``cls`` is a classmethod's own
        return "either"
    return None


def member_reads(root: Path) -> list[tuple[str, str, str]]:
    """``(role, member, where)`` for every ``x.member`` and ``getattr/hasattr(x, "member", …)`` in the package under
    ``root`` whose ``x`` is a name bound to a family or a method class."""
    reads = []
    for path in sorted((root / "simpletuner_dmd").rglob("*.py")):
        where = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                target, member = node.value, node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                target, member = node.args[0], node.args[1].value
            else:
                continue
            role = _role(target)
            if role is not None and not member.startswith("__"):
                reads.append((role, member, f"{where}:{node.lineno}"))
    return reads


def undeclared_reads(root: Path, members: dict[str, set[str]]) -> list[str]:
    return [f"{where}: {role}.{member}" for role, member, where in member_reads(root) if member not in members[role]]


def test_nothing_reads_a_member_of_a_family_or_a_method_that_no_base_or_protocol_declares():
    assert undeclared_reads(REPO, declared()) == []


def test_the_scan_sees_the_optional_members_the_hosts_and_methods_read():
    """Were one of these left out of the bases, the test above would name it (as it named them before the bases)."""
    read = {member for _, member, _ in member_reads(REPO)}
    assert {"block_features", "from_simpletuner_batch", "from_simpletuner_text", "streaming", "memory_plan",
            "gan_feature_module", "config_problems", "progress_metrics", "routes_by_timestep", "video"} <= read
    without = {role: names - {"block_features"} for role, names in declared().items()}
    assert any(line.endswith("family.block_features") for line in undeclared_reads(REPO, without))


def _documented_members(base: type) -> dict[str, str]:
    """Each member the class body of ``base`` declares → its docstring (a function's, or the string literal right
    after an attribute's assignment)."""
    body = ast.parse(inspect.getsource(base)).body[0].body
    out: dict[str, str] = {}
    for node, following in zip(body, [*body[1:], None]):
        if isinstance(node, ast.FunctionDef):
            out[node.name] = ast.get_docstring(node) or ""
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            literal = following.value if isinstance(following, ast.Expr) else None
            doc = literal.value if isinstance(literal, ast.Constant) and isinstance(literal.value, str) else ""
            out.update({t.id: doc for t in targets if isinstance(t, ast.Name)})
    return out


def test_every_member_the_bases_declare_has_a_default_and_a_docstring():
    for base in (FamilyBase, MethodBase):
        documented = _documented_members(base)
        assert set(documented) == _base_members(base), base.__name__
        for name, doc in documented.items():
            assert len(doc.split()) >= 8, f"{base.__name__}.{name} has no docstring saying who reads it and when"
            assert hasattr(base, name), f"{base.__name__}.{name} has no default"


def test_the_bases_declare_no_required_member():
    """One source: a required member is the Protocols', an optional one the bases'. The media rules are both: the
    reference host requires them of a family it loads, and reads them with a default of 1 of any other."""
    assert _base_members(FamilyBase) & _protocol_members(T.LoadingFamily) == {"size_multiple", "frame_stride"}
    assert not _base_members(MethodBase) & _protocol_members(T.Method)


def test_the_optional_callables_have_fixed_signatures():
    assert list(inspect.signature(MethodBase.memory_plan).parameters) == ["config", "host", "layout"]
    for name in ("config_warnings", "usage_notes", "streaming"):
        assert isinstance(vars(MethodBase)[name], staticmethod), name
    assert FamilyBase.config_problems({}) == [] and MethodBase.memory_plan({}, {}, None) == {}


def test_a_registered_class_that_predates_the_bases_gets_their_defaults():
    from simpletuner_dmd import hookimpl
    from simpletuner_dmd.plugins import get_plugin_manager, registered_families, registered_methods

    class OldFamily:
        name, summary, causal = "old-family", "a family written before FamilyBase", False
        pipeline_class = "MyPipeline"

    class OldMethod:
        name, summary, schema = "old-method", "a method written before MethodBase", None

    class Plugin:
        @hookimpl
        def register_model_families(self, register):
            register(OldFamily)

        @hookimpl
        def register_methods(self, register):
            register(OldMethod)

    pm = get_plugin_manager(entry_points=False, extra=[Plugin()])
    assert registered_families(pm)["old-family"].cls is OldFamily
    assert registered_methods(pm)["old-method"].cls is OldMethod
    assert OldFamily.pipeline_class == "MyPipeline" and OldFamily.video is True and OldFamily.gan_feature_module is None
    assert OldFamily.config_problems({}) == [] and "simpletuner_names" not in vars(OldFamily)
    assert OldMethod.progress_metrics == () and OldMethod.memory_plan({}, {}, None) == {}
    assert OldMethod.streaming({}) is None
