"""Case C: moving digits video — a bidirectional teacher, an ODE-initialised causal student, then Self-Forcing DMD.

    python -m benchmarks.quality --cases c        # or: python -m benchmarks.moving_digits

Everything is built here, offline, and cached in ``<cache>/moving-digits`` (a second run reuses each stage whose
recipe is unchanged):

1. **Data**: scikit-learn's digits (16×16, as the digits example) moving in straight lines on a 32×32 black canvas,
   9 frames (3 latent frames: Wan's VAE compresses time 4×), 2 pixels per frame in one of 8 directions, starting
   where the clip stays inside; GIFs captioned ``a digit N``.
2. **A video VAE** (``AutoencoderKLWan``, base width 8, as the digits example's) trained on the clips.
3. **The teacher**: a bidirectional tiny Wan (4 layers, width 128, patch 1: 16 tokens per latent frame) trained on
   the clips by the reference host (3000 steps, batch 32) (plain flow matching, ``model_type: full``, 10 % of captions dropped).
4. **The causal student, stage 1**: ``distillation_method: ode_init`` on ``model_family: wan-causal`` (a LoRA on
   the teacher's weights; one latent frame per block), regressed onto the teacher's ODE pairs (50 Euler steps,
   guidance 1, the ten prompts).
5. **Stage 2**: Self-Forcing DMD from stage 1's LoRA (``init_lora``), the same keys, ``DMD_STEPS`` (2400) steps.

Metrics (``N_EVAL`` clips, the ten prompts in turn, the same noises for every row), against the teacher's 50-step
Euler sampler: **per-frame digits FD** (each frame cropped 16×16 around its intensity centre of mass, the digits FD
feature space of the digits example, against the real digits' statistics; the mean over frames), **motion** (the
centre of mass's displacement from frame to frame: mean speed in pixels per frame and its spread over clips), and
**black / frozen frames** (a frame whose brightest pixel is under 0.2; a frame that differs from the one before by
under 0.005 on average); beside them, where the spread comes from (``motion_figures``; ``python -m
benchmarks.moving_digits_motion`` analyses the teacher's and the student's motion further). Then the same on clips
twice the training length (6 latent frames, 21 frames): the causal students stream them with a KV cache window of 3
latent frames; the bidirectional teacher is simply run longer.
Targets (issue 16): the 3-step causal student's per-frame FD within 1.5× the 50-step teacher's, its mean speed and
speed spread within 20 % of the teacher's, on training-length clips.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CANVAS, DIGIT, FRAMES, SPEED = 32, 16, 9, 2
LATENT_FRAMES = 1 + (FRAMES - 1) // 4
LONG_LATENT_FRAMES = 2 * LATENT_FRAMES
N_EVAL = 300
EXPECTED_ROWS = 8  # run_case_c's rows
STEPS = [1000, 757, 522]
# Self-Forcing DMD's optimizer steps. Measured (docs/quality.md, case C): 400 → 1200 → 2400 steps took the student's
# per-frame FD from 1.40× the teacher's to 1.27× and 1.01×, its black frames from 12.9 % to 8.9 % and 2.1 %
# (the teacher: 1.5 %).
DMD_STEPS = 2400
RECIPE = {"version": 1, "canvas": CANVAS, "frames": FRAMES, "speed": SPEED}
DIRECTIONS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]


def log(message: str) -> None:
    print(f"[case C] {message}", flush=True)


# --------------------------------------------------------------------------- data


def make_clips(n_digits: int | None = None, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``(N, 1, FRAMES, CANVAS, CANVAS)`` in [0, 1]: each digit moving ``SPEED`` px per frame in a random one of the
    8 directions, from a start that keeps it inside the canvas; and the labels."""
    from simpletuner_dmd.hosts.reference.digits_example import _digit_pixels

    digits, labels = _digit_pixels(n_digits)
    g = np.random.default_rng(seed)
    travel = SPEED * (FRAMES - 1)
    room = CANVAS - DIGIT
    clips = torch.zeros(len(digits), 1, FRAMES, CANVAS, CANVAS)
    for i, digit in enumerate(digits):
        dx, dy = DIRECTIONS[g.integers(len(DIRECTIONS))]

        def start(d: int) -> int:
            return 0 if d > 0 else room if d < 0 else int(g.integers(0, room - travel + 1 if travel <= room else 1))

        x0, y0 = start(dx), start(dy)
        for f in range(FRAMES):
            x, y = x0 + dx * SPEED * f, y0 + dy * SPEED * f
            clips[i, 0, f, y:y + DIGIT, x:x + DIGIT] = digit[0]
    return clips, labels


