"""Checkpoint folders that are either complete or invisible.

Layout inside `output_dir`:

    checkpoint-<step>/            complete: holds checkpoint.json, written last, before the rename
    .checkpoint-<step>.tmp/       being written (or left over by a crash): never resumed from

A save goes `begin_checkpoint` -> caller writes files -> `commit_checkpoint`. The folder only gets
its public name by an atomic rename after every file and the marker are fsynced, so a crash at any
point leaves either the previous set of checkpoints or the new one, plus a `.tmp` folder that the
next `list_checkpoints`/`resolve_resume` deletes.

The marker is also the checkpoint's manifest: under "files" it lists every other file of the folder
(the method's state included) with its size and sha256 (`manifest.py`). `resolve_resume` checks a
checkpoint against it before resuming: `latest` falls back to the newest intact checkpoint with one
warning, an explicitly named damaged checkpoint is a user error. A checkpoint written before
manifests existed (a marker without "files") cannot be checked; it is resumed with a warning.

Call these from the main process only: the stale-folder cleanup would delete a `.tmp` folder that
another process is still writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.atomic import fsync_dir, fsync_tree

from .manifest import build_manifest, manifest_damage

MARKER = "checkpoint.json"
FORMAT = "simpletuner-dmd-checkpoint"
FORMAT_VERSION = 1

_NAME = re.compile(r"checkpoint-(\d+)")


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """A fresh, empty temporary folder to write checkpoint `step` into."""
    _check_step(step)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir / f".checkpoint-{step}.tmp"
    if tmp_dir.exists():  # a crashed save of the same step; its content is unusable
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    return tmp_dir


def commit_checkpoint(tmp_dir: Path, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """Mark `tmp_dir` complete, publish it as `checkpoint-<step>` and prune to `total_limit`."""
    _check_step(step)
    if total_limit is not None and total_limit < 0:
        raise ValueError(f"total_limit must be None or >= 0, got {total_limit}")
    tmp_dir, output_dir = Path(tmp_dir), Path(output_dir)
    # Every other file is complete here (all processes have written theirs), so the manifest covers them all.
    files = build_manifest(tmp_dir, skip=(MARKER,))
    marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "time": time.time(), "files": files}
    (tmp_dir / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    fsync_tree(tmp_dir)

    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        # rename() cannot replace a non-empty folder, so move the old one aside under a name the
        # stale cleanup recognises. A crash between the two renames loses this step (both copies
        # are .tmp leftovers then) but never publishes a half-written folder.
        aside = output_dir / f".checkpoint-{step}.replaced.tmp"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(tmp_dir, final)
        shutil.rmtree(aside)
    else:
        os.replace(tmp_dir, final)
    fsync_dir(output_dir)

    if total_limit:
        _prune(output_dir, total_limit, keep=final)
    return final


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first. Deletes stale `.tmp` folders."""
    output_dir = Path(output_dir)
    remove_stale(output_dir)
    return _complete(output_dir)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: Path, value: object, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint folder that the config key `resume_from_checkpoint` asks for, or None.

    None, False, "" (and the strings "false"/"none") mean a fresh start; "latest" means the
    newest intact checkpoint if there is one (`_latest_intact`); anything else is a folder name
    inside output_dir or a path, which must be a complete checkpoint that matches its manifest.
    `warn` receives the one-line warnings (a damaged checkpoint skipped, one without a manifest).
    """
    warn = warn or (lambda message: None)
    output_dir = Path(output_dir)
    if value is None or value is False:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"resume_from_checkpoint must be 'latest', a checkpoint name or a path, got {value!r}")
    text = os.fspath(value).strip()
    if text.lower() in ("", "false", "none"):
        return None
    remove_stale(output_dir)
    if text == "latest":
        return _latest_intact(output_dir, warn)

    inside, as_given = output_dir / text, Path(text).expanduser()
    folder = inside if inside.is_dir() else as_given
    if not folder.is_dir():
        raise UserError(f"resume_from_checkpoint: checkpoint {text!r} not found (looked for {inside} and {as_given})")
    problem = _problem(folder)
    if problem:
        raise UserError(f"resume_from_checkpoint: {folder} is not a complete checkpoint ({problem})")
    damage = checkpoint_damage(folder)
    if damage:
        raise UserError(f"resume_from_checkpoint: {folder} is damaged ({damage}); name an intact checkpoint, or "
                        "'latest' to take the newest intact one")
    _warn_unverified(folder, warn)
    return folder.resolve()


def checkpoint_damage(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (its marker, or the first file that differs from the
    manifest in it), or None when it is intact. A checkpoint without a manifest has nothing to be
    checked against, so it passes (`has_manifest` tells it apart)."""
    folder = Path(folder)
    problem = _problem(folder)
    if problem:
        return problem
    marker = _read_marker(folder)
    return manifest_damage(folder, marker["files"]) if "files" in marker else None


