"""Every file and folder the project writes goes through here: written beside its final name first, flushed, then
renamed into place, so a crash (or a full disk) never leaves a half-written file or folder under the final name.

Temp names are unique (``.NAME.<random>.tmp``) rather than ``mkstemp``'s, whose 0600 mode would survive the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator


def write_file(final: str | Path, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` fills a temp file beside ``final``; it is fsynced and renamed over ``final``. On any error
    the temp file is removed and the error propagates (``final`` keeps its old content, if any)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp"))
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):  # only when `write` or the rename failed
            os.unlink(tmp)
    fsync_dir(final.parent)


@contextlib.contextmanager
def _staging(folder: Path, tag: str) -> Iterator[Path]:
    """A fresh temp folder ``folder/.TAG.<random>.tmp`` (stale ones of ``tag``, left by a killed run, removed first),
    removed again on the way out whatever happened."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{tag}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".{tag}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(folder)


def _publish(tmp: Path, folder: Path, name: str) -> None:
    target = folder / name
    if target.is_dir() and not target.is_symlink():  # os.replace cannot replace a non-empty folder
        shutil.rmtree(target)
    os.replace(tmp / name, target)


def write_into(folder: str | Path, name: str, write: Callable[[Path], object]) -> None:
    """``write(tmp_dir)`` writes ``tmp_dir/name`` (a file or a folder) inside a temp folder beside ``folder/name``;
    everything is fsynced and ``name`` is renamed into ``folder`` (replacing an older one). On any error the temp
    folder is removed and the error propagates."""
    folder = Path(folder)
    with _staging(folder, name) as tmp:
        write(tmp)
        fsync_tree(tmp)
        _publish(tmp, folder, name)


def write_together(folder: str | Path, write: Callable[[Path], object], *, tag: str = "together") -> list[str]:
    """``write(tmp_dir)`` writes several files and folders into a temp folder beside them; only once all are written
    and fsynced is each renamed into ``folder`` (replacing older ones). A full disk or a crash while writing leaves
    none of them under its final name; renames do not need space. Returns the names published."""
    folder = Path(folder)
    with _staging(folder, tag) as tmp:
        write(tmp)
        fsync_tree(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            _publish(tmp, folder, name)
    return names


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under ``folder`` so a rename never publishes unwritten data."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(root))


def fsync_dir(folder: str | Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder to fsync it; NTFS renames are journaled
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["fsync_dir", "fsync_tree", "write_file", "write_into", "write_together"]
