"""The reference host's data backends: the SimpleTuner-style backend list, checked and normalized, and the media
files and captions each backend holds.

Config: a JSON list of backend objects, as in SimpleTuner's `multidatabackend.json`: image or video backends
(`MEDIA_BACKEND_SCHEMA`) and one `dataset_type: "text_embeds"` backend (`TEXT_BACKEND_SCHEMA`) whose `cache_dir`
holds the text embeddings. docs/config.md lists their keys, generated from those schemas. Any other key is ignored
with one warning naming it and its backend; bad values are `ConfigError`s, all reported at once. Relative paths are
taken from the current directory, as SimpleTuner does.

The pipeline: `backends` (this) -> `media_decode` (files to pixels) -> `latent_cache` (pixels and captions to cached
latents and embeddings) -> `batches` (same-shape batches of them).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

from simpletuner_dmd.config import Key, Schema, in_range, suggest
from simpletuner_dmd.errors import ConfigError, DataError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".gif", ".mp4", ".webm")

_DATASET_TYPES = ("image", "video", "text_embeds")


def _nonempty(v: str) -> str | None:
    return "must not be empty" if not v else None


def _video_check(v: dict) -> str | None:
    frames = v.get("num_frames")
    if frames is not None and not (isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1):
        return f"num_frames must be a whole number >= 1, got {frames!r}"
    return None


_COMMON_KEYS = (
    Key("id", "str", None, "The backend's name, unique in the file.", check=_nonempty, required=True),
    Key("type", "str", "local", "Where the files are: only local folders are implemented.", choices=("local",)),
    Key("dataset_type", "str", "image", "image, video or text_embeds.", choices=_DATASET_TYPES),
    Key("disabled", "bool", False, "A disabled backend is skipped without being checked (as in SimpleTuner)."),
)


def _media_cross_checks(v: dict) -> list[str]:
    problems = []
    if v["cache_dir_vae"] is None and v["cache_dir"] is None:
        problems.append("cache_dir_vae: required (a latent cache folder: 'cache_dir_vae' or 'cache_dir')")
    elif None not in (v["cache_dir_vae"], v["cache_dir"]) and v["cache_dir_vae"] != v["cache_dir"]:
        problems.append("cache_dir_vae: cache_dir_vae and cache_dir name different folders; give one")
    video_frames = v["video"].get("num_frames")
    if None not in (v["num_frames"], video_frames) and v["num_frames"] != video_frames:
        problems.append("num_frames: num_frames and video.num_frames disagree")
    return problems


MEDIA_BACKEND_SCHEMA = Schema(
    keys=_COMMON_KEYS + (
        Key("instance_data_dir", "str", None, "The folder of media and captions.", check=_nonempty, required=True),
        Key("caption_strategy", "str", "textfile", "textfile: `photo.png` is captioned by `photo.txt`.",
            choices=("textfile",)),
        Key("cache_dir_vae", "str", None, "The latent cache folder.", check=_nonempty, nullable=True),
        Key("cache_dir", "str", None, "Another name for `cache_dir_vae`.", check=_nonempty, nullable=True),
        Key("resolution", "int", None, "Pixels (default: the config's `resolution`).", check=in_range(1),
            nullable=True),
        Key("resolution_type", "str", None, "pixel_area: area ~ resolution² with the aspect kept; pixel: the "
            "shorter side = resolution (default: the config's).", choices=("pixel_area", "pixel"), nullable=True),
        Key("num_frames", "int", None, "Most frames taken from a video (default: every frame).", check=in_range(1),
            nullable=True),
        Key("video", "dict", {}, "SimpleTuner's form: `{\"num_frames\": N}`.", check=_video_check),
        Key("repeats", "int", 0, "Extra passes over this backend per epoch.", check=in_range(0)),
        Key("minimum_image_size", "int", None, "Skip media whose shorter side (resolution_type pixel) or √area "
            "(pixel_area) is under this many pixels (default: the config's; 0: no minimum).", check=in_range(0),
            nullable=True),
        Key("aspect_bucket_rounding", "int", None, "Decimals of the aspect ratio media are sized by (default: the "
            "config's; null there: exact).", check=in_range(1, 9), nullable=True),
    ),
    cross_checks=(_media_cross_checks,),
)

TEXT_BACKEND_SCHEMA = Schema(
    keys=_COMMON_KEYS + (
        Key("cache_dir", "str", None, "The text-embedding cache folder (default: `<first media cache dir>/"
            "text_embeds`).", check=_nonempty, nullable=True),
        Key("default", "bool", True, "Accepted for SimpleTuner's files; there is one text backend."),
    ),
)

Warn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------- config


def load_backend_config(path: str | Path, *, warn: Warn = warnings.warn) -> list[dict]:
    """Read and validate a backend list; return one normalized dict per backend.

    Normalized: implemented keys only, absolute paths, `cache_dir_vae` as `cache_dir`, `video.num_frames` as
    `num_frames`. `resolution`, `resolution_type` and `num_frames` are present only where the file gives them
    (absent: native size, "pixel_area", every frame), so the caller may fill in host-wide defaults.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read the data backend config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the data backend config is not UTF-8 text") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise UserError(f"{path}: the data backend config nests arrays or objects too deeply to read") from None
    if not isinstance(raw, list):
        raise UserError(f"{path}: expected a JSON list of backend objects, got a JSON {type(raw).__name__}")
    return validate_backends(raw, source=str(path), warn=warn)


