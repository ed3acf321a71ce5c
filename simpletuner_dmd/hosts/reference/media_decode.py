"""Media decoding for the reference host: one image or video file -> float pixels in [-1, 1] laid out (C, F, H, W)
(an image has F=1).

Each side is resized, then centre-cropped down to a multiple of the family's `size_multiple` (Wan: 16, VAE 8x times
patch 2), and a video keeps 1 + `frame_stride`·k frames (Wan: 1+4k, its VAE compresses time 4x after the first frame).
A file that cannot be decoded, has no frames or is under `minimum_image_size` raises `ProblematicFile`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from simpletuner_dmd.errors import DataError, UserError

from .backends import IMAGE_EXTENSIONS


class ProblematicFile(DataError):
    """A media file the run skips (and lists in its data report): it cannot be decoded, has no frames, or is smaller
    than ``minimum_image_size``. ``deletable``: a damaged file, which ``delete_problematic_images`` removes; a small
    one is only skipped."""

    def __init__(self, path: Path, reason: str, *, deletable: bool):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.deletable = path, reason, deletable


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
