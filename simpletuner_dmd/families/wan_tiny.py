"""A tiny Wan pipeline built offline, for tests, the examples and ``simpletuner-dmd make-tiny``: the Wan families'
``make_tiny`` build theirs from it, and the reference host's tiny dataset (``hosts/reference/tiny.py``) captions its
digits with the words the tokenizer here is trained on.

Nothing here downloads anything: every weight is drawn from a seeded RNG and the tokenizer is trained in memory.

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

import torch

# Enough distinct words that the Unigram trainer has material; the captions of the reference host's tiny dataset are
# drawn from the same words (and colours), so they tokenize into real pieces rather than single characters.
COLOURS = {
    "red": (230, 60, 50),
    "green": (60, 200, 90),
    "blue": (60, 110, 235),
    "yellow": (240, 210, 60),
    "purple": (160, 80, 210),
    "orange": (245, 150, 40),
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_TOKENIZER_CORPUS = [
    f"{article(colour)} {colour} digit {d} {verb}"
    for colour in COLOURS
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


def make_tiny_wan_i2v(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny Wan 2.1 image-to-video ``WanImageToVideoPipeline`` saved to ``path``; returns ``path``.

    The tiny Wan of ``make_tiny_wan`` (its VAE, text encoder and tokenizer; 8x spatial, 4x temporal compression) with
    the I2V transformer's inputs: 36 input channels (16 noisy latents, 4 of the first-frame mask, 16 of the
    conditioning latents), 16 out, image embeds of width 16 through their own key/value projections; and the CLIP
    image side: a ``CLIPVisionModel`` (width 16, 32 px images, patch 8, 2 layers; the penultimate layer's 17 tokens
    are the image embeds) with ``CLIPImageProcessor(size=32)``. The ``wan-i2v`` family's ``make_tiny`` and the
    SimpleTuner bridge's tests (``hosts/simpletuner/tiny_models.py``) build it.

    SimpleTuner: ``model_family: wan``, ``model_flavour: i2v-14b-2.1``; video datasets of mp4 clips with
    ``video: {is_i2v: true}`` in the backend (a GIF is read as a single image).
    """
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    inner = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    make_tiny_wan(path, seed=seed, transformer={"in_channels": 36, "out_channels": 16, "image_dim": 16,
                                                "added_kv_proj_dim": inner})
    t2v = WanPipeline.from_pretrained(path)
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    parts = {name: part for name, part in t2v.components.items() if name != "transformer_2"}
    WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=image_processor).save_pretrained(path)
    return path
