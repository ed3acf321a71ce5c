"""Case A: DMD (and LCM, DCM) on a 2-D Gaussian mixture with an exact teacher, through a third-party family plugin and
the public hooks.

The family (``examples/gmm_family``, installed with ``pip install -e examples/gmm_family``) is found through its
``simpletuner_dmd`` entry point. ``distil`` below is a small host: it builds the plugin manager, takes the method's
class from ``registered_methods(pm)[method]`` (``"dmd"`` by default; ``"lcm"``, ``"dcm"``), validates the method config
with the class's schema, registers the instance and
drives the step-loop hooks in the order the hookspecs document (``distill_setup``, then per optimizer step
``distill_loss`` → backward → student step → ``distill_after_optimizer_step`` → ``distill_metrics``; then
``distill_sampler`` for the samples). Nothing in ``simpletuner_dmd.methods`` is imported.

``model_type: full``: the student is a trainable MLP, the fake score a full trainable copy made by ``run.load_base()``,
and the real score ``run.teacher`` is the closed-form teacher. The student and the fake score start from ``base``, an
MLP fitted to the mixture by ordinary flow matching (DMD2 starts both from the teacher's weights; a closed form has no
weights, so this fitted MLP stands in for them). LCM and DCM (``mode: semantic``; ``fine`` needs a LoRA student) train
the same full MLP student against the frozen ``run.teacher`` and read the real samples of each batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simpletuner_dmd.optimizers import adamw
from simpletuner_dmd.plugins import get_plugin_manager, registered_families, registered_methods
from simpletuner_dmd.types import Batch, RunContext, StepInfo

RING = {"modes": 8, "radius": 1.0, "std": 0.1}
# The family's named mixtures (``gmm_family.PRESETS``): ``ring`` is case A's; ``grid25`` and ``uneven3`` test other
# numbers of modes, weights and scales with the same exact teacher (``benchmarks/gmm_mixtures.py``).
MIXTURES = ("ring", "grid25", "uneven3")
# ``ring2c``: the ring's modes in two classes, for the guided case (``benchmarks/gmm_guided.py``).
CONDITIONAL = ("ring2c",)
P_UNCOND = 0.2  # a conditional base is fitted with labels dropped to -1 (unconditional) this often
N_REFERENCE = 20_000
N_SAMPLES = 10_000


def family_and_mixture(mixture: str = "ring"):
    pm = get_plugin_manager()
    families = registered_families(pm)
    if "gmm" not in families:
        raise SystemExit("the gmm family is not installed: pip install -e examples/gmm_family")
    family = families["gmm"].cls()
    from gmm_family import Mixture  # the plugin's own package (installed with it)

    return family, (Mixture.ring(**RING) if mixture == "ring" else Mixture.preset(mixture))


# --------------------------------------------------------------------------- the teacher's weights (an MLP fit)


def fit_base(folder: Path, *, steps: int = 10_000, batch_size: int = 1024, seed: int = 0, log=print,
             mixture: str = "ring") -> Path:
    """Fit a ``FlowMLP`` to the mixture by flow matching (cached in ``folder`` with the settings it was fitted with);
    also save the exact teacher.

    The fit matters: the fake score starts from it, and its error is a floor under the fake score's error. Through
    50 Euler steps a 3000-step fit reaches precision 0.91, a 10 000-step one 0.96; DMD students started from the
    latter are sharper (README, "Quality"). ``mixture``: one of ``MIXTURES`` (use one folder per mixture)."""
    import json

    from gmm_family import ClosedFormTeacher, FlowMLP, save_network

    name = mixture
    family, mixture = family_and_mixture(name)
    base, teacher = folder / "base", folder / "teacher"
    settings = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": 1e-3, "schedule": "cosine",
                **({"mixture": name} if name != "ring" else {})}  # the ring's cached fits stay valid
    fitted = base / "fit.json"
    if (base / "model.safetensors").is_file() and (teacher / "config.json").is_file() and fitted.is_file() \
            and json.loads(fitted.read_text()) == settings:
        return folder
    save_network(ClosedFormTeacher(mixture), teacher)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = FlowMLP(classes=mixture.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.time()
    for _ in range(steps):
        labels = class_labels(mixture, batch_size, g, p_uncond=P_UNCOND)
        x0 = mixture.sample(batch_size, g, labels).view(-1, 2, 1, 1, 1)
        eps = torch.randn_like(x0)
        sigma = torch.rand(x0.shape[0])
        x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * eps
        cond = None if labels is None else labels.float()[:, None]
        loss = torch.mean((family.predict_flow(net, x_t, sigma * 1000, cond) - (eps - x0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    save_network(net, base)
    fitted.write_text(json.dumps(settings))
    log(f"case A: fitted the base MLP by flow matching ({steps} steps, {time.time() - start:.0f} s): {base}")
    return folder


def class_labels(mixture, n: int, generator: torch.Generator | None = None, *, p_uncond: float = 0.0,
                 balanced: bool = False) -> torch.Tensor | None:
    """``n`` labels of a conditional mixture (None for an unconditional one): uniform over the classes (``balanced``:
    ``0, 1, …`` in turn), each dropped to ``-1`` with probability ``p_uncond``."""
    if not mixture.num_classes:
        return None
    if balanced:
        labels = torch.arange(n) % mixture.num_classes
    else:
        labels = torch.randint(0, mixture.num_classes, (n,), generator=generator)
    if p_uncond:
        labels = torch.where(torch.rand(n, generator=generator) < p_uncond, torch.full_like(labels, -1), labels)
    return labels


def prompts_of(labels: torch.Tensor | None, n: int) -> list[str]:
    """The texts the family embeds to ``labels`` (``""`` for an unconditional mixture)."""
    return [""] * n if labels is None else [f"class {int(k)}" for k in labels]


# --------------------------------------------------------------------------- the small host


@dataclass
class RunResult:
    samples: torch.Tensor  # (N_SAMPLES, 2)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # samples after these optimizer steps
    draws: dict[int, torch.Tensor] = field(default_factory=dict)  # the final student's samples from these noise seeds


# The loss curves collected per method: keys of its ``StepLoss.logs`` / ``distill_metrics``.
CURVES = {"dmd": ("dmd_loss", "fake_score_loss", "gan_generator_loss", "gan_classifier_loss"), "lcm": ("lcm_loss",),
          "dcm": ("dcm_loss",)}


def distil(folder: Path, dmd: dict[str, Any], *, seed: int, steps: int, batch_size: int = 256, lr: float = 1e-4,
           betas: tuple[float, float] = (0.9, 0.999), n_samples: int = N_SAMPLES, method: str = "dmd",
           snapshot_steps: tuple[int, ...] = (), lr_schedule: str = "constant", optimizer: str = "adamw",
           mixture: str = "ring", pairs_seed: int | None = None, eval_seeds: tuple[int, ...] = ()) -> RunResult:
    """Distil the exact teacher with ``method`` (its ``distillation_config`` in ``dmd``, named so for DMD's callers)
    through the hooks; return the student's samples, the loss curves and samples after each of ``snapshot_steps``.

    ``seed`` sets the training's draws (the global RNG, the steps' generators, the real batches) and the evaluation's
    noise (``99 000 + seed``). ``pairs_seed`` (default ``seed``) is the run context's seed, which the method reads for
    its teacher ODE pairs (their noises and the order they are streamed in) and the GAN head's init; nothing else.
    ``eval_seeds``: the final student also samples from the noises ``99 000 + s`` for each ``s`` (``RunResult.draws``),
    independent evaluation draws of the same student (use values no other seed's evaluation takes).

    A conditional mixture (``CONDITIONAL``) gives every batch random class prompts (``"class K"``) and samples the
    student with the classes in turn; the negative prompt is ``""`` (label -1, the unconditional branch)."""
    from accelerate import Accelerator

    pm = get_plugin_manager()
    family = registered_families(pm)["gmm"].cls()
    method_cls = registered_methods(pm)[method].cls
    config, problems, unknown = method_cls.schema.validate(dmd, prefix="distillation_config")
    if problems or unknown:
        raise ValueError(f"bad {method} config: {problems} {unknown}")
    instance = method_cls(config)
    pm.register(instance, name=f"method:{method}")

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    student = family.load_network(folder / "base").requires_grad_(True).train()
    teacher = family.load_network(folder / "teacher").eval()
    host = {"model_type": "full", "gradient_checkpointing": False, "seed": seed, "optimizer": optimizer}
    pm.hook.distill_setup(run=RunContext(
        host_config=host, method_config=config, family=family, student=student, accelerator=accelerator,
        encode_prompts=family.embed_prompts, negative_prompt="", output_dir=folder, model_type="full",
        student_adapter=None, load_base=lambda: family.load_network(folder / "base"), teacher=teacher,
        seed=seed if pairs_seed is None else pairs_seed,
    ))
    optimizer = adamw(student.parameters(), kind=optimizer, lr=lr, betas=betas, weight_decay=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule: constant or cosine, got {lr_schedule!r}")
    # The student's schedule, as a user sets lr_scheduler for the host (the fake score's lr stays constant).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if lr_schedule == "cosine" else None
    _, mixture = family_and_mixture(mixture)  # the real batches (DMD only reads their shape; LCM, DCM noise them)
    data = torch.Generator().manual_seed(10_000 + seed)
    conditional = bool(mixture.num_classes)
    cond = family.embed_prompts([""] * batch_size)

    def no_host_loss():
        raise AssertionError(f"{method} never asks for the host's loss")

    curves: dict[str, list[tuple[int, float]]] = {key: [] for key in CURVES.get(method, (f"{method}_loss",))}
    snapshots: dict[int, torch.Tensor] = {}
    start = time.time()
    for step in range(steps):
        info = StepInfo(step, 0, 1, True, torch.Generator().manual_seed(seed * 1_000_003 + step))
        # Real data only gives DMD the shape (DMD proper is data-free); LCM and DCM noise it to their timesteps.
        labels = class_labels(mixture, batch_size, data)
        if conditional:
            cond = family.embed_prompts(prompts_of(labels, batch_size))
        batch = Batch(latents=mixture.sample(batch_size, data, labels).view(-1, 2, 1, 1, 1), cond=cond)
        result = pm.hook.distill_loss(batch=batch, step=info, host_loss=no_host_loss)
        if result.loss is not None:
            accelerator.backward(result.loss)
            accelerator.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        pm.hook.distill_after_optimizer_step(step=info)
        logs = dict(result.logs)
        for extra in pm.hook.distill_metrics(step=info):
            logs.update(extra or {})
        for key in curves:
            if key in logs:
                curves[key].append((step, float(logs[key])))
        if step + 1 in snapshot_steps and step + 1 < steps:
            snapshots[step + 1] = _student_samples(pm, family, student, seed, n_samples, mixture)
    seconds = time.time() - start
    x = _student_samples(pm, family, student, seed, n_samples, mixture)
    snapshots[steps] = x
    draws = {s: _student_samples(pm, family, student, s, n_samples, mixture) for s in eval_seeds}
    return RunResult(x, {k: v for k, v in curves.items() if v}, seconds, snapshots, draws)


def _student_samples(pm, family, student, seed: int, n: int, mixture=None) -> torch.Tensor:
    """``n`` samples of the method's sampler (the same noise for every call of one seed: ``99 000 + seed``, which
    also feeds a few-step sampler's fresh noise between its steps); a conditional mixture's classes in turn
    (``class_labels(..., balanced=True)``), sampled at guidance 1 (the guidance is distilled)."""
    sampler = pm.hook.distill_sampler()
    g = torch.Generator().manual_seed(99_000 + seed)
    noise = torch.randn(n, 2, 1, 1, 1, generator=g)
    labels = None if mixture is None else class_labels(mixture, n, balanced=True)
    student.eval()
    with torch.no_grad():
        x = sampler(noise, family.embed_prompts(prompts_of(labels, n)), None, 1.0, g)
    student.train()
    return x.reshape(-1, 2).float()


def teacher_samples(folder: Path, steps: int, seed: int, n: int = N_SAMPLES, *, guidance: float = 1.0,
                    mixture: str = "ring", seed_offset: int = 99_000) -> torch.Tensor:
    """``n`` samples of the teacher's Euler sampler (``steps`` steps, seed ``seed_offset + seed``); for a conditional
    mixture, its classes in turn at ``guidance`` (CFG on the unconditional branch, label -1)."""
    family, mix = family_and_mixture(mixture)
    teacher = family.load_network(folder / "teacher")
    g = torch.Generator().manual_seed(seed_offset + seed)
    noise = torch.randn(n, 2, 1, 1, 1, generator=g)
    labels = class_labels(mix, n, balanced=True)
    cond = family.embed_prompts(prompts_of(labels, n))
    uncond = family.embed_prompts([""]) if labels is not None else None
    x = family.euler_sampler(teacher, steps=steps)(noise, cond, uncond, guidance, g)
    return x.reshape(-1, 2).float()


# --------------------------------------------------------------------------- metrics


def _mean_cdist(a: torch.Tensor, b: torch.Tensor, *, same: bool) -> float:
    total, chunk = 0.0, 2048
    a, b = a.double(), b.double()
    for i in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[i:i + chunk], b).sum())
    pairs = a.shape[0] * (b.shape[0] - 1) if same else a.shape[0] * b.shape[0]  # U-statistic: no self-pairs
    return total / pairs


class Metrics:
    """Energy distance (unbiased U-statistic) against ``N_REFERENCE`` exact samples, precision, recall, mode-weight TV."""

    def __init__(self, mixture, seed: int = 12345):
        self.mixture = mixture
        self.reference = mixture.sample(N_REFERENCE, torch.Generator().manual_seed(seed))
        self.ref_self = _mean_cdist(self.reference, self.reference, same=True)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        x = x[torch.isfinite(x).all(1)]
        energy = 2 * _mean_cdist(x, self.reference, same=False) - _mean_cdist(x, x, same=True) - self.ref_self
        mu, pi, std = self.mixture.mu.float(), self.mixture.pi.float(), self.mixture.std
        dist, nearest = torch.cdist(x, mu).min(1)
        precise = dist < 3 * std  # within 3 standard deviations of its nearest mode
        counts = torch.bincount(nearest[precise], minlength=mu.shape[0]).float()
        share = counts / x.shape[0]
        weights = counts / counts.sum().clamp(min=1)
        return {
            "energy_distance": energy,
            "precision": float(precise.float().mean()),
            "recall": float((share >= 0.5 * pi).float().mean()),  # modes holding at least half their share
            "mode_tv": float(0.5 * (weights - pi).abs().sum()),
        }


def summarise(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in values[0]:
        xs = [v[key] for v in values]
        mean = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        out[key] = {"mean": mean, "sd": sd, "values": xs}
    return out
