"""A checkpoint's file manifest: every file's path (relative, POSIX), size and sha256, so a resume can tell an intact
checkpoint from one damaged after it was written (a file truncated, overwritten or deleted) before it loads anything.

``build_manifest`` lists a folder; ``manifest_damage`` checks a folder against a manifest and names the first file
that differs. Files in the folder that the manifest does not list are ignored: nothing reads them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

_CHUNK = 1 << 20


def build_manifest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``folder`` (symlinks not followed), but
    the top-level names in ``skip``."""
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel in skip:
                continue
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def manifest_damage(folder: Path, files: Any) -> str | None:
    """The first way ``folder`` differs from the manifest ``files`` (``"ema.safetensors: size 100, expected 12345"``),
    or None when every listed file is there with its size and checksum. Sizes are checked for every file before any
    checksum is computed, so a truncated or missing file is found without reading the others."""
    folder = Path(folder)
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for rel, entry in files.items():
        if not _valid_entry(rel, entry):
            return f"its manifest has a malformed entry {str(rel)[:80]!r}"
        path = folder / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{rel}: size {size}, expected {entry['size']}"
    for rel, entry in files.items():
        if _sha256(folder / rel) != entry["sha256"]:
            return f"{rel}: sha256 differs from the manifest (the file was changed after it was written)"
    return None


def _valid_entry(rel: Any, entry: Any) -> bool:
    """A plain relative path inside the folder (never absolute, ``..``, a backslash or a NUL: a damaged or hostile
    manifest must not make the check read outside the checkpoint) with an int size and a hex sha256."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(part in ("", ".", "..") for part in parts):
        return False
    if not isinstance(entry, dict):
        return False
    size, digest = entry.get("size"), entry.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return False
    return isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["build_manifest", "manifest_damage"]