def has_manifest(folder: Path) -> bool:
    marker = _read_marker(Path(folder))
    return marker is not None and "files" in marker


def checkpoint_step(folder: Path) -> int:
    """The step recorded in a complete checkpoint's marker."""
    problem = _problem(Path(folder))
    if problem:
        raise UserError(f"{folder} is not a complete checkpoint ({problem})")
    return _read_marker(Path(folder))["step"]


def remove_stale(output_dir: Path) -> None:
    """Delete `.checkpoint-*.tmp` folders left by a crash, only directly inside output_dir."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for path in output_dir.glob(".checkpoint-*.tmp"):
        # Never follow a symlink out of output_dir; a real folder is ours to delete.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


# --------------------------------------------------------------------------- internals


def _latest_intact(output_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint folder that is intact, with one warning naming each newer damaged one; None
    when there is no checkpoint folder at all; a user error when every one is damaged (a fresh start
    would overwrite them)."""
    damaged = []
    for _, folder in reversed(_named(output_dir)):
        damage = checkpoint_damage(folder)
        if damage is None:
            if damaged:
                warn(f"{'; '.join(damaged)}; resuming from {folder.name}")
            _warn_unverified(folder, warn)
            return folder.resolve()
        damaged.append(f"{folder.name} is damaged ({damage})")
    if damaged:
        raise UserError(f"resume_from_checkpoint: latest: no intact checkpoint in {output_dir}: {'; '.join(damaged)}; "
                        "move them away to start from step 0")
    return None


def _warn_unverified(folder: Path, warn: Callable[[str], None]) -> None:
    if not has_manifest(folder):
        warn(f"{folder.name} has no file manifest (it was written by a version before manifests), so it cannot be "
             "checked for damage; resuming from it as it is")


def _named(output_dir: Path) -> list[tuple[int, Path]]:
    """Every folder named checkpoint-<step>, complete or not, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _complete(output_dir: Path) -> list[tuple[int, Path]]:
    """Folders with a valid marker (their files are not checked against the manifest here)."""
    return [(step, path) for step, path in _named(output_dir) if _problem(path) is None]


def _prune(output_dir: Path, total_limit: int, keep: Path) -> None:
    """Delete the oldest complete checkpoints beyond total_limit, never the one just written.

    The just-written one is exempt because after resuming from an early checkpoint it may have
    a lower step than older runs' checkpoints; deleting the save you just made would be absurd.
    """
    others = [path for _, path in _complete(output_dir) if path != keep]
    excess = len(others) + 1 - total_limit
    for path in others[:max(0, excess)]:
        # Rename first (atomic) so a crash mid-delete leaves a .tmp leftover, not a checkpoint
        # that still looks complete but lacks half its files.
        doomed = output_dir / f".{path.name}.deleting.tmp"
        os.replace(path, doomed)
        shutil.rmtree(doomed)


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # missing, truncated or garbled: not complete
        return None
    return marker if isinstance(marker, dict) else None


def _problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    marker = _read_marker(folder)
    if marker is None:
        return f"no valid {MARKER}; it was probably interrupted while saving"
    if marker.get("format") != FORMAT:
        return f"{MARKER} is not a {FORMAT} marker"
    if marker.get("format_version") != FORMAT_VERSION:
        return f"format version {marker.get('format_version')!r}, this version reads {FORMAT_VERSION}"
    step = marker.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return f"{MARKER} has no valid step"
    match = _NAME.fullmatch(folder.name)
    if match and int(match.group(1)) != step:
        return f"{MARKER} says step {step} but the folder is named {folder.name}"
    return None


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
