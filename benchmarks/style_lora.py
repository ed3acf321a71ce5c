"""Distil your own model (issue 30, item 3): a style LoRA on the digits example's teacher, and three 3-step students.

``python -m benchmarks.style_lora`` (one command; every stage is cached in ``benchmarks/.cache/style-lora`` and found
again by its config):

1. **The style**: the digits example's digits shifted 2 px to the right (what falls off the right edge is lost),
   captioned as the plain ones (``a digit N``). Its statistic is the samples' horizontal centre of mass in pixels
   (``centre_x``: 7.6 for the plain digits, 9.6 shifted). Inversion and thickening were probed first and dropped:
   the example's VAE, trained on the plain digits, cannot carry them (inverted digits come back with mean intensity
   0.32 against 0.69; thickened ones with 0.34–0.36 against 0.42–0.52, where plain digits come back at 0.33),
   while a shift comes back at 9.4 px — so the style is one the pipeline can draw at all.
2. **The FD's feature spaces** are trained the way the example's is (``make_fd_features``: the same MLP, epochs and
   split), since the example's own classifier labels only 54% of the shifted digits right. The main one is trained
   on the shifted digits *through the VAE* (encoded and decoded: what the pipeline can draw at all), and its FD is
   to them; the second, on the crisp shifted digits, gives the FD to those, which the VAE alone puts far off (the
   VAE's own reconstructions are at about 194 there, the crisp digits' noise floor at 11), so that column mostly
   measures the VAE.
3. **The style LoRA**: trained by the package's own trainer on the shifted set — the digits example's teacher recipe
   (``teacher_config``: the reference host, plain flow matching, 10% caption dropout) with ``model_type: lora``
   and no ``distillation_method`` — saved as ``pytorch_lora_weights.safetensors``.
4. **The students**, with the main job's distillation keys (``config_examples/tiny-wan-digits``, as case B's
   ``DMD 3-step (1000,757,522), guidance 1`` row), one run per seed:

   - (a) distilled from base + style LoRA (the host key ``teacher_loras``) on the shifted set, sampled as its model
     card says: the style LoRA and the student LoRA on the base, both at scale 1;
   - (b) case B's base-distilled student (on the plain digits; case B does not keep its students, so it is trained
     here with case B's own spec and kept) stacked on the style LoRA at sampling: what users do today;
   - (c) the style teacher (base + style LoRA) at 3 Euler steps;

   beside the style teacher at 50 steps (the reference), the base teacher at 50 steps (no style: what the feature
   space makes of the wrong style), the floors (each space's real set, one half against the other) and a control
   without a style: the base teacher and the base student alone, measured the same way against the plain digits
   (through the VAE, and in the example's own space). Every row uses the same prompts and noises per seed
   (``digits.Evaluator``).

Goal (``targets``): (a)'s FD within 1.2× the style teacher's 50-step FD, and clearly ahead of (b) (its mean + sd
below (b)'s mean − sd); the control's same ratio says how strict the FD is without a style. When the export wrote
its ``combined/`` LoRA, (a) is sampled from it alone on the base too. Results: ``benchmarks/results/quality/style_lora.{json,md}`` and ``style_lora_samples.png``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simpletuner_dmd.lora_files import MAIN_FILE

from . import digits
from .quality_shared import DEFAULT_OUT, HERE, log

SHIFT_PX = 2
STYLE = f"digits shifted {SHIFT_PX} px to the right"
# The style LoRA: the example teacher's recipe (teacher_config) as a rank-16 LoRA.
STYLE_LORA = {"model_type": "lora", "lora_rank": 16, "lora_alpha": 16, "base_model_precision": "no_change",
              "learning_rate": 1e-3, "max_train_steps": 1200}
# The main job's student, as case B measures it (its main 3-step row at guidance 1).
MAIN_ROW = "DMD 3-step (1000,757,522), guidance 1"
TEACHER_STEPS = 50
A, B, C = ("(a) distilled from base + style LoRA (teacher_loras), 3-step",
           "(b) base-distilled student stacked on the style LoRA, 3-step",
           "(c) style teacher, Euler 3")
A_COMBINED = "(a) as its one combined LoRA (style + student) on the base, 3-step"
STYLE_50 = f"style teacher (base + style LoRA), Euler {TEACHER_STEPS}"
BASE_50 = f"base teacher (no style), Euler {TEACHER_STEPS}"
VAE_FLOOR = "shifted digits through the VAE (half vs other half)"
CRISP_FLOOR = "shifted digits, crisp (half vs other half)"
PLAIN = "plain digits (the example's data, not shifted)"
CONTROL_FLOOR = "control: plain digits through the VAE (half vs other half)"
CONTROL_50 = f"control: base teacher, Euler {TEACHER_STEPS}, against the plain digits"
CONTROL_B = "control: the base-distilled student alone, 3-step, against the plain digits"
CONTROL_3 = "control: base teacher, Euler 3, against the plain digits"
FD_GOAL = 1.2
SHEET = (CRISP_FLOOR, STYLE_50, A, B, C, BASE_50)  # the sample sheet's panels, seed 0


def shifted(pixels: torch.Tensor) -> torch.Tensor:
    """Grey images ``(N, C, H, W)`` shifted ``SHIFT_PX`` to the right, zeros coming in on the left."""
    return torch.nn.functional.pad(pixels, (SHIFT_PX, 0, 0, 0))[..., :pixels.shape[-1]]


def centre_x(pixels: torch.Tensor) -> np.ndarray:
    """Each image's horizontal centre of mass in pixels (0 = the left column), from its channel mean."""
    grey = pixels.float().mean(1)  # (N, H, W)
    columns = grey.sum(1)  # (N, W)
    x = torch.arange(columns.shape[-1], dtype=columns.dtype)
    return ((columns * x).sum(1) / columns.sum(1).clamp_min(1e-6)).numpy()