def write_dataset(folder: Path, clips: torch.Tensor, labels: np.ndarray) -> Path:
    """The clips as captioned GIFs (``clip_NNNN.gif`` + ``.txt``), written as the digits example writes its images."""
    from PIL import Image

    from simpletuner_dmd.hosts.reference.digits_example import write_captioned

    def save(clip: np.ndarray, path: Path) -> None:
        frames = [Image.fromarray(f).convert("RGB") for f in clip]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)

    return write_captioned(folder, clips, labels, stem="clip", suffix=".gif", save=save)


# --------------------------------------------------------------------------- stages (each cached by its recipe)


def _stage_done(folder: Path, recipe: dict) -> bool:
    """Whether ``folder`` holds a stage made from ``recipe`` (its stamp may add the stage's ``seconds``)."""
    stamp = folder / "case_c_stage.json"
    return stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k != "seconds"} == recipe


def _stamp(folder: Path, recipe: dict) -> None:
    (folder / "case_c_stage.json").write_text(json.dumps(recipe))


def _backends(folder: Path, data: Path) -> Path:
    backends = [
        {"id": "moving-digits", "type": "local", "dataset_type": "video", "instance_data_dir": str(data),
         "caption_strategy": "textfile", "cache_dir": str(folder / "cache" / "latents"), "resolution": CANVAS,
         "resolution_type": "pixel", "num_frames": FRAMES, "repeats": 0},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "cache_dir": str(folder / "cache" / "text")},
    ]
    path = folder / "multidatabackend.json"
    path.write_text(json.dumps(backends, indent=1))
    return path


