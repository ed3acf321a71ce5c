"""The example plugin packages under ``examples/`` as pip would install them, for the tests that select them."""

from __future__ import annotations

import contextlib
import importlib
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def installed_example(example: Path, site: Path, package: str) -> Iterator[dict]:
    """Yield the example's ``[project]`` table with the example importable and its entry points visible.

    If ``pip install -e <example>`` was run, that install is used. Otherwise a distribution is made in ``site`` from
    the example's own ``pyproject.toml`` (name, version, entry points) — the metadata ``importlib.metadata`` reads
    after a pip install — and put on ``sys.path`` until the context ends; modules of ``package`` are then dropped."""
    project = tomllib.loads((example / "pyproject.toml").read_text())["project"]
    try:
        metadata.distribution(project["name"])
    except metadata.PackageNotFoundError:
        pass
    else:
        yield project
        return
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in project["entry-points"].items()))
    sys.path[:0] = [str(site), str(example)]
    importlib.invalidate_caches()
    try:
        yield project
    finally:
        sys.path.remove(str(site))
        sys.path.remove(str(example))
        importlib.invalidate_caches()
        for name in [m for m in sys.modules if m.split(".")[0] == package]:
            del sys.modules[name]
