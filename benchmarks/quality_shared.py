"""What the quality benchmark's cases share (``quality.py`` runs them, ``digits.py`` is case B and also runs on its
own; ``gmm_guided.py`` and ``gmm_mixtures.py`` are side cases ``quality.py`` runs by name): where results go, the log
line, the loss-curve plot, case A's tuned DMD settings and the in-order process map. It imports none of them, so they
import one way."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "quality"


# Case A's tuned DMD settings (the critic faster than the student, as DMD2's two time-scale rule asks); the side cases
# (gmm_guided, gmm_mixtures) start from them unchanged.
CASE_A_TUNED = {"fake_score_lr": 1e-3, "generator_update_interval": 5}


def log(message: str) -> None:
    print(f"[quality] {message}", flush=True)


def map_in_order(fn, tasks: list, jobs: int):
    """``fn`` over ``tasks``, in order, in ``jobs`` processes (1: here)."""
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(fn, tasks)


def plot_curves(path: Path, curves: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("dmd_loss", "fake_score_loss", "gan_generator_loss", "gan_classifier_loss", "lcm_loss", "dcm_loss")
    keys = [k for k in names if any(c.get(k) for c in curves.values())]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    axes = list(axes.flat)
    for name, c in curves.items():
        for ax, key in zip(axes, keys):
            if c.get(key):
                steps, values = zip(*c[key])
                ax.plot(steps, _smooth(values), label=name, lw=1)
    for ax, key in zip(axes, keys):
        ax.set_title(f"{key} (seed 0, moving average)")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values, width: int = 50) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out
