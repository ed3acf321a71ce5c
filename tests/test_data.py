"""The reference host's data pipeline: backend config, media decoding, latent/text caching, shape-bucketed batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner_dmd.errors import ConfigError, DataError, UserError
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.hosts.reference.backends import load_backend_config, validate_backends
from simpletuner_dmd.hosts.reference.batches import BucketBatchSampler, bucket_batches, collate
from simpletuner_dmd.hosts.reference.latent_cache import build_cache
from simpletuner_dmd.hosts.reference.media_decode import load_media

WAN_MEDIA = {"frame_stride": WanFamily.frame_stride, "size_multiple": WanFamily.size_multiple}


class FakeEncoders:
    """Wan-shaped stand-ins that count their calls: (B,3,1+4k,H,W) -> (B,16,1+k,H/8,W/8); captions -> (B, words, 32)."""

    def __init__(self):
        self.pixel_calls = 0
        self.prompt_calls = 0

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.pixel_calls += 1
        pooled = torch.nn.functional.avg_pool3d(pixels[:, :, ::4], (1, 8, 8))
        return pooled.repeat(1, 6, 1, 1, 1)[:, :16]

    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        self.prompt_calls += 1
        length = max(len(c.split()) for c in captions)  # varies per batch, so collate must pad
        return torch.stack([torch.full((length, 32), float(len(c))) for c in captions])


def backends(data_dir: Path, cache: Path, **media) -> list[dict]:
    common = {"type": "local", "instance_data_dir": str(data_dir), "caption_strategy": "textfile", **media}
    return [
        {"id": "images", "dataset_type": "image", "cache_dir_vae": str(cache / "images"), "resolution": 64, **common},
        {"id": "videos", "dataset_type": "video", "cache_dir_vae": str(cache / "videos"), "resolution": 64, **common},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(cache / "text")},
    ]


def build(config, enc=None, **kwargs):
    enc = enc or FakeEncoders()
    return build_cache(config, enc.encode_pixels, enc.encode_prompts, progress=False, **WAN_MEDIA, **kwargs), enc


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path) -> Path:
    """A private copy of the shared tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


# ---------------------------------------------------------------------------------------------------------- config


def test_config_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps([
        {"id": "a", "type": "local", "dataset_type": "video", "instance_data_dir": "data", "cache_dir_vae": "cache/a",
         "video": {"num_frames": 9}},
        {"id": "t", "dataset_type": "text_embeds", "type": "local", "cache_dir": "cache/text"},
    ]))  # fmt: skip
    media, text = load_backend_config("cfg.json")
    assert media["instance_data_dir"] == str(tmp_path / "data")
    assert media["cache_dir"] == str(tmp_path / "cache" / "a")
    assert (media["num_frames"], media["repeats"], media["disabled"]) == (9, 0, False)
    assert "resolution" not in media and "resolution_type" not in media  # left for the host to default
    assert text["cache_dir"] == str(tmp_path / "cache" / "text")
    assert validate_backends([media, text], warn=pytest.fail) == [media, text]  # normalizing twice changes nothing


def test_malformed_json_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "multidatabackend.json"
    bad.write_text('[{"id": "a",}]')
    with pytest.raises(UserError) as e:
        load_backend_config(bad)
    assert str(bad) in str(e.value) and "not valid JSON" in str(e.value) and "\n" not in str(e.value)


