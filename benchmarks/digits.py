"""Case B: scikit-learn's digits through the Wan family and the reference host trainer.

The honest minimal route, and why: the Wan family and the reference host always encode media with the pipeline's VAE
(there is no "pre-computed latents" path), and no pretrained Wan VAE can be downloaded here. So the "model" is a
diffusers Wan pipeline folder whose VAE is the seeded, untrained tiny ``AutoencoderKLWan`` of
``simpletuner_dmd.hosts.reference.tiny`` and whose transformer is trained here; the data distribution the teacher
learns is the distribution of that VAE's latents of the 1,797 digits (8x8 upsampled to 32x32 grey RGB PNGs →
latents ``(16, 1, 4, 4)``), normalised by the VAE's ``latents_mean``/``latents_std``, which ``calibrate_vae`` sets to
the digits' own latent statistics. Everything is measured in that latent space:

- the teacher: a ``WanTransformer3DModel`` (4 layers, width 128, patch 1x1 → 16 tokens) trained by flow matching with
  the reference host itself (no ``distillation_method``: the host's own loss, ``model_type: full``);
- the students: ``simpletuner_dmd.hosts.reference.trainer.train`` with ``distillation_method: dmd`` and the keys a
  user would set, from the teacher's folder;
- the metric: Fréchet distance in the penultimate layer of a small MLP classifier trained on the real latents
  ("digits FD"), and class coverage (classes that receive at least half their share of the samples, by that
  classifier). Image grids show the samples through a ridge-regression decoder from latents to the 8x8 digits (fitted
  on the real pairs; for viewing only — the untrained VAE's decoder shows noise).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from simpletuner_dmd import hookimpl

SIZE = 32
CAPTION = "a digit"
N_EVAL = 1797  # as many samples as real digits
# One caption, a few tokens: 8 text tokens instead of Wan's 512 make the teacher's training about N× cheaper here
# (the cross-attention and text projection dominate at 16 image tokens). A user key of the reference host.
TEXT_TOKENS = 8


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def make_data(folder: Path, n_digits: int = 1797) -> Path:
    """``n_digits`` PNGs (the digits, 8x8 → 32x32 bicubic, grey on black) with the caption ``a digit``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = folder / "data"
    if data.is_dir() and len(list(data.glob("*.png"))) == n_digits:
        return data
    data.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    for i, img in enumerate(digits.images[:n_digits]):
        grey = Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
        Image.merge("RGB", [grey] * 3).save(data / f"digit_{i:04d}_{digits.target[i]}.png")
        (data / f"digit_{i:04d}_{digits.target[i]}.txt").write_text(CAPTION + "\n")
    return data


def calibrate_vae(vae_folder: Path, data: Path) -> None:
    """Set the VAE's ``latents_mean`` / ``latents_std`` to the per-channel statistics of its latents of the digits.

    Wan's published values describe Wan's trained VAE on video; for the seeded tiny VAE the digits' latents vary by
    about 0.02 around offsets of about 0.3 under them, so flow matching would see a blob far smaller than its unit
    noise and the teacher would learn little more than the mean. Normalising with the data's own statistics is what
    those published values are for a trained VAE."""
    from diffusers import AutoencoderKLWan
    from PIL import Image

    vae = AutoencoderKLWan.from_pretrained(vae_folder).eval()
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
                          .permute(2, 0, 1)[:, None] for f in sorted(data.glob("*.png"))])
    with torch.no_grad():
        raw = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
    config_file = vae_folder / "config.json"
    config = json.loads(config_file.read_text())
    config["latents_mean"] = raw.mean(dim=(0, 2, 3, 4)).tolist()
    config["latents_std"] = raw.std(dim=(0, 2, 3, 4)).tolist()
    config_file.write_text(json.dumps(config, indent=2))


