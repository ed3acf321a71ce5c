"""Session-wide fixtures: one tiny Wan pipeline and one tiny dataset, built offline once and shared by every test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    """Folder of a tiny saved `WanPipeline` (loads with `WanPipeline.from_pretrained`). Do not modify it."""
    from simpletuner_dmd.families.wan_tiny import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-model") / "tiny-wan")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Folder of 6 PNGs and 4 nine-frame GIFs (64x64), each with a `.txt` caption. Copy it before modifying."""
    from simpletuner_dmd.hosts.reference.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "tiny-dataset")


@pytest.fixture()
def job(tmp_path, tiny_wan, tiny_dataset):
    """Write a config shaped like the example, with every path inside tmp_path; returns a writer of overrides."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    backends = json.loads((REPO / "config_examples/tiny-wan-dmd/multidatabackend.json").read_text())
    for b in backends:
        if "instance_data_dir" in b:
            b["instance_data_dir"] = str(data)
        b["cache_dir"] = str(tmp_path / "cache" / b["id"])
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    base = json.loads((REPO / "config_examples/tiny-wan-dmd/config.json").read_text())
    base.update(pretrained_model_name_or_path=str(tiny_wan), pretrained_t5_model_name_or_path=str(tiny_wan),
                data_backend_config=str(tmp_path / "backends.json"), output_dir=str(tmp_path / "out"),
                report_to="none", validation_num_video_frames=5, validation_resolution="32x32")

    def write(**overrides) -> Path:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**base, **overrides}))
        return path

    return write