def teacher_loras_supported() -> bool:
    """Whether the reference host knows the ``teacher_loras`` key (row (a) needs it)."""
    from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA

    return "teacher_loras" in HOST_SCHEMA.by_name


# --------------------------------------------------------------------------- the cached stages


def _cached(stamp: Path, key: dict, product: Path) -> bool:
    return product.exists() and stamp.is_file() and json.loads(stamp.read_text()) == key


def style_set(cache: Path, paths: dict[str, Path], *, classifier_epochs: int, n_digits: int | None) -> dict[str, Path]:
    """The shifted digits (captioned PNGs) and their feature space; ``paths`` with ``dataset`` and ``fd_features``
    replaced by them."""
    from simpletuner_dmd.hosts.reference.digits_example import (
        _digit_pixels,
        make_fd_features,
        write_captioned,
    )

    folder = cache / "shifted-digits"
    pixels, labels = _digit_pixels(n_digits)
    data = write_captioned(folder / "digits", shifted(pixels), labels, stem="digit", suffix=".png",
                           save=_save_png)
    features = folder / "digits-fd"
    key = {"shift_px": SHIFT_PX, "classifier_epochs": classifier_epochs, "n_digits": n_digits}
    if not _cached(folder / "fd-stamp.json", key, features / "features.json"):
        accuracy = make_fd_features(features, shifted(pixels), labels, epochs=classifier_epochs)
        (folder / "fd-stamp.json").write_text(json.dumps(key))
        log(f"style: the shifted digits' feature space (held-out accuracy {accuracy:.3f}): {features}")
    return {**paths, "dataset": data, "fd_features": features}


def vae_feature_space(folder: Path, crisp: digits.Evaluator, *, classifier_epochs: int) -> torch.Tensor:
    """The feature space of ``crisp.real`` as the pipeline's VAE draws them (``make_fd_features`` on
    ``digits.through_vae`` of them), in ``folder`` (cached, by the reconstructions' checksum); returns those grey
    reconstructions."""
    from simpletuner_dmd.hosts.reference.digits_example import make_fd_features

    recon = digits.through_vae(crisp, crisp.real).mean(1, keepdim=True)
    key = {"classifier_epochs": classifier_epochs, "n_real": len(recon), "sum": round(float(recon.sum()), 3)}
    if not _cached(folder.parent / f"{folder.name}-stamp.json", key, folder / "features.json"):
        accuracy = make_fd_features(folder, recon, crisp.real_labels, epochs=classifier_epochs)
        (folder.parent / f"{folder.name}-stamp.json").write_text(json.dumps(key))
        log(f"style: the feature space of {folder.name} (held-out accuracy {accuracy:.3f})")
    return recon