def _write_config(folder: Path, name: str, model: Path, data: Path, **overrides) -> Path:
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
        "data_backend_config": str(folder / "multidatabackend.json"), "output_dir": str(folder / name),
        "resolution": SIZE, "resolution_type": "pixel", "train_batch_size": 64, "learning_rate": 1e-4,
        "adam_weight_decay": 0.0, "flow_schedule_shift": 1.0, "report_to": "none", "validation_disable": True,
        "checkpoint_step_interval": 0, "seed": 0, "vae_batch_size": 64, "tokenizer_max_length": TEXT_TOKENS,
        **overrides,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def train_teacher(folder: Path, *, steps: int = 3000, n_digits: int = 1797, log=print) -> Path:
    """The teacher pipeline folder (cached): the tiny Wan pipeline with a transformer trained on the digits' latents
    by the reference host's own flow-matching loss."""
    from diffusers import WanTransformer3DModel

    from simpletuner_dmd.hosts.reference.tiny import make_tiny_wan
    from simpletuner_dmd.hosts.reference.trainer import train

    teacher = folder / "teacher-pipeline"
    if (teacher / "transformer" / "config.json").is_file():
        return teacher
    data = make_data(folder, n_digits)
    init = folder / "init-pipeline"
    if not (init / "model_index.json").is_file():
        tmp = folder / "init-pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_wan(tmp, seed=0)
        shutil.rmtree(tmp / "transformer")
        torch.manual_seed(0)
        _transformer().save_pretrained(tmp / "transformer")
        calibrate_vae(tmp / "vae", data)
        tmp.rename(init)
    start = time.time()
    config = _write_config(folder, "teacher-run", init, data, learning_rate=1e-3, lr_scheduler="cosine",
                           max_train_steps=steps, lr_warmup_steps=100)
    out = train(config)
    tmp = folder / "teacher-pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    shutil.rmtree(tmp / "transformer")
    WanTransformer3DModel.from_pretrained(out / "transformer").save_pretrained(tmp / "transformer")
    tmp.rename(teacher)
    log(f"case B: trained the teacher ({steps} steps, {time.time() - start:.0f} s): {teacher}")
    return teacher


# The students: what a user writes in config.json (on top of the teacher run's data keys).
STUDENT_DMD = {"generator_update_interval": 5, "real_score_guidance_scale": 1.0, "fake_score_lr": 1e-4,
               "min_timestep_ratio": 0.02, "max_timestep_ratio": 0.98}
STUDENTS = {
    "DMD 3-step (1000,757,522)": [1000, 757, 522],
    "DMD 1-step (1000)": [1000],
}


class CurveRecorder:
    """A plugin beside the method: records ``dmd_loss`` (from the method's ``StepLoss``) and ``fake_score_loss``
    (from its metrics) per optimizer step, as any third-party logger would."""

    def __init__(self):
        self.curves: dict[str, list[tuple[int, float]]] = {"dmd_loss": [], "fake_score_loss": []}

    @hookimpl(wrapper=True)
    def distill_loss(self, batch, step, host_loss):
        result = yield
        if result is not None and "dmd_loss" in result.logs:
            self.curves["dmd_loss"].append((step.global_step, float(result.logs["dmd_loss"])))
        return result

    @hookimpl(wrapper=True)
    def distill_metrics(self, step):
        results = yield
        for extra in results:
            if extra and "fake_score_loss" in extra:
                self.curves["fake_score_loss"].append((step.global_step, float(extra["fake_score_loss"])))
        return results


def train_student(folder: Path, teacher: Path, name: str, steps_list: list[int], *, seed: int, max_steps: int,
                  recorder: "CurveRecorder | None" = None) -> Path:
    from simpletuner_dmd.hosts.reference.trainer import train

    tag = f"student-{len(steps_list)}step-seed{seed}"
    config = _write_config(folder, tag, teacher, folder / "data", distillation_method="dmd",
                           distillation_config={**STUDENT_DMD, "dmd_denoising_steps": steps_list},
                           max_train_steps=max_steps, learning_rate=1e-4, train_batch_size=32, seed=seed)
    shutil.rmtree(folder / tag, ignore_errors=True)
    return train(config, plugins=(recorder,) if recorder else ()) / "transformer"


# --------------------------------------------------------------------------- sampling and metrics


