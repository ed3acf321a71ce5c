"""The repository's own files, for tests that check a run wrote nothing into the checkout."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPO_IGNORED = (".git", "__pycache__", ".pytest_cache", ".hypothesis", "work", ".venv")


def repo_files() -> set[str]:
    """Every file under the checkout (relative paths), outside caches, ``work/`` and build metadata."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in REPO_IGNORED and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(dirpath, f), REPO) for f in filenames)
    return found
