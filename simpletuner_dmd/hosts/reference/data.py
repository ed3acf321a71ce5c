"""The reference host's data pipeline: a SimpleTuner-style backend list -> cached latents and text embeddings.

Config: a JSON list of backend objects, as in SimpleTuner's `multidatabackend.json`: image or video backends
(`MEDIA_BACKEND_SCHEMA`) and one `dataset_type: "text_embeds"` backend (`TEXT_BACKEND_SCHEMA`) whose `cache_dir`
holds the text embeddings. docs/config.md lists their keys, generated from those schemas. Any other key is ignored
with one warning naming it and its backend; bad values are `ConfigError`s, all reported at once. Relative paths are
taken from the current directory, as SimpleTuner does.

Media become float pixels in [-1, 1] laid out (C, F, H, W) (an image has F=1). Each side is resized, then centre-cropped
down to a multiple of the family's `size_multiple` (Wan: 16, VAE 8x times patch 2), and a video keeps
1 + `frame_stride`·k frames (Wan: 1+4k, its VAE compresses time 4x
after the first frame). The model family's encoders turn pixels and captions into latents and embeddings once; each
is stored as a `.safetensors` file named by a hash of what it depends on, so a second run encodes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from simpletuner_dmd.config import Key, Schema, in_range, suggest
from simpletuner_dmd.errors import ConfigError, DataError, UserError
from simpletuner_dmd.atomic import write_file

class ProblematicFile(DataError):
    """A media file the run skips (and lists in its data report): it cannot be decoded, has no frames, or is smaller
    than ``minimum_image_size``. ``deletable``: a damaged file, which ``delete_problematic_images`` removes; a small
    one is only skipped."""

    def __init__(self, path: Path, reason: str, *, deletable: bool):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.deletable = path, reason, deletable


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


# ----------------------------------------------------------------------------------------------------------- media


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


# What decoders raise on a damaged file: PIL raises OSError for truncated/unidentified files and SyntaxError for broken
# GIF/PNG structure; a damaged GIF read frame by frame (imageio over PIL) also ends in IndexError (a colour table
# index past its end), struct.error (a block shorter than its header says) or EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, struct.error, EOFError, Image.DecompressionBombError)


def load_media(path: Path, backend: dict, *, frame_stride: int, size_multiple: int) -> torch.Tensor:
    """Decode, resize, crop and trim one file to float pixels (C, F, H, W) in [-1, 1]. A file that cannot be
    decoded or has no frames raises ``ProblematicFile``."""
    try:
        if backend["dataset_type"] == "image":
            with Image.open(path) as im:
                # Phones store rotation as EXIF; without this a portrait photo trains sideways.
                frames = [ImageOps.exif_transpose(im).convert("RGB")]
        else:
            frames = _read_video_frames(path, backend.get("num_frames"))
    except _DECODE_ERRORS as e:
        raise ProblematicFile(path, f"cannot decode this file ({type(e).__name__}: {e}); it may be corrupt or "
                              "truncated", deletable=True) from None
    if not frames:
        raise ProblematicFile(path, "the video has no frames", deletable=True)
    resolution_type = backend.get("resolution_type", "pixel_area")
    keep = 1 + (len(frames) - 1) // frame_stride * frame_stride
    frames = frames[:keep]
    size, crop = _fit(frames[0].size, backend.get("resolution"), resolution_type, path, size_multiple,
                      aspect_rounding=backend.get("aspect_bucket_rounding"))
    frames = [f.resize(size, Image.LANCZOS).crop(crop) if f.size != size else f.crop(crop) for f in frames]
    pixels = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))  # (F, H, W, C) uint8
    return pixels.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _read_video_frames(path: Path, num_frames: int | None) -> list[Image.Image]:
    import imageio.v3 as iio  # only video backends pay for importing imageio

    frames = []
    for frame in iio.imiter(path):
        frames.append(Image.fromarray(np.asarray(frame)).convert("RGB"))
        if num_frames is not None and len(frames) >= num_frames:
            break  # stop decoding early: long videos would otherwise be read whole
    return frames


def check_minimum_size(path: Path, backend: dict) -> None:
    """Raise ``ProblematicFile`` when the file is under the backend's ``minimum_image_size`` (read from its header,
    before any cache is consulted, so that raising the minimum takes effect on cached files too)."""
    minimum = backend.get("minimum_image_size") or 0
    if not minimum:
        return
    try:
        if path.suffix.lower() in (".gif",) + IMAGE_EXTENSIONS:
            with Image.open(path) as im:
                size = ImageOps.exif_transpose(im).size if backend["dataset_type"] == "image" else im.size
        else:
            import imageio.v3 as iio

            shape = iio.improps(path).shape  # (frames, H, W, C)
            size = (shape[-2], shape[-3])
    except _DECODE_ERRORS as e:
        raise ProblematicFile(path, f"cannot read this file's size ({type(e).__name__}: {e}); it may be corrupt or "
                              "truncated", deletable=True) from None
    resolution_type = backend.get("resolution_type", "pixel_area")
    measured = _measure(size, resolution_type)
    if measured < minimum:
        what = "shorter side" if resolution_type == "pixel" else "√area"
        raise ProblematicFile(path, f"{size[0]}x{size[1]} is under minimum_image_size {minimum} ({what} "
                              f"{measured:.0f})", deletable=False)


def _measure(size: tuple[int, int], resolution_type: str) -> float:
    """The size ``minimum_image_size`` is compared with: the shorter side (pixel) or √(w·h) (pixel_area)."""
    w, h = size
    return float(min(w, h)) if resolution_type == "pixel" else math.sqrt(w * h)


def _fit(size: tuple[int, int], resolution: int | None, resolution_type: str, path: Path, multiple: int, *,
         aspect_rounding: int | None = None):
    """Resize target (w, h) keeping the aspect — rounded to ``aspect_rounding`` decimals when given, so that media of
    nearly equal aspect share a bucket — and the centred crop box that makes both sides multiples of the family's
    ``size_multiple``."""
    w, h = size
    if aspect_rounding is None:
        if resolution is None:
            scale = 1.0
        elif resolution_type == "pixel_area":
            scale = resolution / math.sqrt(w * h)
        else:
            scale = resolution / min(w, h)
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
    else:
        aspect = max(round(w / h, aspect_rounding), 10.0 ** -aspect_rounding)
        if resolution is None:
            area = w * h
        elif resolution_type == "pixel_area":
            area = resolution * resolution
        else:
            area = resolution * resolution * (aspect if aspect >= 1 else 1 / aspect)
        rw, rh = max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect)))
    cw, ch = rw // multiple * multiple, rh // multiple * multiple
    if cw == 0 or ch == 0:
        raise DataError(f"{path}: {w}x{h} resizes to {rw}x{rh}, a side under {multiple} pixels")
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return (rw, rh), (left, top, left + cw, top + ch)


@functools.cache
def _can_read_video_containers() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "av"))


def _check_video_support(path: Path) -> None:
    if path.suffix.lower() != ".gif" and not _can_read_video_containers():
        raise UserError(
            f"{path}: reading {path.suffix} video needs imageio-ffmpeg: pip install imageio-ffmpeg (or use .gif)"
        )


# ----------------------------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheEntry:
    path: str  # the media file
    caption: str
    latents_file: str
    embeds_file: str
    shape: tuple[int, ...]  # latents (C, F, H, W): what batches are bucketed by


def _digest(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def latents_key(path: Path, backend: dict, tag: str = "") -> str:
    """Cache name for one file: changes when the file, its resize settings or the encoder tag change."""
    stat = path.stat()
    return _digest(
        path=str(path.absolute()), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
        dataset_type=backend["dataset_type"], resolution=backend.get("resolution"),
        resolution_type=backend.get("resolution_type", "pixel_area"), num_frames=backend.get("num_frames"), tag=tag,
        **({"aspect_bucket_rounding": backend["aspect_bucket_rounding"]}
           if backend.get("aspect_bucket_rounding") is not None else {}),
    )  # fmt: skip


def _describe(backend: dict) -> str:
    extensions = IMAGE_EXTENSIONS if backend["dataset_type"] == "image" else VIDEO_EXTENSIONS
    return f"{backend['dataset_type']} files {'/'.join(extensions)}"


COMPRESSED = ".safetensors.gz"  # compress_disk_cache: the safetensors bytes, gzip-compressed


def _save_atomic(tensors: dict[str, torch.Tensor], dest: Path) -> None:
    # A killed run must never leave a half-written file under the final name: it would be "reused" next time.
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if str(dest).endswith(COMPRESSED):
        import gzip

        from safetensors.torch import save

        data = gzip.compress(save(tensors), compresslevel=6)
        write_file(dest, lambda tmp: Path(tmp).write_bytes(data))
    else:
        write_file(dest, lambda tmp: save_file(tensors, tmp))


def _cached_shape(file: str, key: str) -> tuple[int, ...]:
    if file.endswith(COMPRESSED):
        return tuple(_load(file, key).shape)
    try:
        with safe_open(file, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())
    except (OSError, SafetensorError) as e:
        raise DataError(f"{file}: unreadable cache file ({e}); delete it to rebuild") from None


def build_cache(
    backends: list[dict],
    encode_pixels: Callable[[torch.Tensor], torch.Tensor],
    encode_prompts: Callable[[list[str]], torch.Tensor],
    *,
    frame_stride: int,
    size_multiple: int,
    vae_batch_size: int = 1,
    text_batch_size: int = 16,
    cache_tag: str = "",
    progress: bool = True,
    warn: Warn = warnings.warn,
    compress: bool = False,
    delete_problematic: bool = False,
) -> "CachedDataset":
    """Encode every enabled backend's media and captions that are not cached yet; return the cached dataset.

    `encode_pixels((B, 3, F, H, W) in [-1, 1]) -> (B, C', F', H', W')` and `encode_prompts(list[str]) -> (B, L, D)`
    come from the model family, and so do `frame_stride` (videos are trimmed to 1 + stride·k frames) and
    `size_multiple` (media are cropped to multiples of it). `cache_tag` (e.g. the model's name) goes into every cache
    name, so two models never share cached tensors. ``compress`` writes new cache files gzip-compressed
    (``compress_disk_cache``).

    A problematic file (damaged, no frames, under ``minimum_image_size``) is skipped with one warning and listed in
    the dataset's ``skipped`` report; a damaged one is deleted only when ``delete_problematic`` is true
    (``delete_problematic_images``), and the report says so.
    """
    backends = validate_backends(backends, warn=warn)
    media_backends = [b for b in backends if b["dataset_type"] != "text_embeds"]  # disabled ones are gone
    if not media_backends:
        raise DataError("the data backend config has no enabled image or video backend")
    text_backend = next((b for b in backends if b["dataset_type"] == "text_embeds"), None)
    if text_backend is not None and text_backend["cache_dir"]:
        text_dir = Path(text_backend["cache_dir"])
    else:
        text_dir = Path(media_backends[0]["cache_dir"]) / "text_embeds"

    for folder in {Path(b["cache_dir"]) for b in media_backends} | {text_dir}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:  # a file in the way, no permission, a NUL in the path
            raise DataError(f"cannot create the cache folder {folder}: {getattr(e, 'strerror', None) or e}") from None

    skipped: list[dict] = []

    def skip(problem: ProblematicFile) -> None:
        deleted = problem.deletable and delete_problematic
        if deleted:
            problem.path.unlink(missing_ok=True)
        skipped.append({"path": str(problem.path), "reason": problem.reason, "deleted": deleted})
        warn(f"skipped {problem.path}: {problem.reason}" + (" (deleted: delete_problematic_images)" if deleted else ""))

    # Captions and cache names first: a missing caption fails the run before any encoding.
    suffix = COMPRESSED if compress else ".safetensors"
    items: list[tuple[dict, Path, str, Path, Path]] = []
    for backend in media_backends:
        found = find_media(backend)
        if not found:
            warn(f"backend '{backend['id']}': no {_describe(backend)} in {backend['instance_data_dir']}")
        for path in found:
            if backend["dataset_type"] == "video":
                _check_video_support(path)
            try:
                check_minimum_size(path, backend)
            except ProblematicFile as problem:
                skip(problem)
                continue
            caption = read_caption(path)
            key = latents_key(path, backend, cache_tag)
            latents_file = _existing(Path(backend["cache_dir"]) / key, suffix)
            embeds_file = _existing(text_dir / _digest(caption=caption, tag=cache_tag), suffix)
            items.append((backend, path, caption, latents_file, embeds_file))

    with torch.no_grad():  # caching must not build autograd graphs through the encoders
        failed = _encode_missing_latents(items, encode_pixels, vae_batch_size, progress, skip=skip,
                                         media={"frame_stride": frame_stride, "size_multiple": size_multiple})
        items = [item for item in items if item[1] not in failed]
        if not items:
            looked = "; ".join(f"{b['instance_data_dir']} ({_describe(b)})" for b in media_backends)
            shown = "; ".join(f"{item['path']}: {item['reason']}" for item in skipped[:3])
            found_some = f" ({len(skipped)} skipped: {shown}{'; …' if len(skipped) > 3 else ''})" if skipped else ""
            raise DataError(f"the dataset is empty: no {'usable ' if skipped else ''}media found in {looked}"
                            f"{found_some}")
        _encode_missing_prompts(items, encode_prompts, text_batch_size, progress)

    entries = []
    for backend, path, caption, latents_file, embeds_file in items:
        shape = _cached_shape(str(latents_file), "latents")
        entry = CacheEntry(str(path), caption, str(latents_file), str(embeds_file), shape)
        entries += [entry] * (1 + backend["repeats"])
    return CachedDataset(entries, skipped=skipped)


def _existing(stem: Path, suffix: str) -> Path:
    """The cache file for ``stem``: one already written in either form (plain or compressed), else ``suffix``'s."""
    for candidate in (suffix, ".safetensors", COMPRESSED):
        path = stem.with_name(stem.name + candidate)
        if path.exists():
            return path
    return stem.with_name(stem.name + suffix)


def _encode_missing_latents(items, encode_pixels, batch_size: int, progress: bool, *, media: dict,
                            skip: Callable[[ProblematicFile], None]) -> set[Path]:
    """Encode what is not cached yet; returns the media that could not be decoded (each passed to ``skip``)."""
    todo = [(backend, path, file) for backend, path, _, file, _ in items if not file.exists()]
    failed: set[Path] = set()
    pending: dict[tuple, list[tuple[torch.Tensor, Path]]] = {}  # same-shape pixels wait to fill a batch

    def flush(shape):
        pixels, files = zip(*pending.pop(shape))
        latents = encode_pixels(torch.stack(pixels))
        if latents.ndim != 5 or latents.shape[0] != len(files):
            raise ValueError(f"encode_pixels returned {tuple(latents.shape)} for {len(files)} inputs; want (B,C,F,H,W)")
        for latent, file in zip(latents, files):
            _save_atomic({"latents": latent}, file)

    for backend, path, file in tqdm(todo, desc="caching latents", unit="file", disable=not progress):
        try:
            pixels = load_media(path, backend, **media)
        except ProblematicFile as problem:
            skip(problem)
            failed.add(path)
            continue
        pending.setdefault(tuple(pixels.shape), []).append((pixels, file))
        if len(pending[tuple(pixels.shape)]) >= batch_size:
            flush(tuple(pixels.shape))
    for shape in list(pending):
        flush(shape)
    return failed


def _encode_missing_prompts(items, encode_prompts, batch_size: int, progress: bool) -> None:
    todo = {}  # caption -> file; identical captions share one embedding file
    for _, _, caption, _, file in items:
        if not file.exists():
            todo[caption] = file
    captions = list(todo)
    for start in tqdm(range(0, len(captions), batch_size), desc="caching text", disable=not progress or not captions):
        batch = captions[start : start + batch_size]
        embeds = encode_prompts(batch)
        if embeds.ndim != 3 or embeds.shape[0] != len(batch):
            raise ValueError(f"encode_prompts returned {tuple(embeds.shape)} for {len(batch)} captions; want (B,L,D)")
        for caption, embed in zip(batch, embeds):
            _save_atomic({"prompt_embeds": embed}, todo[caption])


# -------------------------------------------------------------------------------------------------------- dataset


class CachedDataset(Dataset):
    """Cached latents and text embeddings; `repeats` are already expanded, so index i is one training sample."""

    def __init__(self, entries: list[CacheEntry], *, skipped: list[dict] | None = None):
        self.entries = list(entries)
        self.skipped = list(skipped or [])  # the problematic media left out: {"path", "reason", "deleted"}

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [e.shape for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        return {
            "latents": _load(e.latents_file, "latents"),
            "prompt_embeds": _load(e.embeds_file, "prompt_embeds"),
            "caption": e.caption,
            "path": e.path,
        }


def _load(file: str, key: str) -> torch.Tensor:
    try:
        if file.endswith(COMPRESSED):
            import gzip

            from safetensors.torch import load

            return load(gzip.decompress(Path(file).read_bytes()))[key]
        return load_file(file)[key]
    except (OSError, SafetensorError, KeyError, EOFError) as e:  # gzip raises OSError/EOFError on a damaged file
        raise DataError(f"{file}: unreadable cache file ({e}); delete it to rebuild") from None


def bucket_batches(
    dataset: CachedDataset, batch_size: int, *, seed: int, epoch: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """One epoch of index batches; every batch holds one latent shape. Same (seed, epoch) -> same batches."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    groups: dict[tuple, list[int]] = {}
    for index, shape in enumerate(dataset.shapes):
        groups.setdefault(tuple(shape), []).append(index)
    batches = []
    for shape in sorted(groups):  # sorted: dict order must not decide the shuffle
        indices = rng.permutation(groups[shape]).tolist()
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketBatchSampler(Sampler[list[int]]):
    """Yields `bucket_batches` epoch after epoch; its state (epoch, position) makes a resumed run see the same batches.

    Iterating yields the rest of the current epoch, then moves to the next. With DataLoader workers prefetching, the
    sampler runs ahead of training, so on resume call `skip_to(batches the trainer actually consumed)`.
    """

    def __init__(self, dataset: CachedDataset, batch_size: int, *, seed: int, drop_last: bool = False):
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, batch_size, seed, drop_last
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._per_epoch = len(bucket_batches(dataset, batch_size, seed=seed, drop_last=drop_last))
        if self._per_epoch == 0:
            largest = max((self.dataset.shapes.count(s) for s in set(self.dataset.shapes)), default=0)
            raise DataError(
                f"no full batch of {batch_size}: the largest group of same-shape samples has {largest}; "
                "lower the batch size, raise repeats, or do not drop the last batch"
            )

    def __len__(self) -> int:
        return self._per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        batches = bucket_batches(
            self.dataset, self.batch_size, seed=self.seed, epoch=self.epoch, drop_last=self.drop_last
        )
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def skip_to(self, batches_consumed: int) -> None:
        """Continue as if `batches_consumed` batches had been taken since epoch 0."""
        self.epoch, self.position = divmod(batches_consumed, self._per_epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items: latents (B,C,F,H,W), prompt_embeds (B,L,D), captions and paths as lists."""
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"collate got latents of several shapes {sorted(shapes)}; batch with BucketBatchSampler")
    # Wan zero-pads text embeddings to a fixed length, so padding shorter ones with zeros changes nothing.
    length = max(item["prompt_embeds"].shape[0] for item in items)
    embeds = [torch.nn.functional.pad(item["prompt_embeds"], (0, 0, 0, length - item["prompt_embeds"].shape[0]))
              for item in items]  # fmt: skip
    return {
        "latents": torch.stack([item["latents"] for item in items]),
        "prompt_embeds": torch.stack(embeds),
        "captions": [item["caption"] for item in items],
        "paths": [item["path"] for item in items],
    }