def _save_png(item: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(item).convert("RGB").save(path)


def train_style_lora(cache: Path, paths: dict[str, Path], styled: dict[str, Path], *, steps: int) -> Path:
    """The style LoRA's folder: the reference host, no ``distillation_method``, on the shifted digits."""
    from simpletuner_dmd.hosts.reference.digits_example import teacher_config
    from simpletuner_dmd.hosts.reference.trainer import train

    folder = cache / "style"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = teacher_config(folder, paths["model"], styled["dataset"], steps=steps)
    config = {**json.loads(config_path.read_text()), **STYLE_LORA, "max_train_steps": steps}
    config_path.write_text(json.dumps(config, indent=1))
    run = Path(config["output_dir"])
    if _cached(folder / "stamp.json", config, run / MAIN_FILE):
        log(f"style: the style LoRA is cached: {run}")
        return run
    t0 = time.time()
    train(config_path)
    (folder / "stamp.json").write_text(json.dumps(config))
    log(f"style: trained the style LoRA ({steps} steps, {time.time() - t0:.0f} s): {run}")
    return run


def train_student(folder: Path, paths: dict[str, Path], *, seed: int, max_steps: int, host: dict) -> Path:
    """Case B's main-row student (``digits.STUDENTS[MAIN_ROW]``) on ``paths["dataset"]``, with ``host`` keys added;
    its run folder (kept, so a second call finds it)."""
    from simpletuner_dmd.hosts.reference.trainer import train

    steps_list, dmd, row_host, _, _ = digits.STUDENTS[MAIN_ROW]
    tag = f"student-seed{seed}"
    key = {"dataset": str(paths["dataset"]), "steps": steps_list, "dmd": dmd, "host": {**row_host, **host},
           "max_steps": max_steps, "seed": seed, "student": digits.STUDENT_HOST, "method": digits.STUDENT_DMD}
    run = folder / tag
    if _cached(folder / f"{tag}.stamp.json", key, run / MAIN_FILE):
        return run
    folder.mkdir(parents=True, exist_ok=True)
    config = digits._student_config(folder, paths, tag, steps_list=steps_list, dmd=dmd, host={**row_host, **host},
                                    max_steps=max_steps, seed=seed)
    t0 = time.time()
    train(config)
    (folder / f"{tag}.stamp.json").write_text(json.dumps(key))
    log(f"style: trained {folder.name}/{tag} ({max_steps} steps, {time.time() - t0:.0f} s)")
    return run


# --------------------------------------------------------------------------- sampling with LoRAs on the base


class Adapters:
    """The base transformer with LoRA folders loaded as named adapters, as a stock pipeline's ``load_lora_weights``
    does; ``use(*names)`` makes those adapters (each at scale 1) the active ones."""

    def __init__(self, model: Path):
        from diffusers import WanTransformer3DModel

        self.network = WanTransformer3DModel.from_pretrained(model / "transformer").eval()
        self.loaded: set[str] = set()

    def load(self, name: str, folder: Path) -> None:
        self.network.load_lora_adapter(str(folder), weight_name=MAIN_FILE, prefix="transformer", adapter_name=name)
        self.loaded.add(name)

    def use(self, *names: str) -> torch.nn.Module:
        if names:
            self.network.enable_adapters()
            self.network.set_adapters(list(names), [1.0] * len(names))
        elif self.loaded:
            self.network.disable_adapters()
        return self.network


# --------------------------------------------------------------------------- the benchmark


def run_style_lora(out: Path, *, seeds: int, cache: Path, student_steps: int = digits.STUDENT_STEPS,
                   style_steps: int = STYLE_LORA["max_train_steps"], n_eval: int = digits.N_EVAL,
                   teacher_steps: int = TEACHER_STEPS, example: dict | None = None, plots: bool = True) -> dict:
    """The rows (module docstring). ``example``: ``make_digits_example`` keywords (tests shrink the build)."""
    from .gmm import summarise

    start = time.time()
    example = {**digits.EXAMPLE_DEFAULTS, **(example or {})}
    cache = cache / "style-lora"
    paths = digits.build_example(cache.parent, log=log, **example)
    styled = style_set(cache, paths, classifier_epochs=example["classifier_epochs"], n_digits=example["n_digits"])
    seconds = {"set": time.time() - start}
    style = train_style_lora(cache, paths, styled, steps=style_steps)
    seconds["style_lora"] = time.time() - start - seconds["set"]

    have_a = teacher_loras_supported()
    if not have_a:
        log("style: the reference host has no teacher_loras key yet: row (a) is not run")
    loras = {"teacher_loras": [{"path": str(style / MAIN_FILE), "scale": 1.0}]}
    t0 = time.time()
    base_students, style_students = [], []
    for s in range(seeds):  # seed by seed, so an interrupted run leaves whole pairs in the cache
        if have_a:
            style_students.append(train_student(cache / "students-style", styled, seed=s, max_steps=student_steps,
                                                host=loras))
        base_students.append(train_student(cache / "students-base", paths, seed=s, max_steps=student_steps, host={}))
    seconds["students"] = time.time() - t0

    from simpletuner_dmd.hosts.reference.digits_example import _digit_pixels

    plain, labels = _digit_pixels(example["n_digits"])
    # two feature spaces, both trained as the example's: on the crisp shifted digits, and on the shifted digits
    # through the VAE (what the pipeline can draw at all: the main FD)
    crisp = digits.Evaluator(styled, n_eval, example["n_digits"], real=shifted(plain))
    recon = vae_feature_space(cache / "shifted-digits" / "digits-fd-vae", crisp,
                              classifier_epochs=example["classifier_epochs"])
    ev = digits.Evaluator({**styled, "fd_features": cache / "shifted-digits" / "digits-fd-vae"}, n_eval,
                          example["n_digits"], real=recon)
    # the control: the same two measures on the plain digits (the example's own space is the crisp one)
    plain_crisp = digits.Evaluator(paths, n_eval, example["n_digits"])
    plain_recon = vae_feature_space(cache / "plain-digits-fd-vae", plain_crisp,
                                    classifier_epochs=example["classifier_epochs"])
    plain_ev = digits.Evaluator({**paths, "fd_features": cache / "plain-digits-fd-vae"}, n_eval,
                                example["n_digits"], real=plain_recon)
    # how much the example's own feature space (trained on the plain digits) makes of the shifted ones
    example_accuracy = float((plain_crisp.space.classes(crisp.real) == labels).mean())
    net = Adapters(paths["model"])
    net.load("style", style)
    for s, folder in enumerate(base_students):
        net.load(f"base-student-{s}", folder)
    for s, folder in enumerate(style_students):
        net.load(f"style-student-{s}", folder)
    combined = [folder / "combined" for folder in style_students if (folder / "combined" / MAIN_FILE).is_file()]
    for s, folder in enumerate(combined):
        net.load(f"combined-{s}", folder)

    rows: dict[str, dict] = {}
    grids: dict[str, torch.Tensor] = {}

    def finish(name: str, row: dict, pixels: torch.Tensor) -> None:
        rows[name], grids[name] = row, pixels
        log(f"style: {name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in row["metrics"].items()))

    def measure(pixels: torch.Tensor, labels=None, main: dict | None = None, spaces=(ev, crisp)
                ) -> dict[str, float]:
        crisp_fd = spaces[1](pixels, guidance=None, labels=labels)["digits_fd"]
        return {**(main or spaces[0](pixels, guidance=1.0, labels=labels)), "fd_crisp": crisp_fd,
                "centre_x": float(centre_x(pixels).mean())}

    t0 = time.time()
    ev.set_reference(1.0, ev.teacher(net.use("style"), teacher_steps, 1.0, seed=999))
    half = len(ev.real) // 2
    # the floors: each space's real set, one half against the other (the other space measures the first half)
    floor = measure(ev.real[:half], labels[:half], main=digits.noise_floor(ev))
    finish(VAE_FLOOR, {"kind": "reference", "metrics": summarise([floor])}, _by_class(ev.real, labels))
    floor = {**measure(crisp.real[:half], labels[:half]), "fd_crisp": digits.noise_floor(crisp)["digits_fd"]}
    finish(CRISP_FLOOR, {"kind": "reference", "metrics": summarise([floor])},
           _by_class(crisp.real, labels))
    finish(PLAIN, {"kind": "reference", "metrics": summarise([measure(plain.expand(-1, 3, -1, -1), labels)])},
           _by_class(plain.expand(-1, 3, -1, -1), labels))

    def sampled(name: str, kind: str, draw, spaces=(ev, crisp)) -> None:
        samples = [draw(s) for s in range(seeds)]
        finish(name, {"kind": kind, "metrics": summarise([measure(x, spaces=spaces) for x in samples])}, samples[0])

    sampled(STYLE_50, "teacher", lambda s: ev.teacher(net.use("style"), teacher_steps, 1.0, s))
    sampled(BASE_50, "teacher", lambda s: ev.teacher(net.use(), teacher_steps, 1.0, s))
    three = digits.STUDENTS[MAIN_ROW][0]
    if have_a:
        sampled(A, "student", lambda s: ev.student(net.use("style", f"style-student-{s}"), three, s))
    if combined and len(combined) == seeds:  # the export's one LoRA for the stock base: (a) again, as users load it
        sampled(A_COMBINED, "student", lambda s: ev.student(net.use(f"combined-{s}"), three, s))
        rows[A_COMBINED]["max_abs_pixel_difference_to_a_seed0"] = float((grids[A_COMBINED] - grids[A]).abs().max())
    sampled(B, "student", lambda s: ev.student(net.use("style", f"base-student-{s}"), three, s))
    sampled(C, "teacher", lambda s: ev.teacher(net.use("style"), 3, 1.0, s))
    # the control rows, measured against the plain digits (through the VAE; crisp: the example's own space)
    spaces = (plain_ev, plain_crisp)
    plain_ev.set_reference(1.0, ev.teacher(net.use(), teacher_steps, 1.0, seed=999))
    floor = measure(plain_ev.real[:half], labels[:half], main=digits.noise_floor(plain_ev), spaces=spaces)
    finish(CONTROL_FLOOR, {"kind": "control", "metrics": summarise([floor])}, _by_class(plain_ev.real, labels))
    sampled(CONTROL_50, "control", lambda s: ev.teacher(net.use(), teacher_steps, 1.0, s), spaces)
    sampled(CONTROL_B, "control", lambda s: ev.student(net.use(f"base-student-{s}"), three, s), spaces)
    sampled(CONTROL_3, "control", lambda s: ev.teacher(net.use(), 3, 1.0, s), spaces)
    seconds["sampling"] = time.time() - t0
    if plots:
        digits._plot_grids(out / "style_lora_samples.png", {k: grids[k] for k in SHEET if k in grids}, ev)
    return {"rows": rows, "targets": targets(rows), "settings": {
        "style": STYLE, "example": example, "style_lora": {**STYLE_LORA, "max_train_steps": style_steps},
        "student_steps": student_steps, "seeds": seeds, "samples": n_eval, "teacher_steps": teacher_steps,
        "student_host": digits.STUDENT_HOST, "student_dmd": digits.STUDENT_DMD,
        "fd_classifier_held_out_accuracy": ev.space.held_out_accuracy,
        "example_fd_classifier_accuracy_on_shifted_digits": example_accuracy, "row_a_run": have_a},
        "seconds_by_stage": seconds}


def _by_class(pixels: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Ten of each digit, in the sample sheets' order (10 rows of the prompts 0…9)."""
    picks = [np.flatnonzero(labels == d)[:10] for d in range(10)]
    order = np.stack(picks, 1).reshape(-1) if all(len(p) == 10 for p in picks) else np.arange(min(100, len(labels)))
    return pixels[torch.from_numpy(order)]


def targets(rows: dict) -> dict:
    """(a) against the style teacher's 50-step FD (≤ 1.2×) and against (b) (mean + sd below (b)'s mean − sd)."""
    if A not in rows or STYLE_50 not in rows:
        return {}
    fd = {name: rows[name]["metrics"]["digits_fd"] for name in (A, B, C, STYLE_50) if name in rows}
    out = {"(a) fd / style teacher-50": fd[A]["mean"] / fd[STYLE_50]["mean"],
           "(b) fd / style teacher-50": fd[B]["mean"] / fd[STYLE_50]["mean"],
           "(c) fd / style teacher-50": fd[C]["mean"] / fd[STYLE_50]["mean"],
           "(b) fd / (a) fd": fd[B]["mean"] / fd[A]["mean"]}
    if CONTROL_B in rows and CONTROL_50 in rows:  # the same ratio without a style, in the same kind of space
        out["control: base student fd / base teacher-50"] = (rows[CONTROL_B]["metrics"]["digits_fd"]["mean"]
                                                             / rows[CONTROL_50]["metrics"]["digits_fd"]["mean"])
    out["(a) within 1.2x the style teacher-50"] = out["(a) fd / style teacher-50"] <= FD_GOAL
    out["(a) clearly ahead of (b)"] = fd[A]["mean"] + fd[A]["sd"] < fd[B]["mean"] - fd[B]["sd"]
    return out


def markdown(result: dict) -> list[str]:
    s = result["settings"]
    pm = digits._pm
    lines = [f"Style: {s['style']}. Style LoRA: rank {s['style_lora']['lora_rank']}, "
             f"{s['style_lora']['max_train_steps']} steps (the example teacher's recipe). Students: "
             f"{s['student_steps']} steps, the main job's keys; {s['seeds']} seeds; {s['samples']} samples per run. "
             f"FD feature spaces, trained as the example's: on the shifted digits through the VAE (the main FD; "
             f"held-out accuracy {s['fd_classifier_held_out_accuracy']:.3f}) and on the crisp shifted digits "
             f"(the example's own space, trained on the plain digits, labels "
             f"{s['example_fd_classifier_accuracy_on_shifted_digits']:.3f} of the shifted digits right). "
             f"`centre x`: the horizontal centre of mass in pixels. `FD to the teacher-50`: to a separate draw of the "
             f"50-step style teacher.", "",
             "The target is the shifted digits; in the control rows, the plain digits (and the teacher the base one).",
             "", "| row | FD to the target through the VAE ↓ | FD to the crisp target ↓ | FD to the teacher-50 ↓ "
             "| centre x (px) | class TV ↓ | cond. accuracy ↑ | diversity |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["rows"].items():
        m = row["metrics"]
        lines.append(f"| {name} | {pm(m['digits_fd'], 1)} | {pm(m['fd_crisp'], 1)} | "
                     f"{pm(m['fd_to_teacher'], 1) if 'fd_to_teacher' in m else ''} | {pm(m['centre_x'], 2)} | "
                     f"{pm(m['class_tv'], 3)} | {pm(m['cond_accuracy'], 3)} | {pm(m['diversity'], 2)} |")
    t = result["targets"]
    if t:
        lines += ["", f"- (a) FD / style teacher-50: {t['(a) fd / style teacher-50']:.2f} (goal ≤ {FD_GOAL}: "
                      f"{'met' if t['(a) within 1.2x the style teacher-50'] else '**not met**'}); (b): "
                      f"{t['(b) fd / style teacher-50']:.2f}; (c): {t['(c) fd / style teacher-50']:.2f}",
                  *([f"- control, without a style: the base-distilled student's FD / the base teacher-50's, in the "
                     f"same kind of space (plain digits through the VAE): "
                     f"{t['control: base student fd / base teacher-50']:.2f}"]
                    if "control: base student fd / base teacher-50" in t else []),
                  f"- (b) FD / (a) FD: {t['(b) fd / (a) fd']:.2f}; (a) clearly ahead of (b) (mean + sd below (b)'s "
                  f"mean − sd): {'met' if t['(a) clearly ahead of (b)'] else '**not met**'}"]
    elif not s["row_a_run"]:
        lines += ["", "Row (a) was not run: the reference host has no `teacher_loras` key in this checkout."]
    return lines + [""]


def main(argv=None) -> int:
    """``python -m benchmarks.style_lora [--seeds 3] [--threads 1]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.style_lora")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student-steps", type=int, default=digits.STUDENT_STEPS)
    parser.add_argument("--style-steps", type=int, default=STYLE_LORA["max_train_steps"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = run_style_lora(args.out, seeds=args.seeds, cache=args.cache, student_steps=args.student_steps,
                            style_steps=args.style_steps, plots=not args.no_plots)
    result["seconds"] = time.time() - start
    result["command"] = "python -m benchmarks.style_lora " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "style_lora.json").write_text(json.dumps(result, indent=1, default=float))
    (args.out / "style_lora.md").write_text(f"Command: `{result['command']}` ({result['seconds']:.0f} s)\n\n"
               + "\n".join(markdown(result)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
