"""Validation samples as files a user can open: one PNG per frame and, for videos, an animated GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_sample(pixels: torch.Tensor, folder: Path, fps: int = 8) -> Path:
    """``pixels`` ``(3, F, H, W)`` in [0, 1] → ``folder/frame-000.png``… and ``folder/sample.gif`` when F > 1.

    Returns the file to show: the GIF for a video, the PNG for an image."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = (pixels.detach().float().clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)
    images = [Image.fromarray(frame) for frame in frames]
    for i, image in enumerate(images):
        image.save(folder / f"frame-{i:03d}.png")
    if len(images) == 1:
        return folder / "frame-000.png"
    gif = folder / "sample.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return gif
