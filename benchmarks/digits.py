"""Case B: scikit-learn's digits through the Wan family and the reference host trainer, on the main job's example.

The teacher is the package's own digits example (``simpletuner_dmd.hosts.reference.digits_example``, what
``simpletuner-dmd make-example`` builds), built once into the benchmark's cache folder: 16×16 grey digits captioned
``a digit N``, a tiny Wan VAE trained to reconstruct them, and a class-conditional 4-layer Wan transformer trained by
the reference host (10% of the captions dropped to the empty prompt, so classifier-free guidance works). The students
are distilled from it by ``simpletuner_dmd.hosts.reference.trainer.train`` with the main job's keys
(``config_examples/tiny-wan-digits``: a LoRA student, 800 steps of batch 32, student lr 5e-4, ``fake_score_lr`` 1e-3,
``generator_update_interval`` 5).

Every row's samples are drawn for the prompts ``a digit 0`` … ``a digit 9`` in turn (``tokenizer_max_length`` 16,
shift 1), decoded through the pipeline's VAE (``WanFamily.decode_latents``) and measured in the example's pixel-space
feature space (``work/digits-fd``: an MLP classifier on 16×16 grey pixels):

- ``digits_fd``: the Fréchet distance of the samples' features to the real digits';
- ``fd_to_teacher``: the Fréchet distance to a separate draw of the 50-step teacher at the row's guidance (students
  distilled at ``real_score_guidance_scale`` 3 are measured against the guided teacher);
- ``class_tv``: the total variation between the predicted class shares and the data's;
- ``cond_accuracy``: the share of samples classified as the digit they were prompted for;
- ``diversity``: the mean pairwise feature distance between samples of the same prompt (over the noises), to be read
  against the 50-step teacher's at the same guidance.

A plugin beside the method (``Snapshots``) measures the student inside the training run at every quarter of it (and
records the ``dmd_loss`` / ``fake_score_loss`` curves), so the rows carry their metrics along training; one row runs
the 3-step student for 4× the default length to see whether it drifts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from simpletuner_dmd import hookimpl

N_EVAL = 1000  # samples per run: 100 per prompt
MAIN_JOB = Path(__file__).resolve().parents[1] / "config_examples" / "tiny-wan-digits" / "config.json"
# The main job's length (800 steps): the students' default length. The ablations below were measured around the
# earlier 400-step default, which their results chose against (docs/quality.md), so they keep it.
STUDENT_STEPS = json.loads(MAIN_JOB.read_text())["max_train_steps"]
ABLATION_STUDENT_STEPS = 400
SHIFT = 1.0
EXAMPLE_DEFAULTS = {"vae_steps": 300, "teacher_steps": 1200, "classifier_epochs": 60, "n_digits": None}

# The main job's student (config_examples/tiny-wan-digits/config.json), without EMA, validation or checkpoints.
STUDENT_HOST = {"model_type": "lora", "lora_rank": 16, "lora_alpha": 16, "base_model_precision": "no_change",
                "learning_rate": 5e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 20,
                "max_grad_norm": 1.0, "train_batch_size": 32}
STUDENT_DMD = {"generator_update_interval": 5, "real_score_guidance_scale": 1.0, "fake_score_lr": 1e-3,
               "fake_score_weight_decay": 0.0, "fake_score_grad_clip": 1.0, "min_timestep_ratio": 0.02,
               "max_timestep_ratio": 0.98, "ts_schedule": True, "timestep_shift": 1.0}
THREE, ONE = [1000, 757, 522], [1000]
# DMD's GAN logs the Snapshots plugin records beside the losses (a row's "gan_at_end": their means over the last tenth)
GAN_LOGS = ("gan_generator_loss", "gan_classifier_loss", "gan_real_prob", "gan_fake_prob")
# DMD2's real-data (GAN) term at what its ablation (GAN_ABLATIONS below, docs/quality.md) chose for each student
GAN_THREE = {"gan_loss_weight": 0.1, "gan_start_step": 400}
GAN_ONE = {"gan_loss_weight": 0.3, "gan_classifier_loss_weight": 1.0, "gan_start_step": 400}
# name: (denoising steps, DMD overrides, host overrides, length factor, seeds: "all" or 1)
STUDENTS: dict[str, tuple[list[int], dict, dict, int, str]] = {
    "DMD 3-step (1000,757,522), guidance 1": (THREE, {}, {}, 1, "all"),
    "DMD 3-step (1000,757,522), guidance 3": (THREE, {"real_score_guidance_scale": 3.0}, {}, 1, "all"),
    "DMD 3-step, guidance 1, 4x steps (stability)": (THREE, {}, {}, 4, "one"),
    "DMD 1-step (1000), guidance 1": (ONE, {}, {}, 1, "all"),
    "DMD 1-step (1000), guidance 3": (ONE, {"real_score_guidance_scale": 3.0}, {}, 1, "all"),
    "DMD 3-step + GAN (gan_loss_weight 0.1, gan_start_step 400), guidance 1": (THREE, GAN_THREE, {}, 1, "all"),
    "DMD 1-step + GAN (gan_loss_weight 0.3, gan_classifier_loss_weight 1, gan_start_step 400), guidance 1": (
        ONE, GAN_ONE, {}, 1, "all"),
    # README's quickstart keys: fake_score_lr 1e-5 below the student's 2e-5, every step a generator step, guidance 3
    "quickstart settings (lr 2e-5, fake_score_lr 1e-5, interval 1, guidance 3), 3-step": (
        THREE, {"real_score_guidance_scale": 3.0, "fake_score_lr": 1e-5, "generator_update_interval": 1},
        {"learning_rate": 2e-5}, 1, "one"),
}
TEACHER_GUIDANCE = (1.0, 3.0)
# What moves the guided (real_score_guidance_scale 3) student's drift: ``python -m benchmarks.digits`` runs these
# beside the 50-step teachers only (results in case_b_guidance_ablation.{json,md}).
GUIDED_ABLATIONS: dict[str, tuple[list[int], dict, dict, int, str]] = {
    "ablation: 3-step, guidance 3, student lr 2e-4": (THREE, {"real_score_guidance_scale": 3.0},
                                                       {"learning_rate": 2e-4}, 1, "all"),
    "ablation: 3-step, guidance 3, interval 10": (THREE, {"real_score_guidance_scale": 3.0,
                                                          "generator_update_interval": 10}, {}, 1, "all"),
    "ablation: 3-step, guidance 3, 4x steps": (THREE, {"real_score_guidance_scale": 3.0}, {}, 4, "one"),
    "ablation: 3-step, guidance 3, guidance interval [0, 500]": (
        THREE, {"real_score_guidance_scale": 3.0, "real_score_guidance_interval": [0.0, 500.0]}, {}, 1, "all"),
    # the guidance-1 students of the same lengths: the guidance target's denominators, measured in the same run
    "baseline: 3-step, guidance 1": (THREE, {}, {}, 1, "all"),
    "baseline: 3-step, guidance 1, 4x steps": (THREE, {}, {}, 4, "one"),
}
# What lifts the 3-step student's diversity (guidance 1) within or near the default length:
# ``python -m benchmarks.digits --ablations diversity`` (results in case_b_diversity_ablation.{json,md}).
DIVERSITY_ABLATIONS: dict[str, tuple[list[int], dict, dict, int, str]] = {
    "ablation: 3-step, guidance 1, interval 3": (THREE, {"generator_update_interval": 3}, {}, 1, "all"),
    "ablation: 3-step, guidance 1, student lr 1e-3": (THREE, {}, {"learning_rate": 1e-3}, 1, "all"),
    "ablation: 3-step, guidance 1, fake_score_lr 2e-3": (THREE, {"fake_score_lr": 2e-3}, {}, 1, "all"),
    "ablation: 3-step, guidance 1, 2x steps": (THREE, {}, {}, 2, "all"),
}
# DMD2's real-data (GAN) term on the digits: ``python -m benchmarks.digits --ablations gan --rows ...`` (results in
# case_b_gan_ablation.{json,md}: a 400-step screen of one seed, then the best rows at 800 steps with 2 seeds, each
# run's command there). The classifier's real side is the host's batch: the VAE latents of the real digits the
# student trains on, with their own captions. The plain students of the same length are the baseline.
GAN_ABLATIONS: dict[str, tuple[list[int], dict, dict, int, str]] = {
    "baseline: 3-step, guidance 1": (THREE, {}, {}, 1, "all"),
    "baseline: 1-step, guidance 1": (ONE, {}, {}, 1, "all"),
    **{f"ablation: {n}-step, gan_loss_weight {w:g}": (steps, {"gan_loss_weight": w}, {}, 1, "all")
       for n, steps in ((3, THREE), (1, ONE)) for w in (0.003, 0.03, 0.1, 0.3, 1.0)},
    # at the weight the grid chose (0.1: the 1-step student's best, the 3-step's within 0.2 FD of its best): a later
    # start (DMD alone for the first half of the 400-step run), and a classifier weight 10x the default, then 100x
    **{f"ablation: {n}-step, gan_loss_weight 0.1, {key} {value:g}": (steps, {"gan_loss_weight": 0.1, key: value}, {},
                                                                       1, "all")
       for n, steps in ((3, THREE), (1, ONE)) for key, value in (("gan_start_step", 200),
                                                                  ("gan_classifier_loss_weight", 0.1))},
    **{f"ablation: {n}-step, gan_loss_weight {w:g}, gan_classifier_loss_weight 1": (
        steps, {"gan_loss_weight": w, "gan_classifier_loss_weight": 1.0}, {}, 1, "all")
       for n, steps, weights in ((3, THREE, (0.1,)), (1, ONE, (0.1, 0.3, 1.0))) for w in weights},
    # the later start at the main job's length (800 steps: DMD alone for the first half), each at its best screen
    "ablation: 3-step, gan_loss_weight 0.1, gan_start_step 400": (THREE, GAN_THREE, {}, 1, "all"),
    "ablation: 1-step, gan_loss_weight 0.3, gan_classifier_loss_weight 1, gan_start_step 400": (
        ONE, GAN_ONE, {}, 1, "all"),
    # 4x the main job's length (run with --student-steps 800: 3200 steps), plain and with the term, 3 seeds: does
    # the term take a longer-trained student past its teacher? (the plain 4x row of the main table, one seed, ends at
    # 0.89x the teacher's FD)
    "baseline: 3-step, guidance 1, 4x steps": (THREE, {}, {}, 4, "all"),
    "baseline: 1-step, guidance 1, 4x steps": (ONE, {}, {}, 4, "all"),
    "ablation: 3-step, gan_loss_weight 0.1, gan_start_step 400, 4x steps": (THREE, GAN_THREE, {}, 4, "all"),
    "ablation: 1-step, gan_loss_weight 0.3, gan_classifier_loss_weight 1, gan_start_step 400, 4x steps": (
        ONE, GAN_ONE, {}, 4, "all"),
    # and the plain 3-step student at 8x (6400 steps): does length alone take it past the teacher?
    "baseline: 3-step, guidance 1, 8x steps": (THREE, {}, {}, 8, "all"),
    # a control: the GAN rows' random draws and batched critic forward, with a classifier that never trains and a
    # student term too small to act (what is left of the GAN rows' difference from the baseline is the draws)
    "control: 3-step, gan_loss_weight 0.003, gan_classifier_loss_weight 0": (
        THREE, {"gan_loss_weight": 0.003, "gan_classifier_loss_weight": 0.0}, {}, 1, "all"),
}
ABLATIONS = {"guided": (GUIDED_ABLATIONS, "case_b_guidance_ablation"),
             "diversity": (DIVERSITY_ABLATIONS, "case_b_diversity_ablation"),
             "gan": (GAN_ABLATIONS, "case_b_gan_ablation")}


def expected_rows(teacher_euler=(50, 3, 1)) -> int:
    return 2 + len(teacher_euler) * len(TEACHER_GUIDANCE) + len(STUDENTS)


def build_example(cache: Path, log=print, **example) -> dict[str, Path]:
    from simpletuner_dmd.hosts.reference.digits_example import make_digits_example

    return make_digits_example(cache / "digits-example", **{**EXAMPLE_DEFAULTS, **example}, log=log)


# --------------------------------------------------------------------------- sampling and metrics


class Evaluator:
    """Draws a row's samples (the same noises and prompts for every row of a seed) and measures them."""

    def __init__(self, paths: dict[str, Path], n_eval: int = N_EVAL, n_digits: int | None = None,
                 real: torch.Tensor | None = None):
        """``paths["fd_features"]`` is the feature space (its real statistics are the FD's target); ``real`` (grey
        ``(N, 1, H, W)`` in [0, 1], in the digits' order) replaces the real digits that ``noise_floor`` and
        ``through_vae`` are given."""
        from simpletuner_dmd.families.wan import WanFamily
        from simpletuner_dmd.hosts.reference.digits_example import TEXT_TOKENS, _digit_pixels, caption
        from simpletuner_dmd.hosts.reference.fd import load_feature_space

        self.n_eval, self.family = n_eval, WanFamily()
        self.components = self.family.load_components(str(paths["model"]), text_encoder_path=None,
                                                      dtype=torch.float32)
        self.space = load_feature_space(paths["fd_features"])
        self.labels = np.arange(n_eval) % 10  # the prompts, in turn
        conds = self.family.encode_prompts(self.components, [caption(d) for d in range(10)], max_length=TEXT_TOKENS)
        self.cond = conds[torch.from_numpy(self.labels)]
        self.uncond = self.family.encode_prompts(self.components, [""], max_length=TEXT_TOKENS)
        self.shape = tuple(self.family.latent_shape(self.components, width=16, height=16, frames=1))
        digit_pixels, real_labels = _digit_pixels(n_digits)
        self.real = (digit_pixels if real is None else real).expand(-1, 3, -1, -1)
        self.data_share = np.bincount(real_labels, minlength=10) / len(real_labels)
        self.real_labels = real_labels
        self.reference: dict[float, tuple] = {}  # guidance: the 50-step teacher's feature statistics (own draw)

    def noise(self, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(77_000 + seed)
        return torch.randn((self.n_eval, *self.shape), generator=g), g

    def _batched(self, fn, seed: int) -> torch.Tensor:
        noise, g = self.noise(seed)
        out = []
        with torch.no_grad():
            for i in range(0, self.n_eval, 250):
                out.append(fn(noise[i:i + 250], self.cond[i:i + 250], g).float())
        return self.decode(torch.cat(out))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels ``(B, 3, H, W)`` in [0, 1] (the first frame)."""
        return torch.cat([self.family.decode_latents(self.components, latents[i:i + 250])[:, :, 0]
                          for i in range(0, len(latents), 250)])

    def teacher(self, network, steps: int, guidance: float, seed: int) -> torch.Tensor:
        sampler = self.family.euler_sampler(network, steps=steps, shift=SHIFT)
        return self._batched(lambda noise, cond, g: sampler(noise, cond, self.uncond, guidance, g), seed)

    def student(self, network, timesteps: list[int], seed: int) -> torch.Tensor:
        from simpletuner_dmd.flow import flow_to_x0
        from simpletuner_dmd.fewstep_sampling import sample_with_schedule

        def run(noise, cond, g):
            predict = lambda x, t: flow_to_x0(x, self.family.predict_flow(network, x, t, cond), t)  # noqa: E731
            return sample_with_schedule(predict, noise, timesteps, g)

        return self._batched(run, seed)

    def set_reference(self, guidance: float, pixels: torch.Tensor) -> None:
        from simpletuner_dmd.hosts.reference.fd import statistics

        self.reference[guidance] = statistics(self.space.features(pixels))

    def __call__(self, pixels: torch.Tensor, *, guidance: float | None, labels: np.ndarray | None = None
                 ) -> dict[str, float]:
        from simpletuner_dmd.hosts.reference.fd import frechet_distance, statistics

        labels = self.labels if labels is None else labels
        feats = self.space.features(pixels)
        predicted = self.space.classes(pixels)
        share = np.bincount(predicted, minlength=10) / len(predicted)
        spreads = []
        for d in range(10):
            f = torch.from_numpy(feats[labels == d])
            if len(f) > 1:
                dist = torch.cdist(f, f)
                spreads.append(float(dist.sum() / (len(f) * (len(f) - 1))))
        mu, cov = statistics(feats)
        out = {"digits_fd": frechet_distance(self.space.real_mu, self.space.real_cov, mu, cov),
               "class_tv": float(0.5 * np.abs(share - self.data_share).sum()),
               "cond_accuracy": float((predicted == labels).mean()),
               "diversity": float(np.mean(spreads))}
        if guidance is not None and guidance in self.reference:
            out["fd_to_teacher"] = frechet_distance(*self.reference[guidance], mu, cov)
        return out


# --------------------------------------------------------------------------- training, with snapshots


class Snapshots:
    """A plugin beside the method: records ``dmd_loss`` and ``fake_score_loss`` (and DMD's ``GAN_LOGS`` where the
    term runs) per optimizer step (as any third-party logger would) and, after the optimizer steps in ``at``,
    measures the student (its LoRA adapter on) with ``measure(network)``, which returns the metrics and the samples'
    pixels (the last ones are kept)."""

    def __init__(self, at: set[int], measure: Callable[[torch.nn.Module], tuple[dict, torch.Tensor]]):
        self.at, self.measure = at, measure
        self.pixels: torch.Tensor | None = None
        self.curves: dict[str, list[tuple[int, float]]] = {k: [] for k in ("dmd_loss", "fake_score_loss",
                                                                           *GAN_LOGS)}
        self.by_step: dict[int, dict] = {}

    @hookimpl(wrapper=True)
    def distill_loss(self, batch, step, host_loss):
        result = yield
        for key in ("dmd_loss", "gan_generator_loss"):
            if result is not None and key in result.logs:
                self.curves[key].append((step.global_step, float(result.logs[key])))
        return result

    @hookimpl(wrapper=True)
    def distill_metrics(self, step):
        results = yield
        for extra in results:
            for key in ("fake_score_loss", "gan_classifier_loss", "gan_real_prob", "gan_fake_prob"):
                if extra and key in extra:
                    self.curves[key].append((step.global_step, float(extra[key])))
        done = step.global_step + 1  # distill_metrics runs after the step's optimizer steps
        if done in self.at and step.network is not None:
            from simpletuner_dmd.adapters import AdapterSwitch
            from simpletuner_dmd.hosts.reference.trainer import STUDENT_ADAPTER

            with AdapterSwitch(step.network).use(STUDENT_ADAPTER), torch.no_grad():
                self.by_step[done], self.pixels = self.measure(step.network)
        return results


def _student_config(folder: Path, paths: dict[str, Path], tag: str, *, steps_list: list[int], dmd: dict,
                    host: dict, max_steps: int, seed: int) -> Path:
    from simpletuner_dmd.hosts.reference.digits_example import TEXT_TOKENS

    run = folder / tag
    backends = [
        {"id": "digits", "type": "local", "dataset_type": "image", "instance_data_dir": str(paths["dataset"]),
         "caption_strategy": "textfile", "cache_dir": str(folder / "cache" / "latents"), "resolution": 16,
         "resolution_type": "pixel", "repeats": 0},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds",
         "cache_dir": str(folder / "cache" / "text")},
    ]
    (folder / "multidatabackend.json").write_text(json.dumps(backends, indent=1))
    config = {
        "model_family": "wan", "pretrained_model_name_or_path": str(paths["model"]),
        "data_backend_config": str(folder / "multidatabackend.json"), "output_dir": str(run),
        "resolution": 16, "resolution_type": "pixel", "flow_schedule_shift": SHIFT, "adam_weight_decay": 0.0,
        "tokenizer_max_length": TEXT_TOKENS, "validation_negative_prompt": "", "report_to": "none",
        "validation_disable": True, "checkpoint_step_interval": 0, "vae_batch_size": 256, "seed": seed,
        "max_train_steps": max_steps, **STUDENT_HOST, **host,
        "distillation_method": "dmd",
        "distillation_config": {**STUDENT_DMD, **dmd, "dmd_denoising_steps": steps_list},
    }
    path = folder / f"{tag}.json"
    path.write_text(json.dumps(config, indent=1))
    shutil.rmtree(run, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- the case


def noise_floor(ev: Evaluator) -> dict[str, float]:
    """``ev.real``'s first half measured, its digits FD against the second half's: the FD's noise floor."""
    from simpletuner_dmd.hosts.reference.fd import frechet_distance, statistics

    half = len(ev.real) // 2
    first = ev(ev.real[:half], guidance=1.0, labels=ev.real_labels[:half])
    first["digits_fd"] = frechet_distance(*statistics(ev.space.features(ev.real[half:])),
                                          *statistics(ev.space.features(ev.real[:half])))
    return first


def through_vae(ev: Evaluator, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] encoded and decoded by the pipeline's VAE: what any sample can reach."""
    with torch.no_grad():
        latents = torch.cat([ev.family.encode_pixels(ev.components, (pixels[i:i + 250] * 2 - 1)[:, :, None])
                             for i in range(0, len(pixels), 250)])
    return ev.decode(latents)


def run_case_b(out: Path, *, seeds: int, cache: Path, log=print, teacher_steps: int = 1200,
               student_steps: int = STUDENT_STEPS, n_eval: int = N_EVAL, teacher_euler: tuple[int, ...] = (50, 3, 1),
               plots: bool = True, example: dict | None = None, students: tuple[str, ...] | None = None,
               on_row: Callable[[str, dict], object] | None = None, specs: dict | None = None) -> dict:
    """The case's rows. ``example``: keyword arguments of ``make_digits_example`` (tests shrink the build);
    ``students``: parts of the student rows' names to run (default: all). ``on_row(name, row)`` is called as each
    row is finished; the plots are drawn after the last row."""
    from diffusers import WanTransformer3DModel

    from simpletuner_dmd.hosts.reference.trainer import train

    from .gmm import summarise

    report = on_row or (lambda name, row: None)
    start = time.time()
    example = {**EXAMPLE_DEFAULTS, "teacher_steps": teacher_steps, **(example or {})}
    paths = build_example(cache, log=log, **example)
    log(f"case B: the digits example is ready ({time.time() - start:.0f} s): {paths['model']}")
    ev = Evaluator(paths, n_eval, example.get("n_digits"))
    teacher = WanTransformer3DModel.from_pretrained(paths["model"] / "transformer").eval()
    rows: dict[str, dict] = {}
    grids: dict[str, torch.Tensor] = {}
    curves: dict[str, dict] = {}
    teacher_fd = {}

    def finish(name: str, row: dict) -> None:
        rows[name] = row
        m = row["metrics"]
        log(f"case B: {name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in m.items()))
        report(name, row)

    # the 50-step teacher's own reference draws (another noise seed), one per guidance: fd_to_teacher's target
    for guidance in TEACHER_GUIDANCE:
        ev.set_reference(guidance, ev.teacher(teacher, max(teacher_euler), guidance, seed=999))

    finish("real digits (half vs other half)", {"kind": "reference", "metrics": summarise([noise_floor(ev)])})
    recon = through_vae(ev, ev.real)
    finish("real digits through the VAE (encode, decode)", {
        "kind": "reference", "metrics": summarise([ev(recon, guidance=1.0, labels=ev.real_labels)])})

    for guidance in TEACHER_GUIDANCE:
        for n in teacher_euler:
            name = f"teacher Euler {n}, guidance {guidance:g}"
            samples = [ev.teacher(teacher, n, guidance, s) for s in range(seeds)]
            finish(name, {"kind": "teacher", "steps": n, "guidance": guidance,
                          "metrics": summarise([ev(x, guidance=guidance) for x in samples])})
            grids[name] = samples[0]
            teacher_fd[(n, guidance)] = rows[name]["metrics"]
    del teacher

    folder = cache / "digits-students"
    folder.mkdir(parents=True, exist_ok=True)
    todo = {n: spec for n, spec in (specs or STUDENTS).items()
            if students is None or any(t.lower() in n.lower() for t in students)}
    for name, (steps_list, dmd, host, factor, seed_rule) in todo.items():
        guidance = float({**STUDENT_DMD, **dmd}["real_score_guidance_scale"])
        max_steps = student_steps * factor
        quarters = 8 if factor > 1 else 4
        at = {max(1, max_steps * k // quarters) for k in range(1, quarters + 1)}
        results, seconds, by_step, gan_end = [], [], [], []
        for s in range(seeds if seed_rule == "all" else 1):
            def measure(network, _steps=steps_list, _s=s, _g=guidance):
                pixels = ev.student(network, _steps, _s)
                return ev(pixels, guidance=_g), pixels

            recorder = Snapshots(at, measure)
            tag = f"{'x'.join(map(str, steps_list))}-g{guidance:g}-{name.split(',')[0].replace(' ', '')}" \
                  f"-{factor}x-seed{s}".replace("(", "").replace(")", "")
            tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in tag)
            config = _student_config(folder, paths, tag, steps_list=steps_list, dmd=dmd, host=host,
                                     max_steps=max_steps, seed=s)
            t0 = time.time()
            train(config, plugins=(recorder,))
            seconds.append(time.time() - t0)
            shutil.rmtree(folder / tag, ignore_errors=True)
            results.append(recorder.by_step[max_steps])
            by_step.append(recorder.by_step)
            if recorder.curves["gan_real_prob"]:  # the classifier over the run's last tenth
                gan_end.append({k: float(np.mean([v for _, v in recorder.curves[k][-max(1, max_steps // 10):]]))
                                for k in GAN_LOGS if recorder.curves[k]})
            if s == 0:
                curves[name] = recorder.curves
                grids[name] = recorder.pixels
            log(f"case B: {name} seed {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items()) +
                f" ({seconds[-1]:.0f} s)")
        steps_done = sorted(by_step[0])
        fds = [summarise([b[k] for b in by_step])["digits_fd"]["mean"] for k in steps_done]
        row = {"kind": "student", "guidance": guidance, "dmd_config": {**STUDENT_DMD, **dmd,
                                                                       "dmd_denoising_steps": steps_list},
               "host_config": {**STUDENT_HOST, **host}, "steps": max_steps, "seeds": len(results),
               "seconds_per_run": sum(seconds) / len(seconds), "metrics": summarise(results),
               "by_step": {str(k): summarise([b[k] for b in by_step]) for k in steps_done},
               "final_fd_over_best": fds[-1] / min(fds)}
        if gan_end:
            row["gan_at_end"] = {k: float(np.mean([g[k] for g in gan_end])) for k in gan_end[0]}
        finish(name, row)
    if plots:
        _plot_grids(out / "case_b_samples.png", grids, ev)
        from .quality_shared import plot_curves

        plot_curves(out / "case_b_curves.png", curves)
        _plot_by_step(out / "case_b_along_training.png", rows)
    return {"rows": rows, "targets": targets(rows, max(teacher_euler)), "settings": {
        "example": {k: v for k, v in example.items()}, "student_steps": student_steps, "seeds": seeds,
        "samples": n_eval, "fd_classifier_held_out_accuracy": ev.space.held_out_accuracy,
        "student_host": STUDENT_HOST, "student_dmd": STUDENT_DMD}}


def targets(rows: dict, n50: int = 50) -> dict:
    def t50(guidance):
        return rows.get(f"teacher Euler {n50}, guidance {guidance:g}", {}).get("metrics")

    out = {}
    g1 = {n: r for n, r in rows.items() if r["kind"] == "student"}
    for name, row in g1.items():
        m, ref = row["metrics"], t50(row["guidance"])
        if ref is None:
            continue
        entry = {"fd / teacher-50": m["digits_fd"]["mean"] / ref["digits_fd"]["mean"],
                 "class_tv / teacher-50": m["class_tv"]["mean"] / max(ref["class_tv"]["mean"], 1e-9),
                 "diversity / teacher-50": m["diversity"]["mean"] / ref["diversity"]["mean"]}
        if row["guidance"] != 1.0 and "fd_to_teacher" in m:
            # the guidance-1 row of the same schedule and length (else the shortest), the main rows first
            same = [r for r in g1.values() if r["guidance"] == 1.0 and "fd_to_teacher" in r["metrics"]
                    and r["dmd_config"]["dmd_denoising_steps"] == row["dmd_config"]["dmd_denoising_steps"]]
            shortest = min(x["steps"] for x in g1.values())
            base = next((r for r in same if r["steps"] == row["steps"]), None) or next(
                (r for r in same if r["steps"] == shortest), None)
            if base is not None:
                entry["fd_to_guided_teacher / (guidance 1 fd_to_teacher)"] = \
                    m["fd_to_teacher"]["mean"] / base["metrics"]["fd_to_teacher"]["mean"]
        if "final_fd_over_best" in row:
            entry["final fd / best fd along training"] = row["final_fd_over_best"]
        if row["guidance"] != 1.0 and row.get("by_step"):  # a guided student's target is the guided teacher
            along = [v["fd_to_teacher"]["mean"] for _, v in sorted(row["by_step"].items(), key=lambda kv: int(kv[0]))
                     if "fd_to_teacher" in v]
            if along:
                entry["final fd_to_teacher / best along training"] = along[-1] / min(along)
        out[name] = entry
    return out


def _plot_grids(path: Path, grids: dict[str, torch.Tensor], ev: Evaluator) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(grids), 6)
    nrows = (len(grids) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.9 * nrows), squeeze=False)
    for ax, (name, x) in zip(axes.flat, grids.items()):
        grey = x[:100].mean(1).numpy()  # 10 noises (rows) × the 10 prompts (columns)
        size = grey.shape[-1]
        tiles = grey.reshape(10, 10, size, size).transpose(0, 2, 1, 3).reshape(10 * size, 10 * size)
        ax.imshow(tiles, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=6)
        ax.axis("off")
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_by_step(path: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, row in rows.items():
        if row.get("by_step"):
            steps = sorted(row["by_step"], key=int)
            ax.plot([int(k) for k in steps], [row["by_step"][k]["digits_fd"]["mean"] for k in steps], marker="o",
                    lw=1, label=name)
    for name, row in rows.items():
        if name.startswith("teacher Euler 50"):
            ax.axhline(row["metrics"]["digits_fd"]["mean"], ls="--", lw=0.8, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("digits FD (mean of seeds)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(m: dict, digits: int = 2) -> str:
    return f"{m['mean']:.{digits}f} ± {m['sd']:.{digits}f}"


def markdown(b: dict) -> list[str]:
    s = b["settings"]
    ex = s["example"]
    lines = [f"**Case B — digits through the Wan family and the reference host (the main job's digits example).** "
             f"{s['seeds']} seeds per main row (the stability and quickstart rows: 1); {s['samples']} samples per run "
             f"(the prompts `a digit 0`…`a digit 9` in turn); example built with VAE {ex['vae_steps']} steps, "
             f"teacher "
             f"{ex['teacher_steps']} steps; students {s['student_steps']} steps unless the row says otherwise; FD "
             f"feature space: pixel MLP, held-out accuracy {s['fd_classifier_held_out_accuracy']:.3f}. "
             f"`fd_to_teacher`: FD to a separate draw of the 50-step teacher at the row's guidance.",
             "", "| row | digits FD ↓ | FD to teacher-50 ↓ | class TV ↓ | cond. accuracy ↑ | diversity |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in b["rows"].items():
        m = row["metrics"]
        lines.append(f"| {name} | {_pm(m['digits_fd'], 1)} | "
                     f"{_pm(m['fd_to_teacher'], 1) if 'fd_to_teacher' in m else ''} | {_pm(m['class_tv'], 3)} | "
                     f"{_pm(m['cond_accuracy'], 3)} | {_pm(m['diversity'], 2)} |")
    lines += ["", "| student | FD / teacher-50 (≤ 1.2) | class TV / teacher-50 (≤ 1.2) | diversity / teacher-50 "
              "(≥ 0.8) | guided: FD to guided teacher / guidance-1 FD to teacher (≤ 2) | final FD / best along "
              "training (≤ 1.1); guided rows: of the FD to the guided teacher |",
              "| --- | --- | --- | --- | --- | --- |"]

    def cell(t, key, ok):
        if key not in t:
            return ""
        return f"{t[key]:.2f} ({'met' if ok(t[key]) else '**not met**'})"

    for name, t in b["targets"].items():
        lines.append(f"| {name} | {cell(t, 'fd / teacher-50', lambda v: v <= 1.2)} | "
                     f"{cell(t, 'class_tv / teacher-50', lambda v: v <= 1.2)} | "
                     f"{cell(t, 'diversity / teacher-50', lambda v: v >= 0.8)} | "
                     f"{cell(t, 'fd_to_guided_teacher / (guidance 1 fd_to_teacher)', lambda v: v <= 2)} | "
                     f"{cell(t, 'final fd / best fd along training', lambda v: v <= 1.1)}"
                     + (f"; {cell(t, 'final fd_to_teacher / best along training', lambda v: v <= 1.1)}"
                        if "final fd_to_teacher / best along training" in t else "") + " |")
    lines += ["", "Along training (digits FD, mean of seeds, after each snapshot's optimizer steps):", ""]
    for name, row in b["rows"].items():
        if row.get("by_step"):
            along = sorted(row["by_step"].items(), key=lambda kv: int(kv[0]))
            lines.append(f"- {name}: " + ", ".join(f"{k}: {v['digits_fd']['mean']:.1f}" for k, v in along))
    return lines + [""]


def _ablation_main(argv=None) -> int:
    """``python -m benchmarks.digits [--ablations guided|diversity] [--seeds 2]``: one set of ablation rows beside
    the 50-step teachers."""
    import argparse

    from .quality_shared import DEFAULT_OUT, HERE, log

    parser = argparse.ArgumentParser(prog="python -m benchmarks.digits")
    parser.add_argument("--ablations", choices=sorted(ABLATIONS), default="guided",
                        help="guided: what moves the guidance-3 student; diversity: what lifts the guidance-1 "
                             "3-step student's diversity; gan: DMD2's real-data term (default: guided)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="run only the set's rows whose names one of these regular expressions matches "
                             "(re.search; default: all)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=ABLATION_STUDENT_STEPS,
                        help=f"the rows' base length (default {ABLATION_STUDENT_STEPS}, the length the ablations were "
                             f"measured at; the main job's is {STUDENT_STEPS})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default=None,
                        help="the results' file stem in --out (default: the set's, e.g. case_b_gan_ablation; a run "
                             "of some rows under another name leaves the set's files as they are)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    specs, stem = ABLATIONS[args.ablations]
    stem = args.name or stem
    if args.rows:
        import re

        specs = {name: spec for name, spec in specs.items() if any(re.search(r, name) for r in args.rows)}
    result = run_case_b(args.out, seeds=args.seeds, cache=HERE / ".cache", log=log, teacher_euler=(50,), plots=False,
                        specs=specs, student_steps=args.student_steps)
    result["seconds"] = time.time() - start
    import sys

    import shlex

    result["command"] = "python -m benchmarks.digits " + shlex.join(argv if argv is not None else sys.argv[1:])
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float))
    (args.out / f"{stem}.md").write_text(
        f"Command: `{result['command']}` ({result['seconds']:.0f} s)\n\n" + "\n".join(markdown(result)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_ablation_main())
