"""The reference host's latent cache: the model family's encoders turn pixels and captions into latents and text
embeddings once; each is stored as a `.safetensors` file named by a hash of what it depends on, so a second run
encodes nothing. `build_cache` fills it and returns the `CachedDataset` the trainer reads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes, load_file, save as save_bytes, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from simpletuner_dmd.atomic import write_file
from simpletuner_dmd.errors import DataError

from .backends import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Warn, find_media, read_caption, validate_backends
from .media_decode import ProblematicFile, _check_video_support, check_minimum_size, load_media


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


CLIP_PREFIX = "clip."  # a family's clip_condition tensors, in the clip's latents file
COMPRESSED = ".safetensors.gz"  # compress_disk_cache: the safetensors bytes, gzip-compressed


def _save_atomic(tensors: dict[str, torch.Tensor], dest: Path) -> None:
    # A killed run must never leave a half-written file under the final name: it would be "reused" next time.
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if str(dest).endswith(COMPRESSED):
        data = gzip.compress(save_bytes(tensors), compresslevel=6)
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
    encode_clip: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> "CachedDataset":
    """Encode every enabled backend's media and captions that are not cached yet; return the cached dataset.

    `encode_pixels((B, 3, F, H, W) in [-1, 1]) -> (B, C', F', H', W')` and `encode_prompts(list[str]) -> (B, L, D)`
    come from the model family, and so do `frame_stride` (videos are trimmed to 1 + stride·k frames) and
    `size_multiple` (media are cropped to multiples of it). `cache_tag` (e.g. the model's name) goes into every cache
    name, so two models never share cached tensors. ``compress`` writes new cache files gzip-compressed
    (``compress_disk_cache``). ``encode_clip`` (the family's ``clip_condition``, when it has one) maps the same
    pixels to ``{name: (B, ...)}``, stored in the clip's latents file as ``clip.<name>`` beside ``latents``.

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
                                         media={"frame_stride": frame_stride, "size_multiple": size_multiple},
                                         encode_clip=encode_clip)
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
                            skip: Callable[[ProblematicFile], None], encode_clip=None) -> set[Path]:
    """Encode what is not cached yet; returns the media that could not be decoded (each passed to ``skip``)."""
    todo = [(backend, path, file) for backend, path, _, file, _ in items if not file.exists()]
    failed: set[Path] = set()
    pending: dict[tuple, list[tuple[torch.Tensor, Path]]] = {}  # same-shape pixels wait to fill a batch

    def flush(shape):
        pixels, files = zip(*pending.pop(shape))
        latents = encode_pixels(torch.stack(pixels))
        if latents.ndim != 5 or latents.shape[0] != len(files):
            raise ValueError(f"encode_pixels returned {tuple(latents.shape)} for {len(files)} inputs; want (B,C,F,H,W)")
        clip = {} if encode_clip is None else encode_clip(torch.stack(pixels))
        for i, (latent, file) in enumerate(zip(latents, files)):
            _save_atomic({"latents": latent, **{f"{CLIP_PREFIX}{k}": v[i] for k, v in clip.items()}}, file)

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
        """``latents``, ``prompt_embeds``, ``caption``, ``path``; and ``clip`` ({name: tensor}) when the latents file
        holds a family's ``clip_condition``."""
        e = self.entries[index]
        media = _load(e.latents_file, None)
        item = {
            "latents": media["latents"],
            "prompt_embeds": _load(e.embeds_file, "prompt_embeds"),
            "caption": e.caption,
            "path": e.path,
        }
        clip = {k[len(CLIP_PREFIX):]: v for k, v in media.items() if k.startswith(CLIP_PREFIX)}
        if clip:
            item["clip"] = clip
        return item


def _load(file: str, key: str | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The tensor ``key`` of a cache file (``None``: every tensor, by name)."""
    try:
        if file.endswith(COMPRESSED):
            tensors = load_bytes(gzip.decompress(Path(file).read_bytes()))
        else:
            tensors = load_file(file)
        if key is None:
            if "latents" not in tensors:
                raise KeyError("latents")
            return tensors
        return tensors[key]
    except (OSError, SafetensorError, KeyError, EOFError) as e:  # gzip raises OSError/EOFError on a damaged file
        raise DataError(f"{file}: unreadable cache file ({e}); delete it to rebuild") from None
