"""The reference host reads in one sitting (issue 27): the trainer's module docstring names the function of each step
of a run and those functions exist; ``_run`` is those calls in a row; the host's modules import the package's own
modules at module level, deferring only where a comment says why."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from simpletuner_dmd.hosts.reference import trainer

REFERENCE = Path(trainer.__file__).parent
STEP_FUNCTIONS = ("_load", "set_up", "training_step", "checkpoint_and_validate", "finish")


def test_the_docstring_names_each_step_function_and_run_calls_them_in_order():
    doc = trainer.__doc__
    for name in STEP_FUNCTIONS:
        assert f"``{name}``" in doc, name
        assert callable(getattr(trainer, name)), name
    numbered = re.findall(r"^(\d)\. ``(\w+)``", doc, flags=re.MULTILINE)
    assert [n for n, _ in numbered] == sorted(n for n, _ in numbered), numbered
    source = inspect.getsource(trainer._run)
    calls = [name for name in ("set_up", "training_step", "checkpoint_and_validate", "finish") if name in source]
    assert calls == ["set_up", "training_step", "checkpoint_and_validate", "finish"]
    assert [source.index(f"{name}(") for name in calls] == sorted(source.index(f"{name}(") for name in calls)
    assert len(source.splitlines()) <= 20, "_run is the recipe; the work belongs in the step functions"


def test_the_run_is_a_job():
    """The checkpoint and export helpers take the ``Run`` where they took the ``Job``."""
    assert issubclass(trainer.Run, trainer.Job)


def _deferred_own_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, whether a comment on that line or the one above gives a reason) of each import of the
    package's own modules inside a function."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for func in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("simpletuner_dmd")):
                module = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import) and any(a.name.startswith("simpletuner_dmd") for a in node.names):
                module = node.names[0].name
            else:
                continue
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            found.append((node.lineno, module, "#" in lines[node.lineno - 1] or above.startswith("#")))
    return found


def test_the_hosts_own_imports_are_at_module_level_unless_a_comment_says_why():
    offences = [f"{path.name}:{line}: {module} imported inside a function, with no comment saying why"
                for path in sorted(REFERENCE.glob("*.py"))
                for line, module, reasoned in _deferred_own_imports(path) if not reasoned]
    assert not offences, "\n".join(offences)
