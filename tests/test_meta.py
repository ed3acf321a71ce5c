"""The project's contracts about itself: hooks are documented and called, every key is explained, the README's key
tables are current, and plugins (built-in or third-party) are found, or fail at start-up with their name."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest

from simpletuner_dmd import docs, hookspecs, plugins
from simpletuner_dmd.config import Key, Schema
from simpletuner_dmd.errors import PluginError, UserError
from simpletuner_dmd.hookspecs import hookimpl
from simpletuner_dmd.hosts.reference import export, trainer, validation
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
from simpletuner_dmd.plugins import get_plugin_manager, registered_families, registered_methods

REPO = Path(__file__).resolve().parents[1]
HOOKS = hookspecs.all_hook_names()
REGISTRATION_HOOKS = {"register_methods", "register_model_families"}


def sentences(text: str) -> list[str]:
    """Sentences of at least three words: a split after . ! or ? where a capital (or a code span) starts the next
    one, so "e.g. for" and "0.5" do not split."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", " ".join(text.split()))
    return [s for s in parts if len(s.split()) >= 3 and s.rstrip(")").endswith((".", "!", "?"))]


def call_order_block() -> str:
    doc = hookspecs.__doc__
    return doc[doc.index("Order of calls"):doc.index("Contract for every step-loop hook")]


# --------------------------------------------------------------------------- hooks


def test_the_hook_list_is_complete():
    assert REGISTRATION_HOOKS <= set(HOOKS)
    assert {"distill_setup", "distill_loss", "distill_after_optimizer_step", "distill_metrics", "distill_save_state",
            "distill_load_state", "distill_sampler"} <= set(HOOKS)


