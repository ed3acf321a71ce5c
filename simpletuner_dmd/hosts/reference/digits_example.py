"""The embedded example's teacher: a tiny Wan pipeline that really draws digits, built offline in a few minutes.

``simpletuner-dmd make-example work`` writes, once (a second call finds them and returns at once):

- ``work/digits/``: scikit-learn's 1,797 hand-written digits as 16×16 grey PNGs, each with the caption
  ``a digit N``;
- ``work/digits-wan/``: a diffusers ``WanPipeline`` folder whose VAE (``AutoencoderKLWan``, base width 8) is trained
  here to reconstruct the digits, whose latent statistics are the digits' own, and whose transformer (4 layers,
  width 128, patch 1) is trained by the reference host itself (plain flow matching, ``model_type: full``, 10% of the
  captions dropped to the empty prompt so classifier-free guidance has an unconditional branch) to draw them;
- ``work/digits-fd/``: a feature space for the "digits FD" (``fd.py``): an MLP classifier on 16×16 grey pixels,
  trained on the real digits, and the real digits' feature statistics.

The distillation of the main job (``config_examples/tiny-wan-digits``) starts from ``work/digits-wan``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ...families.wan_tiny import make_tiny_wan
from .fd import save_feature_space, train_classifier
from .trainer import train

SIZE = 16  # pixels; the VAE's 8× compression gives 2×2 latents, 4 tokens at patch 1
TEXT_TOKENS = 16  # "a digit 7" is 9 tokens with this tokenizer; the teacher is trained (and must be run) with 16
RECIPE_VERSION = 1
FD_WIDTHS = [SIZE * SIZE, 128, 64, 10]


def caption(label: int) -> str:
    return f"a digit {label}"


def _digit_pixels(n_digits: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n_digits`` (default: all 1,797) digits as ``(N, 1, SIZE, SIZE)`` in [0, 1] (bicubic from 8×8) and
    their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images[:n_digits] / 16.0).float()[:, None]
    return torch.nn.functional.interpolate(x, size=SIZE, mode="bicubic").clamp(0, 1), digits.target[:n_digits]


def write_captioned(folder: Path, media: torch.Tensor, labels, *, stem: str, suffix: str,
                    save: Callable[[np.ndarray, Path], None]) -> Path:
    """``folder`` holding one ``<stem>_NNNN<suffix>`` per item of ``media`` (grey in [0, 1], ``(N, 1, …)``: ``save``
    writes the item's uint8 array to its path) with its ``.txt`` caption (``caption(label)``). Written into a
    ``.tmp`` folder renamed into place once complete; a folder already holding every item is kept as it is."""
    if folder.is_dir() and len(list(folder.glob(f"*{suffix}"))) == len(media):
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    grey = (media[:, 0].numpy() * 255).round().astype(np.uint8)
    for i, (item, label) in enumerate(zip(grey, labels)):
        save(item, tmp / f"{stem}_{i:04d}{suffix}")
        (tmp / f"{stem}_{i:04d}.txt").write_text(caption(int(label)) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def make_digits_dataset(folder: Path, n_digits: int | None = None) -> Path:
    pixels, labels = _digit_pixels(n_digits)
    return write_captioned(folder, pixels, labels, stem="digit", suffix=".png",
                           save=lambda img, path: Image.fromarray(img).convert("RGB").save(path))


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def train_vae(pixels: torch.Tensor, *, steps: int, seed: int = 0, batch: int = 64):
    """The VAE trained to reconstruct ``pixels`` (grey images ``(N, 1, H, W)`` or clips ``(N, 1, F, H, W)`` in
    [0, 1]; mean squared error on the posterior's mode, a small pull of the latents toward 0), then its
    ``latents_mean`` / ``latents_std`` set to the data's own latent statistics (what Wan's published values are for
    its trained VAE)."""
    torch.manual_seed(seed)
    vae = _vae()
    if pixels.ndim == 4:
        pixels = pixels[:, :, None]  # an image is a one-frame clip
    video = (pixels * 2 - 1).expand(-1, 3, -1, -1, -1).contiguous()  # (N, 3, F, H, W) in [-1, 1]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    bar = tqdm(range(steps), desc="digits VAE", dynamic_ncols=True)
    for _ in bar:
        b = video[torch.randint(len(video), (batch,), generator=gen)]
        z = vae.encode(b).latent_dist.mode()
        loss = (vae.decode(z).sample - b).pow(2).mean() + 1e-4 * z.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        chunk = max(1, 256 // video.shape[2])
        raw = torch.cat([vae.encode(video[i:i + chunk]).latent_dist.mode() for i in range(0, len(video), chunk)])
        recon = torch.cat([vae.decode(raw[i:i + chunk]).sample for i in range(0, len(raw), chunk)])
    vae.register_to_config(latents_mean=raw.mean(dim=(0, 2, 3, 4)).tolist(),
                           latents_std=raw.std(dim=(0, 2, 3, 4)).tolist())
    return vae, float((recon - video).pow(2).mean())


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def teacher_config(folder: Path, model: Path, data: Path, *, steps: int) -> Path:
    """The reference host's config that trains the teacher (plain flow matching on the digits)."""
    backends = [
        {"id": "digits", "type": "local", "dataset_type": "image", "instance_data_dir": str(data),
         "caption_strategy": "textfile", "cache_dir": str(folder / "cache" / "latents"), "resolution": SIZE,
         "resolution_type": "pixel", "repeats": 0},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds",
         "cache_dir": str(folder / "cache" / "text")},
    ]
    (folder / "multidatabackend.json").write_text(json.dumps(backends, indent=1))
    config = {
        "model_family": "wan", "model_type": "full", "pretrained_model_name_or_path": str(model),
        "data_backend_config": str(folder / "multidatabackend.json"), "output_dir": str(folder / "run"),
        "resolution": SIZE, "resolution_type": "pixel", "train_batch_size": 64, "learning_rate": 1e-3,
        "lr_scheduler": "cosine", "lr_warmup_steps": 100, "max_train_steps": steps, "adam_weight_decay": 0.0,
        "flow_schedule_shift": 1.0, "caption_dropout_probability": 0.1, "report_to": "none",
        "validation_disable": True, "checkpoint_step_interval": 0, "seed": 0, "vae_batch_size": 256,
        "tokenizer_max_length": TEXT_TOKENS,
    }
    path = folder / "teacher.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def make_fd_features(folder: Path, pixels: torch.Tensor, labels: np.ndarray, *, epochs: int) -> float:
    flat = pixels.flatten(1)
    net, accuracy = train_classifier(flat, labels, widths=FD_WIDTHS, epochs=epochs)
    with torch.no_grad():
        real = net.features(flat).double().numpy()
    save_feature_space(folder, name="digits FD", size=SIZE, net=net, widths=FD_WIDTHS, real_features=real,
                       held_out_accuracy=accuracy)
    return accuracy


