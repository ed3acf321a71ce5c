"""The reference host's tiny captioned dataset, built offline, for tests and ``simpletuner-dmd make-tiny --dataset``.

The media come from scikit-learn's bundled `load_digits` (1,797 real 8x8 hand-written digits), captioned with the words
the tiny Wan tokenizer is trained on (``families/wan_tiny.py``, where the tiny pipeline is built; ``make_tiny_wan`` is
still importable from here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ...families.wan_tiny import COLOURS, article, make_tiny_wan  # noqa: F401 — make_tiny_wan: the old import path

_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _digit_frame(digit: np.ndarray, size: int, colour: tuple[int, int, int], offset: tuple[int, int]) -> np.ndarray:
    """One RGB uint8 frame: the 8x8 digit upscaled to half of `size`, coloured, placed on black at `offset`."""
    glyph = size // 2
    grey = Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((glyph, glyph), Image.BICUBIC)
    alpha = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    frame = np.zeros((size, size, 3), dtype=np.float32)
    x, y = offset
    frame[y : y + glyph, x : x + glyph] = alpha * np.array(colour, dtype=np.float32)
    return frame.clip(0, 255).astype(np.uint8)


def make_tiny_dataset(
    path: str | Path, *, n_images: int = 6, n_videos: int = 4, size: int = 64, frames: int = 9, seed: int = 0
) -> Path:
    """Write `n_images` PNGs and `n_videos` animated GIFs of coloured digits, each with a same-stem `.txt` caption.

    Images show a still digit in the middle; videos move the digit in one direction across `frames` frames.
    """
    from sklearn.datasets import load_digits

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    directions = list(_DIRECTIONS)
    glyph = size // 2
    centre = (size - glyph) // 2

    for i in range(n_images):
        k = int(rng.integers(len(digits.images)))
        colour = colours[int(rng.integers(len(colours)))]
        frame = _digit_frame(digits.images[k], size, COLOURS[colour], (centre, centre))
        Image.fromarray(frame).save(path / f"image_{i:03d}.png")
        caption = f"{article(colour)} {colour} digit {digits.target[k]} on a black background"
        (path / f"image_{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")

    for i in range(n_videos):
        k = int(rng.integers(len(digits.images)))
        colour = colours[int(rng.integers(len(colours)))]
        direction = directions[int(rng.integers(len(directions)))]
        dx, dy = _DIRECTIONS[direction]
        # Travel from one edge to the other along the chosen axis, so motion is visible at every frame.
        span = size - glyph
        steps = np.linspace(0, span, frames).round().astype(int)
        offsets = [
            (
                (steps[t] if dx > 0 else span - steps[t]) if dx else centre,
                (steps[t] if dy > 0 else span - steps[t]) if dy else centre,
            )
            for t in range(frames)
        ]
        images = [Image.fromarray(_digit_frame(digits.images[k], size, COLOURS[colour], o)) for o in offsets]
        images[0].save(path / f"video_{i:03d}.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
        caption = f"{article(colour)} {colour} digit {digits.target[k]} moving {direction}"
        (path / f"video_{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return path