def test_sentence_counter_counts():
    assert len(sentences("One sentence here.")) == 1
    assert len(sentences("Call it once. It returns None, e.g. for 0.5 steps.")) == 2
    assert len(sentences("Scalars to log, e.g. loss and lr.")) == 1


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_docstring_has_two_sentences(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(sentences(doc)) >= 2, f"{name}: docstring {doc!r}"


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_in_the_call_order_block(name):
    assert re.search(rf"^\s+(for .*\n\s+)*{name}\(", call_order_block(), re.M), name


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_named_in_the_plugin_authors_docs(name):
    """As datasette's test_plugin_hooks_are_documented: a plugin author finds every hook in docs/plugins.md, in the
    call-order block or the lists under it, written as a call."""
    assert f"{name}(" in (REPO / "docs" / "plugins.md").read_text(), f"docs/plugins.md does not name {name}"


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_used_by_the_reference_trainer(name):
    # the host's loop, its validation and its export
    source = inspect.getsource(trainer) + inspect.getsource(validation) + inspect.getsource(export)
    if name in REGISTRATION_HOOKS:
        # called through plugins.registered_* (which the trainer's load_config uses), and named in the trainer
        assert re.search(rf"\b{name}\b", source), name
        assert f'"{name}"' in inspect.getsource(plugins)
    else:
        assert re.search(rf"pm\.hook\.{name}\(", source), f"the reference trainer never calls {name}"


# --------------------------------------------------------------------------- keys and the README


def _schemas() -> list[tuple[str, Schema]]:
    methods = registered_methods(get_plugin_manager())
    assert "dmd" in methods
    return [(f"method {n}", m.cls.schema) for n, m in methods.items()] + [("host", HOST_SCHEMA)]


def test_every_key_has_help():
    for where, schema in _schemas():
        assert schema.keys
        for key in schema.keys:
            text = (key.help or "").strip()
            assert len(text.split()) >= 2 and text != key.name, f"{where}: key {key.name} has no help"


def test_readme_block_is_current():
    problem = docs.check_readme(REPO / "docs" / "config.md")
    assert problem is None, problem


def test_readme_tables_hold_every_key_and_the_dmd_defaults():
    block = docs.readme_tables()
    assert block.startswith(docs.BEGIN) and block.rstrip().endswith(docs.END)
    for _, schema in _schemas():
        for key in schema.keys:
            assert f"| `{key.name}` |" in block
    row = next(line for line in block.splitlines() if line.startswith("| `dmd_denoising_steps` |"))
    assert '`"1000,757,522"`' in row
    betas = next(line for line in block.splitlines() if line.startswith("| `fake_score_betas` |"))
    assert "`[0.9, 0.999]`" in betas


def test_key_table_renders_types_defaults_and_escapes_pipes():
    schema = Schema(keys=(
        Key("alpha", "float", 0.5, "Mix a | b."),
        Key("mode", "str", "fast", "How.", choices=("fast", "slow")),
        Key("limit", "int", None, "At most.", nullable=True),
        Key("on", "bool", True, "Switch."),
    ))
    table = docs.key_table(schema, "Test keys")
    lines = table.splitlines()
    assert lines[0] == "### Test keys"
    assert "| key | type | default | meaning |" in lines
    assert "| `alpha` | float | `0.5` | Mix a \\| b. |" in lines
    assert '| `mode` | `"fast"` \\| `"slow"` | `"fast"` | How. |' in lines
    assert "| `limit` | int or null | `null` | At most. |" in lines
    assert "| `on` | bool | `true` | Switch. |" in lines


class _ToyMethod:
    name = "toy"
    summary = "A toy method"
    schema = Schema(keys=(Key("toy_strength", "float", 2.5, "How strong the toy is."),))


class _ToyPlugin:
    @hookimpl
    def register_methods(self, register):
        register(_ToyMethod)


def test_a_new_method_gets_its_own_table():
    block = docs.readme_tables(get_plugin_manager(entry_points=False, extra=[_ToyPlugin()]))
    assert "distillation_method: toy" in block and "| `toy_strength` | float | `2.5` |" in block
    assert "distillation_method: dmd" in block
    assert docs.readme_tables() != block


def test_docs_write_and_check(tmp_path, capsys):
    readme = tmp_path / "README.md"
    assert docs.main(["--check", str(readme)]) == 1  # absent
    assert docs.main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# simpletuner-dmd\n") and docs.BEGIN in text and docs.END in text
    assert docs.main(["--check", str(readme)]) == 0

    # prose around the block survives a rewrite; a stale block is replaced
    stale = text.replace("`1000,757,522`", "`1000,500`").replace("| `fake_score_lr` |", "| `fake_lr` |")
    readme.write_text("# Title\n\nIntro.\n\n" + stale.split("\n", 1)[1] + "\nMore prose.\n")
    capsys.readouterr()
    assert docs.main(["--check", str(readme)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "out of date" in err
    assert docs.main(["--write", str(readme)]) == 0
    new = readme.read_text()
    assert new.startswith("# Title\n\nIntro.\n") and new.rstrip().endswith("More prose.")
    assert "| `fake_score_lr` |" in new and "| `fake_lr` |" not in new
    assert new.count(docs.BEGIN) == 1 and docs.check_readme(readme) is None
    assert docs.main(["--write", str(readme)]) == 0 and readme.read_text() == new  # idempotent


def test_docs_appends_the_markers_when_absent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nSome prose.\n")
    assert docs.check_readme(readme) is not None
    docs.write_readme(readme)
    text = readme.read_text()
    assert text.startswith("# Project\n\nSome prose.\n\n" + docs.BEGIN)
    assert docs.check_readme(readme) is None


# --------------------------------------------------------------------------- plugins


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_misspelled_hookimpl_fails_at_start_up():
    @hookimpl
    def distill_los(batch, step, host_loss):
        return None

    with pytest.raises(PluginError, match="distill_los") as info:
        get_plugin_manager(entry_points=False, extra=[_module("typo_plugin", distill_los=distill_los)])
    assert "typo_plugin" in str(info.value) and "\n" not in str(info.value)


def test_hookimpl_with_a_wrong_argument_fails_at_start_up():
    @hookimpl
    def distill_loss(batch, stepp):
        return None

    with pytest.raises(PluginError, match="stepp"):
        get_plugin_manager(entry_points=False, extra=[_module("bad_args_plugin", distill_loss=distill_loss)])


def _method_plugin(module_name: str, method_name: str) -> types.ModuleType:
    cls = type("M", (), {"name": method_name, "summary": "x", "schema": Schema(keys=())})

    @hookimpl
    def register_methods(register):
        register(cls)

    return _module(module_name, register_methods=register_methods)


def test_two_plugins_with_the_same_method_name_fail_naming_both():
    pm = get_plugin_manager(entry_points=False,
                            extra=[_method_plugin("plugin_alpha", "twin"), _method_plugin("plugin_beta", "twin")])
    with pytest.raises(PluginError) as info:
        registered_methods(pm)
    message = str(info.value)
    assert "'twin'" in message and "plugin_alpha" in message and "plugin_beta" in message


def test_a_plugin_reusing_a_builtin_name_fails_naming_both():
    pm = get_plugin_manager(entry_points=False, extra=[_method_plugin("plugin_gamma", "dmd")])
    with pytest.raises(PluginError) as info:
        registered_methods(pm)
    message = str(info.value)
    assert "simpletuner_dmd.methods.dmd.plugin" in message and "simpletuner-dmd" in message
    assert "plugin_gamma" in message


def _fake_distribution(root: Path, dist: str, ep_name: str, module: str, source: str) -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[simpletuner_dmd]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def fresh_module_name():
    name = f"stdmd_fake_{uuid.uuid4().hex[:8]}"
    yield name
    sys.modules.pop(name, None)


FAMILY_PLUGIN = """
    from simpletuner_dmd.hookspecs import hookimpl


    class FakeFamily:
        name = "fakefam"
        summary = "a third-party test family"
        causal = False


    @hookimpl
    def register_model_families(register):
        register(FakeFamily)
"""


def test_an_installed_third_party_family_is_found(tmp_path, monkeypatch, fresh_module_name, capsys):
    _fake_distribution(tmp_path, "fake-family-dist", "fakefam", fresh_module_name, FAMILY_PLUGIN)
    assert "fakefam" not in registered_families(get_plugin_manager())  # not installed yet
    monkeypatch.syspath_prepend(str(tmp_path))
    families = registered_families(get_plugin_manager())
    assert families["fakefam"].distribution == "fake-family-dist"
    assert families["fakefam"].plugin == "fakefam"
    assert families["fakefam"].cls.__module__ == fresh_module_name
    assert families["wan"].distribution == "simpletuner-dmd"

    # a config can select it, and the plugins command lists it with its distribution
    from simpletuner_dmd.hosts.reference.run_config import validate_config

    rc = validate_config({"model_family": "fakefam", "max_train_steps": 1, "distillation_method": "dmd"},
                         get_plugin_manager(), check_paths=False)
    assert rc.family_cls is families["fakefam"].cls
    from simpletuner_dmd.cli import main

    capsys.readouterr()
    assert main(["plugins"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["fakefam"])
    assert row.split()[1] == "fake-family-dist"


def test_an_entry_point_naming_a_built_in_module_is_not_registered_twice(tmp_path, monkeypatch):
    """A distribution that declares a built-in plugin module as its entry point (a repackaging, a vendored copy)
    must not make DMD "registered twice": the built-in is already registered under its module name."""
    info = tmp_path / "repackaged_dmd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: repackaged-dmd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[simpletuner_dmd]\ndmd_again = simpletuner_dmd.methods.dmd.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registered_methods(get_plugin_manager())["dmd"].distribution == "simpletuner-dmd"


def test_a_plugin_that_fails_to_import_is_named_with_its_distribution(tmp_path, monkeypatch, fresh_module_name,
                                                                      capsys):
    _fake_distribution(tmp_path, "broken-family-dist", "brokenfam", fresh_module_name,
                       "import simpletuner_dmd_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as info:
        get_plugin_manager()
    message = str(info.value)
    assert "'brokenfam'" in message and "'broken-family-dist'" in message
    assert "simpletuner_dmd_no_such_dependency_xyz" in message
    assert isinstance(info.value, UserError)

    from simpletuner_dmd.cli import main

    capsys.readouterr()
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plugin 'brokenfam' from distribution 'broken-family-dist' failed to import")
    assert get_plugin_manager(entry_points=False)  # the built-ins alone still load


def test_the_readmes_minimal_config_validates_and_the_readme_stays_short():
    import json

    from simpletuner_dmd.hosts.reference.run_config import validate_config

    text = (REPO / "README.md").read_text()
    block = text.split("## A minimal config", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    rc = validate_config(json.loads(block), get_plugin_manager(entry_points=False), check_paths=False)
    assert rc.method_name == "dmd" and rc.method_config["generator_update_interval"] == 5
    assert len(text.splitlines()) <= 250, "the README is a pitch, the two commands and links: details go to docs/"
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (REPO / link).is_file(), link


# --------------------------------------------------------------------------- names stay in their plugins


def _plugin_root(module_name: str) -> Path:
    """A built-in plugin's own code: its package folder (methods/dmd/) or its module file (families/wan.py)."""
    path = Path(sys.modules[module_name].__file__)
    return path.parent if path.name in ("plugin.py", "__init__.py") else path


def test_nothing_outside_a_plugin_branches_on_a_family_or_method_name():
    """No comparison (``==``, ``!=``, ``in``, ``match``) against a built-in family's or method's name anywhere in the
    package outside that plugin's own code: adding a family or a method adds no ``if family == …`` to the host, the
    bridge or a method."""
    import ast

    pm = get_plugin_manager(entry_points=False)
    owners: dict[str, Path] = {}
    for entries in (registered_families(pm), registered_methods(pm)):
        for name, entry in entries.items():
            owners[name] = _plugin_root(entry.plugin)
    offences = []
    for file in sorted((REPO / "simpletuner_dmd").rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.match_case):
                operands = [node.pattern]
            else:
                continue
            for operand in operands:
                for const in ast.walk(operand):
                    value = getattr(const, "value", None)
                    if isinstance(value, str) and value in owners:
                        root = owners[value]
                        if not (file == root or root in file.parents):
                            offences.append(f"{file.relative_to(REPO)}:{node.lineno} compares with {value!r}")
    assert not offences, offences


# --------------------------------------------------------------------------- layers point one way


PACKAGE_ROOT = REPO / "simpletuner_dmd"
# The entry points dispatch to the hosts by design (they are the layer above every host): ``cli.py`` is
# ``simpletuner-dmd`` (``train`` runs the reference host, ``simpletuner-train`` the bridge, ``make-tiny --dataset``
# writes the reference host's tiny dataset), ``__main__.py`` is ``python -m simpletuner_dmd`` (it calls ``cli.main``),
# and ``docs.py`` keeps the name of the command ``python -m simpletuner_dmd.docs`` that regenerates docs/config.md from
# the reference host's schemas (its code lives in ``hosts/reference/key_tables.py``).
ENTRY_POINTS = {"simpletuner_dmd/cli.py", "simpletuner_dmd/__main__.py", "simpletuner_dmd/docs.py"}


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path, known: set[str]) -> set[str]:
    """Every module ``file`` imports, at module level and inside functions alike, as absolute names: ``from .x import
    y`` counts ``pkg.x`` and, when ``pkg.x.y`` is a module in ``known``, that one too. A file that imports by name
    (``importlib.import_module``) also imports every module of ``known`` that one of its strings names exactly (a
    table of ``"benchmarks.gmm_guided"``-like names is what such a call is handed)."""
    import ast

    name = _module_name(file)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(file.read_text(encoding="utf-8"))
    by_name = any(isinstance(node, ast.Attribute) and node.attr == "import_module" for node in ast.walk(tree))
    for node in ast.walk(tree):
        if by_name and isinstance(node, ast.Constant) and node.value in known:
            found.add(node.value)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known)
    return found


def _graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, known) for f in files}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _cycles(graph: dict[str, set[str]], inside: str) -> list[list[str]]:
    """The import cycles among the modules under ``inside`` (each cycle once, as the path that closes it)."""
    nodes = {m for m in graph if _under(m, inside)}
    edges = {m: sorted(t for t in graph[m] if t in nodes and t != m) for m in nodes}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in edges[node]:
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [node, target])  # an open node is on the path
            elif target not in state:
                visit(target, path + [node])
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node, [])
    return cycles


