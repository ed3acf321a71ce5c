"""A tiny Wan pipeline and a tiny captioned dataset, both built offline, for tests and the embedded example.

Nothing here downloads anything: every weight is drawn from a seeded RNG, the tokenizer is trained in memory, and the
media come from scikit-learn's bundled `load_digits` (1,797 real 8x8 hand-written digits).

Facts about the tiny VAE (`AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1,1,1,1], num_res_blocks=1,
temperal_downsample=[False, True, True])`), checked by `tests/test_tiny.py`:

- spatial compression 8x: a 64x64 input gives 8x8 latents;
- temporal compression 4x with the first frame kept on its own: 1+4k frames give 1+k latent frames
  (1 -> 1, 5 -> 2, 9 -> 3); frame counts that are not 1+4k are not meaningful to it;
- 16 latent channels, so pixels (B, 3, F, H, W) encode to latents (B, 16, 1+(F-1)//4, H/8, W/8).
  A 64x64 image -> (16, 1, 8, 8); a 9-frame 64x64 video -> (16, 3, 8, 8).

With the transformer's patch (1, 2, 2) a pixel side must be a multiple of 16 for the token grid to be whole.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Enough distinct words that the Unigram trainer has material; the captions of the tiny dataset are drawn from the
# same words, so they tokenize into real pieces rather than single characters.
_COLOURS = {
    "red": (230, 60, 50),
    "green": (60, 200, 90),
    "blue": (60, 110, 235),
    "yellow": (240, 210, 60),
    "purple": (160, 80, 210),
    "orange": (245, 150, 40),
}
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_TOKENIZER_CORPUS = [
    f"{_article(colour)} {colour} digit {d} {verb}"
    for colour in _COLOURS
    for d in range(10)
    for verb in ("on a black background", "moving left", "moving right", "moving up", "moving down")
] + ["a cat", "a dog walking on the beach", "a photo of a city at night", "an empty room", "hello world"]

_TOKENIZER_VOCAB_SIZE = 200  # below the text encoder's vocab_size=256, so every id is a valid embedding row


def _make_tokenizer():
    """A T5-style Unigram tokenizer (pad=0, eos=1, unk=2; eos appended) trained in memory on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    # Lower-casing (and the full ASCII alphabet added below) keep simple English prompts free of <unk>.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        special_tokens=special,
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    # The trainer orders equal-score pieces by Rust hash-map order, which changes from run to run (so "3" got a
    # different id each build). Rebuild the model with scores rounded and ties sorted by text: same ids every time.
    trained = {p: round(s, 6) for p, s in json.loads(tok.to_str())["model"]["vocab"] if p not in special}
    # Characters the corpus lacks get one equal, lowest score (the trainer's own `initial_alphabet` breaks those
    # ties with hash-ordered epsilons, which would undo the determinism above).
    floor = min(trained.values()) - 1.0
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        trained.setdefault(char, floor)
    pieces = sorted(trained.items(), key=lambda ps: (-ps[1], ps[0]))
    tok.model = models.Unigram([(p, 0.0) for p in special] + pieces, unk_id=special.index("<unk>"))
    eos_id = tok.token_to_id("</s>")
    # The pipeline relies on the tokenizer adding eos (add_special_tokens=True), as T5's does.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


# The tiny transformer's config (diffusers' WanTransformer3DModel); the Wan 2.2 families' tiny models start from it.
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# The tiny VAE's config (diffusers' AutoencoderKLWan): the facts in the module docstring.
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def make_tiny_wan(path: str | Path, *, seed: int = 0, transformer: dict | None = None, vae: dict | None = None,
                  second_transformer_seed: int | None = None, **pipeline_config) -> Path:
    """Build a complete tiny `WanPipeline` from config, save it to `path` and return `path`.

    Same `seed` gives the same weights. The folder reloads offline with `WanPipeline.from_pretrained(path)`.
    `transformer` / `vae` override keys of `TINY_TRANSFORMER` / `TINY_VAE`; `second_transformer_seed` adds a
    `transformer_2` (Wan 2.2 A14B's low-noise expert) drawn from that seed; `pipeline_config` are `WanPipeline`'s own
    config values (`boundary_ratio`, `expand_timesteps`).
    """
    # Imported here: diffusers/transformers cost seconds to import, and this module is imported by cheap code paths.
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer_config = {**TINY_TRANSFORMER, **(transformer or {})}
    network = WanTransformer3DModel(**transformer_config)
    autoencoder = AutoencoderKLWan(**{**TINY_VAE, **(vae or {})})
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=256,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    second = None
    if second_transformer_seed is not None:
        torch.manual_seed(second_transformer_seed)
        second = WanTransformer3DModel(**transformer_config)
    # Wan 2.1 is a flow-matching model trained with a time shift of 5 at 720p (3 at 480p); 5 matches the releases.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = WanPipeline(
        tokenizer=_make_tokenizer(),
        text_encoder=text_encoder,
        vae=autoencoder,
        scheduler=scheduler,
        transformer=network,
        transformer_2=second,
        **pipeline_config,
    )
    pipe.save_pretrained(path)
    return path


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
    colours = list(_COLOURS)
    directions = list(_DIRECTIONS)
    glyph = size // 2
    centre = (size - glyph) // 2

    for i in range(n_images):
        k = int(rng.integers(len(digits.images)))
        colour = colours[int(rng.integers(len(colours)))]
        frame = _digit_frame(digits.images[k], size, _COLOURS[colour], (centre, centre))
        Image.fromarray(frame).save(path / f"image_{i:03d}.png")
        caption = f"{_article(colour)} {colour} digit {digits.target[k]} on a black background"
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
        images = [Image.fromarray(_digit_frame(digits.images[k], size, _COLOURS[colour], o)) for o in offsets]
        images[0].save(path / f"video_{i:03d}.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
        caption = f"{_article(colour)} {colour} digit {digits.target[k]} moving {direction}"
        (path / f"video_{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return path
