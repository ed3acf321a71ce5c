"""Session-wide fixtures: one tiny Wan pipeline and one tiny dataset, built offline once and shared by every test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    """Folder of a tiny saved `WanPipeline` (loads with `WanPipeline.from_pretrained`). Do not modify it."""
    from simpletuner_dmd.hosts.reference.tiny import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-model") / "tiny-wan")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Folder of 6 PNGs and 4 nine-frame GIFs (64x64), each with a `.txt` caption. Copy it before modifying."""
    from simpletuner_dmd.hosts.reference.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "tiny-dataset")