def test_layers_point_one_way():
    """No family imports a host (each builds its own tiny pipeline); no method imports another method; nothing in the
    package outside ``hosts/`` imports the reference host, except the entry points (``ENTRY_POINTS``, which dispatch
    to the hosts); imports inside functions count as much as those at module level."""
    offences = []
    for file in sorted(PACKAGE_ROOT.rglob("*.py")):
        module, where = _module_name(file), file.relative_to(REPO).as_posix()
        for target in sorted(_imports(file, set())):
            if _under(module, "simpletuner_dmd.families") and _under(target, "simpletuner_dmd.hosts"):
                offences.append(f"{where}: a family imports a host ({target})")
            elif (not _under(module, "simpletuner_dmd.hosts") and where not in ENTRY_POINTS
                    and _under(target, "simpletuner_dmd.hosts.reference")):
                offences.append(f"{where}: imports the reference host ({target}); take what it needs as an argument")
            if (_under(module, "simpletuner_dmd.methods") and module.count(".") >= 2
                    and _under(target, "simpletuner_dmd.methods") and target.count(".") >= 2
                    and module.split(".")[2] != target.split(".")[2]):
                offences.append(f"{where}: method {module.split('.')[2]} imports method {target.split('.')[2]} "
                                f"({target}); share it through a module outside methods/")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("root, inside", [(PACKAGE_ROOT, "simpletuner_dmd.hosts.simpletuner"),
                                          (REPO / "benchmarks", "benchmarks")],
                         ids=["simpletuner-bridge", "benchmarks"])
def test_no_import_cycle(root, inside):
    """The SimpleTuner bridge's modules import one way, and so do the benchmarks' (imports inside functions count: a
    deferred import is still a dependency; so does a module a file imports by name, ``importlib.import_module``)."""
    cycles = _cycles(_graph(root), inside)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