def make_digits_example(workdir: str | Path, *, vae_steps: int = 300, teacher_steps: int = 1200,
                        classifier_epochs: int = 60, n_digits: int | None = None, log=print) -> dict[str, Path]:
    """Build (or find) ``workdir/digits``, ``workdir/digits-wan`` and ``workdir/digits-fd``; see the module's text.
    The step counts and ``n_digits`` (default: all) are there for tests: smaller ones build a teacher that draws
    nothing in seconds."""
    workdir = Path(workdir)
    paths = {"dataset": workdir / "digits", "model": workdir / "digits-wan", "fd_features": workdir / "digits-fd"}
    recipe = {"version": RECIPE_VERSION, "vae_steps": vae_steps, "teacher_steps": teacher_steps,
              "classifier_epochs": classifier_epochs, "n_digits": n_digits}
    stamp = paths["model"] / "simpletuner_dmd_example.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe and \
            (paths["fd_features"] / "features.json").is_file() and paths["dataset"].is_dir():
        log(f"the digits example is already built (delete {paths['model']} to rebuild): {paths['model']}")
        return paths
    threads = torch.get_num_threads()
    # Networks this small run several times faster on one thread: with more, each tiny op waits on the others.
    torch.set_num_threads(1)
    try:
        return _build(workdir, paths, recipe, vae_steps=vae_steps, teacher_steps=teacher_steps,
                      classifier_epochs=classifier_epochs, n_digits=n_digits, log=log)
    finally:
        torch.set_num_threads(threads)


def _build(workdir: Path, paths: dict[str, Path], recipe: dict, *, vae_steps: int, teacher_steps: int,
           classifier_epochs: int, n_digits: int | None, log) -> dict[str, Path]:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel


    start = time.time()
    make_digits_dataset(paths["dataset"], n_digits)
    log(f"made the digits dataset: {paths['dataset']}")
    pixels, labels = _digit_pixels(n_digits)

    accuracy = make_fd_features(paths["fd_features"], pixels, labels, epochs=classifier_epochs)
    log(f"made the digits FD feature space (its classifier's held-out accuracy {accuracy:.3f}): "
        f"{paths['fd_features']}")

    build = workdir / "digits-build"
    shutil.rmtree(build, ignore_errors=True)
    init = make_tiny_wan(build / "init", seed=0)  # text encoder and tokenizer; VAE and transformer replaced
    vae, mse = train_vae(pixels, steps=vae_steps)
    shutil.rmtree(init / "vae")
    vae.save_pretrained(init / "vae")
    log(f"trained the digits VAE ({vae_steps} steps; reconstruction MSE {mse:.4f} on [-1, 1])")
    shutil.rmtree(init / "transformer")
    torch.manual_seed(0)
    _transformer().save_pretrained(init / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(init / "scheduler")

    out = train(teacher_config(build, init, paths["dataset"], steps=teacher_steps))
    tmp = workdir / "digits-wan.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    shutil.rmtree(tmp / "transformer")
    WanTransformer3DModel.from_pretrained(out / "transformer").save_pretrained(tmp / "transformer")
    (tmp / "simpletuner_dmd_example.json").write_text(json.dumps({
        "recipe": recipe, "vae_reconstruction_mse": mse, "fd_classifier_held_out_accuracy": accuracy,
        "tokenizer_max_length": TEXT_TOKENS, "flow_schedule_shift": 1.0, "seconds": time.time() - start}, indent=1))
    shutil.rmtree(paths["model"], ignore_errors=True)
    tmp.rename(paths["model"])
    shutil.rmtree(build, ignore_errors=True)
    log(f"trained the digits teacher ({teacher_steps} steps; {time.time() - start:.0f} s in all): {paths['model']}")
    return paths


__all__ = ["caption", "make_digits_dataset", "make_digits_example", "make_fd_features", "teacher_config",
           "train_vae"]