def test_missing_and_non_list_configs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nope.json.*cannot read"):
        load_backend_config(tmp_path / "nope.json")
    (tmp_path / "obj.json").write_text('{"id": "a"}')
    with pytest.raises(UserError, match="obj.json.*expected a JSON list.*got a JSON dict"):
        load_backend_config(tmp_path / "obj.json")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dataset_type", "image_embeds", "backend 'images'.dataset_type: must be one of 'image', 'video', "
         "'text_embeds', got 'image_embeds'"),
        ("type", "aws", r"backend 'images'.type: must be one of 'local', got 'aws'"),
        ("caption_strategy", "filename", "backend 'images'.caption_strategy: must be one of 'textfile', got "
         "'filename'"),
        ("resolution_type", "area", r"backend 'images'.resolution_type: must be one of 'pixel_area', 'pixel', got "
         "'area'"),
        ("resolution", 1.0, "backend 'images'.resolution: must be an integer, got float 1.0"),
        ("repeats", -1, r"backend 'images'.repeats: must be in \[0, inf\], got -1"),
    ],
)
def test_unsupported_values_are_config_errors(tmp_path, key, value, message):
    config = backends(tmp_path, tmp_path / "cache")
    config[0][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_backends(config)


def test_disabled_backends_are_dropped_unchecked(tmp_path):
    config = backends(tmp_path, tmp_path / "cache")
    config.append({"id": "s3", "type": "aws", "aws_bucket_name": "b", "disabled": True})
    assert [b["id"] for b in validate_backends(config, warn=pytest.fail)] == ["images", "videos", "text"]


def test_all_problems_are_reported_at_once(tmp_path):
    config = backends(tmp_path, tmp_path / "cache")
    config[0]["type"] = "aws"
    config[1]["repeats"] = "2"
    with pytest.raises(ConfigError) as e:
        validate_backends(config)
    assert len(e.value.problems) == 2


def test_unimplemented_keys_warn_once_each_naming_key_and_backend(tmp_path):
    config = backends(tmp_path, tmp_path / "cache", crop=True, frame_interval=2, metadata_backend="discovery")
    config[1]["video"] = {"num_frames": 9, "min_frames": 9}
    config[2]["write_batch_size"] = 128
    config[0]["resolutoin"] = 64
    messages: list[str] = []
    validate_backends(config, warn=messages.append)
    for backend, key in [("images", "'crop'"), ("videos", "'crop'"), ("images", "'frame_interval'"),
                         ("videos", "'metadata_backend'"), ("videos", "'video.min_frames'"),
                         ("text", "'write_batch_size'")]:  # fmt: skip
        assert sum(f"backend '{backend}'" in m and key in m for m in messages) == 1, (backend, key, messages)
    assert any("'resolutoin'" in m and "did you mean 'resolution'" in m for m in messages)
    assert len(messages) == 3 * 2 + 3


def test_warnings_default_to_warnings_warn(tmp_path):
    config = backends(tmp_path, tmp_path / "cache")
    config[0]["crop"] = True
    with pytest.warns(UserWarning, match="backend 'images': key 'crop'"):
        validate_backends(config)


# ------------------------------------------------------------------------------------------------------------ media


def test_gif_loads_as_c_f_h_w_with_c_not_f(tiny_dataset):
    backend = validate_backends(backends(tiny_dataset, tiny_dataset / "cache"))[1]
    pixels = load_media(tiny_dataset / "video_000.gif", backend, **WAN_MEDIA)
    assert pixels.shape == (3, 9, 64, 64)
    assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
    # frames differ (the digit moves) and channels hold colour: the layout is not transposed
    assert not torch.equal(pixels[:, 0], pixels[:, -1])
    image = load_media(tiny_dataset / "image_000.png", validate_backends(backends(tiny_dataset, tiny_dataset / "c"))[0],
                       **WAN_MEDIA)
    assert image.shape == (3, 1, 64, 64)


def test_frames_are_trimmed_to_one_plus_four_k(tiny_dataset):
    backend = validate_backends(backends(tiny_dataset, tiny_dataset / "cache"))[1]
    for num_frames, kept in [(None, 9), (8, 5), (4, 1), (5, 5)]:
        pixels = load_media(tiny_dataset / "video_001.gif", dict(backend, num_frames=num_frames), **WAN_MEDIA)
        assert pixels.shape[1] == kept


@pytest.mark.parametrize("resolution_type, size", [("pixel_area", (80, 48)), ("pixel", (96, 64))])
def test_resize_keeps_aspect_and_crops_to_multiples_of_16(tmp_path, resolution_type, size):
    red = np.zeros((60, 100, 3), dtype=np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    backend = dict(validate_backends(backends(tmp_path, tmp_path / "cache"))[0], resolution_type=resolution_type)
    pixels = load_media(tmp_path / "red.png", backend, **WAN_MEDIA)
    assert pixels.shape == (3, 1, size[1], size[0])
    assert torch.allclose(pixels[0], torch.ones(())) and torch.allclose(pixels[1:], -torch.ones(()))


@pytest.mark.parametrize("delete", [False, True])
def test_damaged_files_are_skipped_reported_and_deleted_only_when_asked(dataset_copy, tmp_path, delete):
    png, gif = dataset_copy / "image_002.png", dataset_copy / "video_003.gif"
    png.write_bytes(png.read_bytes()[:200])
    gif.write_bytes(gif.read_bytes()[:20])
    warned: list[str] = []
    dataset, _ = build(backends(dataset_copy, tmp_path / "cache"), warn=warned.append, delete_problematic=delete)
    assert len(dataset) == 8 and str(png) not in {e.path for e in dataset.entries}
    report = {Path(item["path"]).name: item for item in dataset.skipped}
    assert set(report) == {"image_002.png", "video_003.gif"}
    assert all("cannot decode" in item["reason"] and item["deleted"] is delete for item in report.values())
    assert png.exists() is not delete and gif.exists() is not delete
    assert sum("skipped" in w and "image_002.png" in w for w in warned) == 1


def test_minimum_image_size_skips_small_media_and_never_deletes_them(dataset_copy, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 24), "red").save(dataset_copy / "small.png")
    (dataset_copy / "small.txt").write_text("a small red image")
    dataset, _ = build(backends(dataset_copy, tmp_path / "cache"), warn=lambda m: None, delete_problematic=True)
    assert len(dataset) == 11  # nothing skipped without a minimum
    config = backends(dataset_copy, tmp_path / "cache", minimum_image_size=32)  # √(40·24) ≈ 31 < 32 ≤ 64
    dataset, _ = build(config, warn=lambda m: None, delete_problematic=True)
    assert len(dataset) == 10 and [Path(i["path"]).name for i in dataset.skipped] == ["small.png"]
    assert "under minimum_image_size 32" in dataset.skipped[0]["reason"] and not dataset.skipped[0]["deleted"]
    assert (dataset_copy / "small.png").exists()


def test_compressed_cache_round_trips_and_either_form_is_reused(dataset_copy, tmp_path):
    plain, enc = build(backends(dataset_copy, tmp_path / "plain"))
    packed, _ = build(backends(dataset_copy, tmp_path / "packed"), compress=True)
    assert all(e.latents_file.endswith(".safetensors.gz") for e in packed.entries)
    for a, b in zip(plain, packed):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])
    again, enc2 = build(backends(dataset_copy, tmp_path / "packed"))  # compress off: the .gz files are reused
    assert enc2.pixel_calls == 0 and all(e.latents_file.endswith(".gz") for e in again.entries)