def validate_backends(raw: list, *, source: str = "data backend config", warn: Warn = warnings.warn) -> list[dict]:
    """Check every enabled backend against ``MEDIA_BACKEND_SCHEMA`` or ``TEXT_BACKEND_SCHEMA``, report all problems
    at once as a `ConfigError`, return them normalized.

    Normalizing is idempotent (the output holds only implemented keys), so `build_cache` re-validates for free.
    """
    problems: list[str] = []
    out: list[dict] = []
    seen_ids: set[str] = set()
    for i, backend in enumerate(raw):
        if not isinstance(backend, dict):
            problems.append(f"{source}: entry {i} must be a JSON object, got {type(backend).__name__}")
            continue
        if backend.get("disabled") is True:
            continue  # as in SimpleTuner: a disabled backend (say, an S3 one in a shared file) is not even checked
        bid = backend.get("id")
        where = f"{source}: backend '{bid}'" if isinstance(bid, str) and bid else f"{source}: entry {i}"
        schema = TEXT_BACKEND_SCHEMA if backend.get("dataset_type") == "text_embeds" else MEDIA_BACKEND_SCHEMA
        values, errors, unknown = schema.validate(backend, prefix=where, unknown="collect")
        for key in unknown:
            warn(f"{where}: key {key!r} is not implemented by the reference host and is ignored"
                 f"{suggest(key, schema.by_name)}")
        if isinstance(bid, str) and bid in seen_ids:
            errors.append(f"{where}.id: this id is used by another backend")
        if isinstance(bid, str):
            seen_ids.add(bid)
        problems += errors
        if schema is MEDIA_BACKEND_SCHEMA:
            for key in values["video"]:
                if key != "num_frames":
                    warn(f"{where}: key 'video.{key}' is not implemented by the reference host and is ignored")
        out.append(_normalized(values, schema))

    enabled_text = [b["id"] for b in out if b["dataset_type"] == "text_embeds"]
    if len(enabled_text) > 1:
        problems.append(f"{source}: only one enabled text_embeds backend is supported, found {enabled_text}")
    if problems:
        raise ConfigError(problems)
    return out


def _normalized(values: dict, schema: Schema) -> dict:
    """Implemented keys only, absolute paths, ``cache_dir_vae`` as ``cache_dir``, ``video.num_frames`` as
    ``num_frames``; size settings the user left out stay out, so a host can ``setdefault`` its own values."""
    keep = {"id": values["id"], "type": "local", "dataset_type": values["dataset_type"], "disabled": values["disabled"]}
    if schema is TEXT_BACKEND_SCHEMA:
        cache = values["cache_dir"]
        return {**keep, "cache_dir": _absolute(cache) if cache else None, "default": values["default"]}
    cache = values["cache_dir_vae"] or values["cache_dir"]
    data_dir = values["instance_data_dir"]
    keep.update({
        "instance_data_dir": _absolute(data_dir) if data_dir else None, "caption_strategy": "textfile",
        "cache_dir": _absolute(cache) if cache else None, "repeats": values["repeats"],
    })  # fmt: skip
    given = {"resolution": values["resolution"], "resolution_type": values["resolution_type"],
             "minimum_image_size": values["minimum_image_size"],
             "aspect_bucket_rounding": values["aspect_bucket_rounding"],
             "num_frames": values["num_frames"] if values["num_frames"] is not None
             else values["video"].get("num_frames")}
    keep.update({k: v for k, v in given.items() if v is not None})
    return keep


def _absolute(path: str) -> str:
    # SimpleTuner resolves relative paths against the working directory; symlinks are kept as the user wrote them.
    return str(Path(path).expanduser().absolute())


# ------------------------------------------------------------------------------------------------------- files


def find_media(backend: dict) -> list[Path]:
    """The backend's media files (recursive, sorted), skipping hidden paths and its own cache folder."""
    root = Path(backend["instance_data_dir"])
    if not root.is_dir():
        raise DataError(f"backend '{backend['id']}': instance_data_dir {root} is not a folder")
    extensions = IMAGE_EXTENSIONS if backend["dataset_type"] == "image" else VIDEO_EXTENSIONS
    cache = Path(backend["cache_dir"])
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_relative_to(cache):
            continue
        if path.suffix.lower() in extensions and path.is_file():
            found.append(path)
    return found


def read_caption(media: Path) -> str:
    """The caption beside `media` (same stem, `.txt`), stripped; a missing or empty one is a `DataError`."""
    caption_file = media.with_suffix(".txt")
    try:
        caption = caption_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DataError(f"{media}: no caption file {caption_file.name} beside it (caption_strategy textfile)") from None
    except UnicodeDecodeError:
        raise DataError(f"{caption_file}: caption is not UTF-8 text") from None
    except OSError as e:  # a folder, a dangling link's loop, no permission: the caption cannot be read
        raise DataError(f"{caption_file}: cannot read the caption ({e.strerror or e})") from None
    if not caption:
        raise DataError(f"{media}: caption file {caption_file.name} is empty")
    return caption