def build_teacher(cache: Path, *, vae_steps: int, teacher_steps: int, n_digits: int | None) -> dict[str, Path]:
    """The data, the VAE, the FD feature space and the trained bidirectional teacher (a WanPipeline folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from simpletuner_dmd.hosts.reference.digits_example import (TEXT_TOKENS, _digit_pixels, _transformer,
                                                                make_fd_features, train_vae)
    from simpletuner_dmd.families.wan_tiny import make_tiny_wan
    from simpletuner_dmd.hosts.reference.trainer import train

    paths = {"dataset": cache / "clips", "model": cache / "teacher", "fd_features": cache / "digits-fd"}
    recipe = {**RECIPE, "vae_steps": vae_steps, "teacher_steps": teacher_steps, "n_digits": n_digits}
    if _stage_done(paths["model"], recipe) and (paths["fd_features"] / "features.json").is_file():
        log(f"teacher: cached ({paths['model']})")
        return paths
    start = time.time()
    clips, labels = make_clips(n_digits)
    write_dataset(paths["dataset"], clips, labels)
    pixels, digit_labels = _digit_pixels(n_digits)
    accuracy = make_fd_features(paths["fd_features"], pixels, digit_labels, epochs=60)
    log(f"data and FD features ({accuracy:.3f} held-out accuracy): {paths['dataset']}")
    build = cache / "teacher-build"
    shutil.rmtree(build, ignore_errors=True)
    init = make_tiny_wan(build / "init", seed=0)
    vae_dir, vae_recipe = cache / "vae", {**RECIPE, "vae_steps": vae_steps, "n_digits": n_digits}
    if not _stage_done(vae_dir, vae_recipe):  # the VAE is its own stage: a new teacher recipe reuses it
        vae, mse = train_vae(clips, steps=vae_steps, batch=16)
        shutil.rmtree(vae_dir, ignore_errors=True)
        vae.save_pretrained(vae_dir)
        _stamp(vae_dir, {**vae_recipe})
        (vae_dir / "reconstruction.json").write_text(json.dumps({"mse": mse}))
        log(f"video VAE: {vae_steps} steps, reconstruction MSE {mse:.4f} ({time.time() - start:.0f} s so far)")
    shutil.rmtree(init / "vae")
    shutil.copytree(vae_dir, init / "vae")
    (init / "vae" / "case_c_stage.json").unlink()
    shutil.rmtree(init / "transformer")
    torch.manual_seed(0)
    _transformer().save_pretrained(init / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(init / "scheduler")
    config = {
        "model_family": "wan", "model_type": "full", "pretrained_model_name_or_path": str(init),
        "data_backend_config": str(_backends(build, paths["dataset"])), "output_dir": str(build / "run"),
        "resolution": CANVAS, "resolution_type": "pixel", "train_batch_size": 32, "learning_rate": 1e-3,
        "lr_scheduler": "cosine", "lr_warmup_steps": 100, "max_train_steps": teacher_steps,
        "adam_weight_decay": 0.0, "flow_schedule_shift": 1.0, "caption_dropout_probability": 0.1,
        "report_to": "none", "validation_disable": True, "checkpoint_step_interval": 0, "seed": 0,
        "vae_batch_size": 64, "tokenizer_max_length": TEXT_TOKENS, "torch_num_threads": 1,
    }
    (build / "teacher.json").write_text(json.dumps(config, indent=1))
    out = train(build / "teacher.json")
    tmp = cache / "teacher.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    shutil.rmtree(tmp / "transformer")
    WanTransformer3DModel.from_pretrained(out / "transformer").save_pretrained(tmp / "transformer")
    _stamp(tmp, recipe)
    shutil.rmtree(paths["model"], ignore_errors=True)
    tmp.rename(paths["model"])
    shutil.rmtree(build, ignore_errors=True)
    log(f"teacher: {teacher_steps} steps, {time.time() - start:.0f} s in all")
    return paths


STUDENT_HOST = {"model_family": "wan-causal", "model_type": "lora", "lora_rank": 16, "lora_alpha": 16,
                "learning_rate": 5e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 20,
                "max_grad_norm": 1.0, "train_batch_size": 16, "resolution": CANVAS, "resolution_type": "pixel",
                "flow_schedule_shift": 1.0, "adam_weight_decay": 0.0, "validation_negative_prompt": "",
                "report_to": "none", "validation_disable": True, "checkpoint_step_interval": 0, "seed": 0,
                "vae_batch_size": 64, "torch_num_threads": 1}
KEYS = {"dmd_denoising_steps": STEPS, "real_score_guidance_scale": 1.0, "num_frame_per_block": 1,
        "regression_num_pairs": 512, "regression_teacher_steps": 50,
        "regression_latent_shape": [16, LATENT_FRAMES, CANVAS // 8, CANVAS // 8]}
def student_keys(steps: list[int]) -> dict:
    """The causal students' ``distillation_config`` keys common to both stages, with ``steps`` as their
    ``dmd_denoising_steps``."""
    return {**KEYS, "dmd_denoising_steps": list(steps)}


DMD_EXTRA = {"generator_update_interval": 5, "fake_score_lr": 1e-3, "fake_score_weight_decay": 0.0}


def train_student(cache: Path, paths: dict[str, Path], stage: str, *, steps: int, init_lora: Path | None = None,
                  pairs: dict | None = None, student_steps: list[int] = STEPS) -> Path:
    """Stage ``ode_init`` or ``dmd`` of the causal student, through the reference host; returns its output folder.
    ``student_steps``: its ``dmd_denoising_steps``."""
    from simpletuner_dmd.hosts.reference.digits_example import TEXT_TOKENS, caption
    from simpletuner_dmd.hosts.reference.trainer import train

    folder = cache / f"student-{stage}"
    keys = {**student_keys(student_steps), "regression_prompts": [caption(d) for d in range(10)], **(pairs or {}),
            **(DMD_EXTRA if stage == "dmd" else {})}
    recipe = {**RECIPE, "stage": stage, "steps": steps, "keys": keys, "host": STUDENT_HOST,
              "teacher": json.loads((paths["model"] / "case_c_stage.json").read_text()),
              "init": None if init_lora is None else json.loads((init_lora / "case_c_stage.json").read_text())}
    if _stage_done(folder / "out", recipe):
        log(f"{stage}: cached ({folder / 'out'})")
        return folder / "out"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {**STUDENT_HOST, "pretrained_model_name_or_path": str(paths["model"]),
              "data_backend_config": str(_backends(folder, paths["dataset"])), "output_dir": str(folder / "out"),
              "tokenizer_max_length": TEXT_TOKENS, "cache_dir": str(cache / "pairs"), "max_train_steps": steps,
              "distillation_method": stage, "distillation_config": keys,
              **({"init_lora": str(init_lora)} if init_lora is not None else {})}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    start = time.time()
    out = train(folder / "config.json")
    _stamp(out, {**recipe, "seconds": time.time() - start})
    log(f"{stage}: {steps} steps in {time.time() - start:.0f} s")
    return out


# --------------------------------------------------------------------------- sampling and metrics


class Evaluator:
    def __init__(self, paths: dict[str, Path], n_eval: int = N_EVAL):
        from simpletuner_dmd.families.wan import WanFamily
        from simpletuner_dmd.families.wan_causal import WanCausalFamily
        from simpletuner_dmd.hosts.reference.digits_example import TEXT_TOKENS, caption
        from simpletuner_dmd.hosts.reference.fd import load_feature_space

        self.paths, self.n_eval = paths, n_eval
        self.family, self.causal = WanFamily(), WanCausalFamily()
        self.components = self.family.load_components(str(paths["model"]), text_encoder_path=None,
                                                      dtype=torch.float32)
        self.space = load_feature_space(paths["fd_features"])
        labels = np.arange(n_eval) % 10
        conds = self.family.encode_prompts(self.components, [caption(d) for d in range(10)], max_length=TEXT_TOKENS)
        self.cond = conds[torch.from_numpy(labels)]
        self.uncond = self.family.encode_prompts(self.components, [""], max_length=TEXT_TOKENS)

    def noise(self, latent_frames: int) -> tuple[torch.Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(55_000 + latent_frames)
        return torch.randn((self.n_eval, 16, latent_frames, CANVAS // 8, CANVAS // 8), generator=g), g

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → grey clips ``(N, F, H, W)`` in [0, 1]."""
        out = [self.family.decode_latents(self.components, latents[i:i + 50]).mean(1) for i in
               range(0, len(latents), 50)]
        return torch.cat(out)

    def through_vae(self, clips: torch.Tensor) -> torch.Tensor:
        """Real clips ``(N, 1, F, H, W)`` encoded and decoded: what the VAE alone costs the metrics."""
        pixels = clips.expand(-1, 3, -1, -1, -1) * 2 - 1
        latents = torch.cat([self.family.encode_pixels(self.components, pixels[i:i + 50])
                             for i in range(0, len(pixels), 50)])
        return self.decode(latents)

    def teacher(self, steps: int, latent_frames: int) -> torch.Tensor:
        network = self.family.load_network(str(self.paths["model"]), dtype=torch.float32).eval()
        sampler = self.family.euler_sampler(network, steps=steps, shift=1.0)
        noise, g = self.noise(latent_frames)
        with torch.no_grad():
            latents = torch.cat([sampler(noise[i:i + 100], self.cond[i:i + 100], self.uncond, 1.0, g)
                                 for i in range(0, self.n_eval, 100)])
        return self.decode(latents)

    def student(self, out: Path, latent_frames: int, window: int | None, steps: list[int] = STEPS) -> torch.Tensor:
        from simpletuner_dmd.fewstep_sampling import few_step_sampler

        network = self.causal.load_network(str(self.paths["model"]), dtype=torch.float32)
        network.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                                  adapter_name="student")
        network.eval()
        flow = lambda x, t, c: self.causal.predict_flow(network, x, t, c).float()  # noqa: E731
        sampler = few_step_sampler(self.causal, network, flow, steps, causal=True, frames_per_block=1,
                                   independent_first_frame=False, context_noise=0.0, window=window)
        noise, g = self.noise(latent_frames)
        with torch.no_grad():
            latents = torch.cat([sampler(noise[i:i + 100], self.cond[i:i + 100], None, 1.0, g)
                                 for i in range(0, self.n_eval, 100)])
        return self.decode(latents)

    def measure(self, clips: torch.Tensor) -> dict[str, float]:
        """Per-frame digits FD (mean over frames), motion statistics (``motion_figures``), black and frozen
        frames."""
        from simpletuner_dmd.hosts.reference.fd import frechet_distance, statistics

        m = motion(clips)
        fds = []
        for k in range(clips.shape[1]):
            crops = torch.stack([_crop(clips[i, k], float(m["cy"][i, k]), float(m["cx"][i, k]))
                                 for i in range(len(clips))])
            mu, cov = statistics(self.space.features(crops[:, None].expand(-1, 3, -1, -1)))
            fds.append(frechet_distance(self.space.real_mu, self.space.real_cov, mu, cov))
        return {"frame_fd": float(np.mean(fds)), "frame_fd_max": float(np.max(fds)), **motion_figures(m)}