class Evaluator:
    def __init__(self, folder: Path, teacher: Path, n_eval: int = N_EVAL):
        from simpletuner_dmd.families.wan import WanFamily

        self.n_eval = n_eval
        self.family = WanFamily()
        components = self.family.load_components(str(teacher), text_encoder_path=None, dtype=torch.float32)
        self.cond = self.family.encode_prompts(components, [CAPTION], max_length=TEXT_TOKENS)  # as in training
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = []
        for path in sorted((folder / "data").glob("*.png")):
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            pixels.append(torch.from_numpy(arr).permute(2, 0, 1)[:, None])
        pixels = torch.stack(pixels)
        self.labels = digits.target[:len(pixels)]  # the files are named by index, so sorted order is index order
        self.real = torch.cat([self.family.encode_pixels(components, pixels[i:i + 128])
                               for i in range(0, len(pixels), 128)])
        self.shape = self.real.shape[1:]
        self.classifier = _train_classifier(self.real.flatten(1), self.labels)
        self.real_feats = self.classifier.features(self.real.flatten(1))
        flat = self.real.flatten(1).numpy().astype(np.float64)
        target = digits.images[:len(flat)].reshape(len(flat), -1) / 16.0
        xtx = flat.T @ flat + 1.0 * np.eye(flat.shape[1])
        self.decoder = np.linalg.solve(xtx, flat.T @ target)  # ridge: latents → 8x8 pixels, viewing only

    def teacher_samples(self, network, steps: int, seed: int) -> torch.Tensor:
        sampler = self.family.euler_sampler(network, steps=steps, shift=1.0)
        return self._batched(lambda noise, g: sampler(noise, self._cond(len(noise)), None, 1.0, g), seed)

    def student_samples(self, network, timesteps: list[int], seed: int) -> torch.Tensor:
        from simpletuner_dmd.flow import flow_to_x0
        from simpletuner_dmd.methods.dmd.rollout import sample_with_schedule

        def run(noise, g):
            cond = self._cond(len(noise))
            predict = lambda x, t: flow_to_x0(x, self.family.predict_flow(network, x, t, cond), t)  # noqa: E731
            return sample_with_schedule(predict, noise, timesteps, g)

        return self._batched(run, seed)

    def _cond(self, n: int) -> torch.Tensor:
        return self.family.repeat_condition(self.cond, n)

    def _batched(self, fn, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(77_000 + seed)
        out = []
        with torch.no_grad():
            for i in range(0, self.n_eval, 256):
                noise = torch.randn((min(256, self.n_eval - i), *self.shape), generator=g)
                out.append(fn(noise, g).float())
        return torch.cat(out)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        flat = x.flatten(1)
        feats = self.classifier.features(flat)
        predicted = self.classifier.predict(flat)
        share = np.bincount(predicted, minlength=10) / len(predicted)
        return {"digits_fd": _frechet(self.real_feats, feats),
                "class_coverage": float((share >= 0.05).mean()),
                "class_tv": float(0.5 * np.abs(share - 0.1).sum())}

    def pixels(self, x: torch.Tensor) -> np.ndarray:
        return (x.flatten(1).numpy().astype(np.float64) @ self.decoder).reshape(-1, 8, 8).clip(0, 1)


class _Classifier(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64),
                                        torch.nn.SiLU())
        self.head = torch.nn.Linear(64, 10)

    def features(self, x):
        with torch.no_grad():
            return self.body((x - self.mean) / self.std).double().numpy()

    def predict(self, x):
        with torch.no_grad():
            return self.head(self.body((x - self.mean) / self.std)).argmax(1).numpy()