def test_aspect_bucket_rounding_puts_near_equal_aspects_in_one_bucket(tmp_path):
    from simpletuner_dmd.hosts.reference.media_decode import _fit

    def cropped(size, **kwargs):
        left, top, right, bottom = _fit(size, 480, "pixel_area", tmp_path, 16, **kwargs)[1]
        return right - left, bottom - top

    sizes = [(1750, 1000), (1840, 1000)]  # aspects 1.75 and 1.84: both 1.8 at one decimal
    assert len({cropped(s) for s in sizes}) == 2
    assert len({cropped(s, aspect_rounding=1) for s in sizes}) == 1
    assert len({cropped(s, aspect_rounding=2) for s in sizes}) == 2


def test_missing_caption_is_a_data_error_naming_the_file(dataset_copy, tmp_path):
    (dataset_copy / "image_001.txt").unlink()
    with pytest.raises(DataError, match=r"image_001\.png: no caption file image_001\.txt"):
        build(backends(dataset_copy, tmp_path / "cache"))


def test_empty_caption_is_a_data_error_naming_the_file(dataset_copy, tmp_path):
    (dataset_copy / "video_002.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"video_002\.gif: caption file video_002\.txt is empty"):
        build(backends(dataset_copy, tmp_path / "cache"))


def test_empty_folder_is_a_data_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    messages: list[str] = []
    with pytest.raises(DataError, match=f"dataset is empty: no media found in {empty}"):
        build(backends(empty, tmp_path / "cache"), warn=messages.append)
    assert len(messages) == 2  # one "no media" warning per backend
    with pytest.raises(DataError, match="missing is not a folder"):
        build(backends(tmp_path / "missing", tmp_path / "cache"))


def test_mp4_without_a_reader_says_what_to_install(dataset_copy, tmp_path, monkeypatch):
    from simpletuner_dmd.hosts.reference import media_decode as D

    # imageio-ffmpeg is a dependency; a user who removed it (or a broken install) gets this line
    monkeypatch.setattr(D, "_can_read_video_containers", lambda: False)
    (dataset_copy / "clip.mp4").write_bytes(b"\x00" * 64)
    (dataset_copy / "clip.txt").write_text("a clip")
    with pytest.raises(UserError, match=r"clip\.mp4: reading \.mp4 video needs imageio-ffmpeg"):
        build(backends(dataset_copy, tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------------------ cache


def test_cache_is_reused_and_keyed_on_resolution(tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    first, enc = build(backends(tiny_dataset, cache), vae_batch_size=4)
    assert enc.pixel_calls == 3  # 6 images in batches of 4, 4 videos in one batch
    assert enc.prompt_calls == 1
    assert len(list((cache / "images").glob("*.safetensors"))) == 6
    assert len(list((cache / "videos").glob("*.safetensors"))) == 4
    assert len(list((cache / "text").glob("*.safetensors"))) == len({e.caption for e in first.entries})
    assert not list(cache.rglob("*.tmp"))

    second, enc = build(backends(tiny_dataset, cache))
    assert (enc.pixel_calls, enc.prompt_calls) == (0, 0)
    assert second.entries == first.entries

    smaller, enc = build(backends(tiny_dataset, cache, resolution=32))
    assert enc.pixel_calls > 0 and enc.prompt_calls == 0  # new size, same captions
    assert {e.shape for e in smaller.entries} == {(16, 1, 4, 4), (16, 3, 4, 4)}


def test_host_can_default_the_resolution_of_loaded_backends(tiny_dataset, tmp_path):
    config = backends(tiny_dataset, tmp_path / "cache")
    del config[0]["resolution"]
    loaded = validate_backends(config)
    for backend in loaded[:2]:  # media backends only, as the trainer does
        backend.setdefault("resolution", 32)
    dataset, _ = build(loaded)
    assert {e.shape for e in dataset.entries} == {(16, 1, 4, 4), (16, 3, 8, 8)}


def test_text_embeds_default_to_first_media_cache(tiny_dataset, tmp_path):
    build(backends(tiny_dataset, tmp_path / "cache")[:2])
    assert len(list((tmp_path / "cache" / "images" / "text_embeds").glob("*.safetensors"))) == 10


def test_items_are_c_f_h_w_and_repeats_and_disabled_are_honoured(tiny_dataset, tmp_path):
    config = backends(tiny_dataset, tmp_path / "cache")
    config[0]["repeats"] = 2
    dataset, _ = build(config)
    assert len(dataset) == 6 * 3 + 4
    shapes = {tuple(item["latents"].shape) for item in dataset}
    assert shapes == {(16, 1, 8, 8), (16, 3, 8, 8)}
    item = dataset[len(dataset) - 1]
    assert set(item) == {"latents", "prompt_embeds", "caption", "path"}
    assert item["prompt_embeds"].ndim == 2 and item["prompt_embeds"].shape[1] == 32
    assert Path(item["path"]).with_suffix(".txt").read_text().strip() == item["caption"]

    config[1]["disabled"] = True
    only_images, _ = build(config)
    assert {e.shape for e in only_images.entries} == {(16, 1, 8, 8)}


def test_real_tiny_vae_and_text_encoder(tiny_wan, tiny_dataset, tmp_path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan, local_files_only=True)

    def encode_pixels(pixels):
        return pipe.vae.encode(pixels).latent_dist.mode()

    def encode_prompts(captions):
        return pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=32)[0]

    dataset = build_cache(backends(tiny_dataset, tmp_path / "cache"), encode_pixels, encode_prompts, progress=False,
                          **WAN_MEDIA)
    assert sorted({e.shape for e in dataset.entries}) == [(16, 1, 8, 8), (16, 3, 8, 8)]
    batch = collate([dataset[i] for i in range(2)])
    assert batch["latents"].shape == (2, 16, 1, 8, 8) and batch["prompt_embeds"].shape == (2, 32, 32)


# ---------------------------------------------------------------------------------------------------------- batches


@pytest.fixture
def mixed(tiny_dataset, tmp_path):
    config = backends(tiny_dataset, tmp_path / "cache")
    config[0]["repeats"] = 1
    # text_batch_size=1: each caption's embedding is as long as its word count, so collate has to pad
    return build(config, text_batch_size=1)[0]  # 12 image samples, 4 video samples


def test_batches_never_mix_shapes_and_cover_each_epoch(mixed):
    for seed in range(3):
        for epoch in range(3):
            batches = bucket_batches(mixed, 5, seed=seed, epoch=epoch)
            assert all(len({mixed.shapes[i] for i in b}) == 1 for b in batches)
            assert sorted(i for b in batches for i in b) == list(range(len(mixed)))
    assert bucket_batches(mixed, 5, seed=0, epoch=0) == bucket_batches(mixed, 5, seed=0, epoch=0)
    assert bucket_batches(mixed, 5, seed=0, epoch=0) != bucket_batches(mixed, 5, seed=0, epoch=1)
    dropped = bucket_batches(mixed, 5, seed=0, drop_last=True)
    assert sorted(len(b) for b in dropped) == [5, 5]  # 12 images -> 2 full batches, 4 videos -> none


def test_sampler_resumes_mid_epoch_with_the_same_batches(mixed):
    reference = BucketBatchSampler(mixed, 3, seed=7)
    seen = [b for _ in range(3) for b in reference]  # three epochs through the DataLoader protocol
    assert len(seen) == 3 * len(reference) and reference.state_dict() == {"epoch": 3, "position": 0}

    for consumed in (0, 4, len(reference), len(reference) + 2):
        resumed = BucketBatchSampler(mixed, 3, seed=7)
        resumed.skip_to(consumed)
        replay = [b for _ in range(3) for b in resumed][: len(seen) - consumed]
        assert replay == seen[consumed:]

    interrupted = BucketBatchSampler(mixed, 3, seed=7)
    for i, _ in enumerate(interrupted):
        if i == 2:
            break
    state = interrupted.state_dict()
    restored = BucketBatchSampler(mixed, 3, seed=7)
    restored.load_state_dict(state)
    assert state == {"epoch": 0, "position": 3} and list(restored) == seen[3 : len(reference)]


def test_dataloader_with_sampler_and_collate(mixed):
    sampler = BucketBatchSampler(mixed, 4, seed=0)
    loader = torch.utils.data.DataLoader(mixed, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        b = len(batch["captions"])
        assert batch["latents"].shape[:2] == (b, 16) and batch["latents"].ndim == 5
        assert batch["prompt_embeds"].shape[0] == b and batch["prompt_embeds"].shape[2] == 32
        longest = max(len(c.split()) for c in batch["captions"])
        assert batch["prompt_embeds"].shape[1] == longest  # shorter embeddings zero-padded


def test_drop_last_with_no_full_batch_is_a_data_error(mixed):
    with pytest.raises(DataError, match="no full batch of 20: the largest group of same-shape samples has 12"):
        BucketBatchSampler(mixed, 20, seed=0, drop_last=True)