def motion(clips: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the motion metrics read from grey clips ``(N, F, H, W)``: each frame's intensity centre of mass
    ``cy``, ``cx`` ``(N, F)``; ``speed`` ``(N, F - 1)``, its displacement from frame to frame in px; ``black``
    ``(N, F)``, a frame whose brightest pixel is under 0.2; ``frozen`` ``(N, F - 1)``, a frame that differs from the
    one before by under 0.005 on average."""
    h, w = clips.shape[-2:]
    positive = clips.clamp(min=0)
    mass = positive.flatten(2).sum(-1).clamp(min=1e-6)
    ys, xs = torch.arange(h).float(), torch.arange(w).float()
    cy = (positive.sum(-1) * ys).sum(-1) / mass
    cx = (positive.sum(-2) * xs).sum(-1) / mass
    return {"cy": cy, "cx": cx, "speed": torch.sqrt((cy[:, 1:] - cy[:, :-1]) ** 2 + (cx[:, 1:] - cx[:, :-1]) ** 2),
            "black": clips.flatten(2).amax(-1) < 0.2,
            "frozen": (clips[:, 1:] - clips[:, :-1]).abs().mean((-1, -2)) < 0.005}


def mad_spread(values: torch.Tensor) -> float:
    """1.4826 × the median absolute deviation: a normal sample's standard deviation, blind to a few outliers (but 0 on
    the data, whose clips move at one of two speeds, 2 px and 2.83 px per frame, more than half of them at 2)."""
    return float(1.4826 * (values - values.median()).abs().median())


def trimmed_spread(values: torch.Tensor, cut: float = 0.05) -> float:
    """The standard deviation of the values between their ``cut`` and ``1 - cut`` quantiles: the spread with the
    ``cut`` most extreme values on each side dropped."""
    low, high = torch.quantile(values, torch.tensor([cut, 1 - cut], dtype=values.dtype))
    return float(values[(values >= low) & (values <= high)].std())


def motion_figures(m: dict[str, torch.Tensor]) -> dict:
    """The motion and empty-frame figures of ``motion(clips)``: ``speed`` and ``speed_spread`` (the mean and standard
    deviation over clips of each clip's mean speed: the targets' figures), ``black_frames``, ``black_by_frame``,
    ``frozen_frames``; and, to say where the spread comes from, ``speed_spread_trimmed`` (``trimmed_spread``: 5 %
    of the clips cut on each side) and ``speed_spread_mad`` (``mad_spread``) of the same per-clip speeds,
    ``speed_spread_clean`` and ``clean_clips`` (the spread over the clips with no black and
    no frozen frame, and their share), ``clips_with_black`` (the share of clips with a black frame: frames of one
    clip are not independent, clips are), ``speed_by_pair`` (the mean speed of each frame pair)."""
    per_clip = m["speed"].mean(1)
    clean = ~(m["black"].any(1) | m["frozen"].any(1))
    return {"speed": float(per_clip.mean()), "speed_spread": float(per_clip.std()),
            "black_frames": float(m["black"].float().mean()), "black_by_frame": m["black"].float().mean(0).tolist(),
            "frozen_frames": float(m["frozen"].float().mean()),
            "speed_spread_trimmed": trimmed_spread(per_clip), "speed_spread_mad": mad_spread(per_clip),
            "speed_spread_clean": float(per_clip[clean].std()) if int(clean.sum()) > 1 else float("nan"),
            "clean_clips": float(clean.float().mean()), "clips_with_black": float(m["black"].any(1).float().mean()),
            "speed_by_pair": m["speed"].mean(0).tolist()}


def _crop(frame: torch.Tensor, cy: float, cx: float) -> torch.Tensor:
    h, w = frame.shape
    top = int(round(min(max(cy - DIGIT / 2, 0), h - DIGIT)))
    left = int(round(min(max(cx - DIGIT / 2, 0), w - DIGIT)))
    return frame[top:top + DIGIT, left:left + DIGIT]


# --------------------------------------------------------------------------- the case


def run_case_c(out: Path, *, cache: Path, vae_steps: int = 300, teacher_steps: int = 3000, ode_steps: int = 1000,
               dmd_steps: int = DMD_STEPS, n_eval: int = N_EVAL, n_digits: int | None = None, on_row=None,
               plots: bool = True, pairs: dict | None = None, student_steps: list[int] = STEPS) -> dict:
    """The case (module docstring); ``pairs`` overrides the ODE pairs' keys (``regression_num_pairs``,
    ``regression_teacher_steps``: a smoke test's smaller ones); ``student_steps`` the students'
    ``dmd_denoising_steps`` (an ablation)."""
    report = on_row or (lambda name, row: None)
    cache = cache / "moving-digits"
    cache.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # networks this small run fastest on one thread
    timings: dict[str, float] = {}
    try:
        start = time.time()
        paths = build_teacher(cache, vae_steps=vae_steps, teacher_steps=teacher_steps, n_digits=n_digits)
        timings["teacher"] = time.time() - start
        start = time.time()
        ode = train_student(cache, paths, "ode_init", steps=ode_steps, pairs=pairs, student_steps=student_steps)
        timings["ode_init"] = time.time() - start
        start = time.time()
        dmd = train_student(cache, paths, "dmd", steps=dmd_steps, init_lora=ode, pairs=pairs,
                            student_steps=student_steps)
        timings["dmd"] = time.time() - start
        start = time.time()
        ev = Evaluator(paths, n_eval)
        real, _ = make_clips(n_digits, seed=1)
        rows: dict[str, dict] = {}
        samples: dict[str, torch.Tensor] = {}

        def add(name: str, clips: torch.Tensor, **extra) -> None:
            rows[name] = {**ev.measure(clips), **extra}
            samples[name] = clips[:10]
            log(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[name].items() if isinstance(v, float)))
            report(name, rows[name])

        add("real clips (the data)", real[:n_eval, 0], length="training")
        add("real clips through the VAE (encode, decode)", ev.through_vae(real[:n_eval]), length="training")
        add("teacher Euler 50", ev.teacher(50, LATENT_FRAMES), length="training")
        add("teacher Euler 3", ev.teacher(3, LATENT_FRAMES), length="training")
        add("causal student after ode_init, 3 steps", ev.student(ode, LATENT_FRAMES, None, student_steps),
            length="training")
        add("causal student after Self-Forcing DMD, 3 steps", ev.student(dmd, LATENT_FRAMES, None, student_steps),
            length="training")
        add("teacher Euler 50, 2× length", ev.teacher(50, LONG_LATENT_FRAMES), length="2x")
        add("causal student after Self-Forcing DMD, 3 steps, 2× length (KV window 3)",
            ev.student(dmd, LONG_LATENT_FRAMES, LATENT_FRAMES, student_steps), length="2x")
        timings["evaluation"] = time.time() - start
    finally:
        torch.set_num_threads(threads)
    result = {"rows": rows, "targets": targets(rows), "seconds_by_stage": timings,
              "settings": {"canvas": CANVAS, "frames": FRAMES, "latent_frames": LATENT_FRAMES, "speed": SPEED,
                           "n_eval": n_eval, "vae_steps": vae_steps, "teacher_steps": teacher_steps,
                           "ode_init_steps": ode_steps, "dmd_steps": dmd_steps, "keys": student_keys(student_steps),
                           "dmd": DMD_EXTRA, "host": STUDENT_HOST}}
    if plots:
        try:
            plot(out / "case_c_samples.png", samples)
        except Exception as exc:  # the results are kept
            print(f"error: case C plot failed ({type(exc).__name__}: {exc})", flush=True)
    return result


def targets(rows: dict) -> dict:
    t50 = rows.get("teacher Euler 50")
    s = rows.get("causal student after Self-Forcing DMD, 3 steps")
    if not (t50 and s):
        return {}
    fd = s["frame_fd"] / t50["frame_fd"]
    speed = s["speed"] / t50["speed"]
    spread = s["speed_spread"] / t50["speed_spread"]
    return {"frame_fd / teacher-50 (<= 1.5)": fd, "frame_fd met": fd <= 1.5,
            "speed / teacher-50 (within 20%)": speed, "speed_spread / teacher-50 (within 20%)": spread,
            "speed met": abs(speed - 1) <= 0.2, "spread met": abs(spread - 1) <= 0.2,
            "no black or frozen frames": s["black_frames"] == 0 and s["frozen_frames"] == 0}


def plot(path: Path, samples: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(samples)
    rows = [(name, i) for name in names for i in range(3)]
    frames = max(s.shape[1] for s in samples.values())
    fig, axes = plt.subplots(len(rows), frames, figsize=(frames * 0.9, len(rows) * 0.95))
    for r, (name, i) in enumerate(rows):
        clip = samples[name][i]
        for f in range(frames):
            ax = axes[r, f]
            ax.axis("off")
            if f < clip.shape[0]:
                ax.imshow(clip[f].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(name if i == 0 else "", fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(c: dict) -> list[str]:
    s = c["settings"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in c.get("seconds_by_stage", {}).items())
    lines = [f"**Case C — moving digits video ({s['frames']} frames of {s['canvas']}×{s['canvas']}, "
             f"{s['latent_frames']} latent frames), a bidirectional teacher, a causal student (steps "
             f"{','.join(map(str, s['keys']['dmd_denoising_steps']))}; ode_init {s['ode_init_steps']} steps, then "
             f"Self-Forcing DMD {s['dmd_steps']} steps).** {s['n_eval']} clips per row; stages: {stages}.",
             "", "| row | per-frame digits FD ↓ (max over frames) | mean speed (px/frame) | speed spread | black frames "
             "| frozen frames |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in c["rows"].items():
        lines.append(f"| {name} | {r['frame_fd']:.1f} ({r['frame_fd_max']:.1f}) | {r['speed']:.2f} | "
                     f"{r['speed_spread']:.2f} | {r['black_frames']:.3f} | {r['frozen_frames']:.3f} |")
    if all("speed_spread_trimmed" in r for r in c["rows"].values()):  # results from before these figures lack them
        lines += ["", "Where the speed spread comes from (`motion_figures`): the same spread robust to a few "
                      "outliers, and over the clips with no black or frozen frame; the clips with a black frame.", "",
                  "| row | speed spread | without the 5 % extreme clips each side | 1.4826 × MAD "
                  "| over the clean clips (their share) | clips with a black frame |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in c["rows"].items():
            lines.append(f"| {name} | {r['speed_spread']:.2f} | {r['speed_spread_trimmed']:.2f} | "
                         f"{r['speed_spread_mad']:.2f} | "
                         f"{r['speed_spread_clean']:.2f} ({r['clean_clips']:.1%}) | {r['clips_with_black']:.1%} |")
    t = c.get("targets") or {}
    if t:
        lines += ["", f"Targets (the 3-step causal student against the 50-step teacher, training length): per-frame FD "
                      f"{t['frame_fd / teacher-50 (<= 1.5)']:.2f}× ({_met(t['frame_fd met'])}, ≤ 1.5×); speed "
                      f"{t['speed / teacher-50 (within 20%)']:.2f}× ({_met(t['speed met'])}, within 20 %); "
                      f"speed spread {t['speed_spread / teacher-50 (within 20%)']:.2f}× ({_met(t['spread met'])}, "
                      f"within 20 %); black or frozen frames: "
                      f"{'none' if t['no black or frozen frames'] else '**some**'}."]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.moving_digits", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quality")
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--ode-steps", type=int, default=1000)
    parser.add_argument("--dmd-steps", type=int, default=DMD_STEPS)
    parser.add_argument("--n-eval", type=int, default=N_EVAL)
    parser.add_argument("--student-steps", default=",".join(map(str, STEPS)),
                        help="the students' dmd_denoising_steps, comma-separated (an ablation)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    c = run_case_c(args.out, cache=args.cache, teacher_steps=args.teacher_steps, ode_steps=args.ode_steps,
                   dmd_steps=args.dmd_steps, n_eval=args.n_eval,
                   student_steps=[int(t) for t in args.student_steps.split(",")])
    c["seconds"] = time.time() - start
    (args.out / "case_c.json").write_text(json.dumps(c, indent=1, default=float))
    (args.out / "case_c.md").write_text("\n".join(markdown(c)))
    print("\n".join(markdown(c)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