def _train_classifier(x: torch.Tensor, y: np.ndarray) -> _Classifier:
    torch.manual_seed(0)
    model = _Classifier(x.shape[1])
    model.mean, model.std = x.mean(0), x.std(0) + 1e-6
    labels = torch.from_numpy(y).long()
    perm = torch.randperm(len(x))
    held, train = perm[:len(x) // 6], perm[len(x) // 6:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _epoch in range(61):
        for idx in train[torch.randperm(len(train))].split(128):
            loss = torch.nn.functional.cross_entropy(model.head(model.body((x[idx] - model.mean) / model.std)),
                                                     labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.held_out_accuracy = float((model.predict(x[held]) == y[held.numpy()]).mean())
    return model


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


# --------------------------------------------------------------------------- the case


def run_case_b(out: Path, *, seeds: int, cache: Path, log=print, teacher_steps: int = 3000,
               student_steps: int = 600, n_eval: int = N_EVAL, teacher_euler: tuple[int, ...] = (50, 3, 1),
               plots: bool = True, n_digits: int = 1797) -> dict:
    from diffusers import WanTransformer3DModel

    from .gmm import summarise

    folder = cache / "digits"
    teacher_dir = train_teacher(folder, steps=teacher_steps, n_digits=n_digits, log=log)
    ev = Evaluator(folder, teacher_dir, n_eval)
    log(f"case B: classifier held-out accuracy on real latents {ev.classifier.held_out_accuracy:.3f}")
    teacher = WanTransformer3DModel.from_pretrained(teacher_dir / "transformer").eval()
    rows, grids, curves = {}, {}, {}
    half = len(ev.real) // 2  # the noise floor: one half of the real digits against the other
    rows["real digits (half vs other half)"] = {"kind": "reference", "metrics": summarise(
        [{**ev(ev.real[half:]), "digits_fd": _frechet(ev.real_feats[:half], ev.real_feats[half:])}])}
    for n in teacher_euler:
        name = f"teacher Euler {n}"
        samples = [ev.teacher_samples(teacher, n, s) for s in range(seeds)]
        rows[name] = {"kind": "teacher", "metrics": summarise([ev(x) for x in samples])}
        grids[name] = ev.pixels(samples[0])
        log(f"case B: {name}: {rows[name]['metrics']['digits_fd']['mean']:.3f}")
    for name, steps_list in STUDENTS.items():
        results, seconds = [], []
        for s in range(seeds):
            start = time.time()
            recorder = CurveRecorder() if s == 0 else None
            path = train_student(folder, teacher_dir, name, steps_list, seed=s, max_steps=student_steps,
                                 recorder=recorder)
            if recorder is not None:
                curves[name] = recorder.curves
            seconds.append(time.time() - start)
            student = WanTransformer3DModel.from_pretrained(path).eval()
            x = ev.student_samples(student, steps_list, s)
            results.append(ev(x))
            if s == 0:
                grids[name] = ev.pixels(x)
            log(f"case B: {name} seed {s}: {results[-1]} ({seconds[-1]:.0f} s)")
        rows[name] = {"kind": "student", "metrics": summarise(results), "seconds_per_run": sum(seconds) / seeds,
                      "dmd_config": {**STUDENT_DMD, "dmd_denoising_steps": steps_list}, "steps": student_steps}
    if plots:
        _plot_grids(out / "case_b_samples.png", grids)
        from .quality import plot_curves

        plot_curves(out / "case_b_curves.png", curves)
    fd50 = rows[f"teacher Euler {max(teacher_euler)}"]["metrics"]["digits_fd"]["mean"]
    fd3 = rows[f"teacher Euler {3 if 3 in teacher_euler else min(teacher_euler)}"]["metrics"]["digits_fd"]["mean"]
    targets = {name: {"fd / teacher-50": r["metrics"]["digits_fd"]["mean"] / fd50,
                      "fd / teacher-3": r["metrics"]["digits_fd"]["mean"] / fd3}
               for name, r in rows.items() if r["kind"] == "student"}
    return {"rows": rows, "targets": targets, "settings": {
        "teacher_steps": teacher_steps, "student_steps": student_steps, "seeds": seeds, "samples": n_eval,
        "classifier_held_out_accuracy": ev.classifier.held_out_accuracy}}


def _plot_grids(path: Path, grids: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for ax, (name, images) in zip(axes.flat, grids.items()):
        tiles = images[:64].reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
        ax.imshow(tiles, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(b: dict) -> list[str]:
    s = b["settings"]
    lines = [f"**Case B — digits through the Wan family and the reference host.** {s['seeds']} seeds per row; "
             f"{s['samples']} samples per run; teacher trained {s['teacher_steps']} steps, students "
             f"{s['student_steps']} steps; classifier held-out accuracy {s['classifier_held_out_accuracy']:.3f}.",
             "", "| row | digits FD ↓ | class coverage ↑ | class TV ↓ |", "| --- | --- | --- | --- |"]
    for name, row in b["rows"].items():
        m = row["metrics"]
        lines.append(f"| {name} | {m['digits_fd']['mean']:.3f} ± {m['digits_fd']['sd']:.3f} | "
                     f"{m['class_coverage']['mean']:.2f} ± {m['class_coverage']['sd']:.2f} | "
                     f"{m['class_tv']['mean']:.3f} ± {m['class_tv']['sd']:.3f} |")
    lines += ["", "| student | FD / teacher-50 (target ≤ 1.2) | FD / teacher-3 (target ≤ 0.5) |", "| --- | --- | --- |"]
    for name, t in b["targets"].items():
        lines.append(f"| {name} | {t['fd / teacher-50']:.2f} | {t['fd / teacher-3']:.2f} |")
    return lines + [""]
