"""Fréchet distance in a small pixel-space feature network: how close a set of decoded samples is to real data.

A *feature folder* holds ``features.safetensors`` (an MLP on grey pixels resized to ``size`` × ``size``: the weights
of its ``Linear`` layers, SiLU between them, the last one the class head) and ``features.json`` (``name``, ``size``,
the layer widths, the held-out accuracy of the classifier it is the body of, and the real data's feature mean and
covariance). ``make-example`` writes one for scikit-learn's digits (``digits FD``); the reference host's
``validation_fd_features`` key points to such a folder and the run ends with the FD of the student and the teacher.

Nothing here unpickles anything: the weights are safetensors, the statistics JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...atomic import write_file
from ...errors import UserError


class PixelMLP(torch.nn.Module):
    """``Linear → SiLU → … → Linear``; ``features`` is the input of the last layer (the penultimate activations)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.nn.functional.silu(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.features(x))


def grey_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] → ``(B, size·size)``: the channel mean, area-resized."""
    grey = pixels.float().mean(dim=1, keepdim=True)
    if grey.shape[-1] != size or grey.shape[-2] != size:
        grey = torch.nn.functional.interpolate(grey, size=(size, size), mode="area")
    return grey.flatten(1)


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """``|μa − μb|² + tr(Ca + Cb − 2 (Ca Cb)^½)``, with ``tr (Ca Cb)^½`` from the eigenvalues of ``Ca^½ Cb Ca^½``
    (symmetric, so no complex square root is needed)."""
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(middle, 0,
                                                                                                        None)).sum())


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features.astype(np.float64), rowvar=False)


@dataclass
class FeatureSpace:
    """A loaded feature folder: ``fd(pixels)`` is the Fréchet distance of decoded samples to the real data."""

    name: str
    size: int
    net: PixelMLP
    real_mu: np.ndarray
    real_cov: np.ndarray
    held_out_accuracy: float

    def features(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.net.features(grey_pixels(pixels, self.size)).double().numpy()

    def classes(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.net(grey_pixels(pixels, self.size)).argmax(1).numpy()

    def fd(self, pixels: torch.Tensor) -> float:
        return frechet_distance(self.real_mu, self.real_cov, *statistics(self.features(pixels)))


def save_feature_space(folder: Path, *, name: str, size: int, net: PixelMLP, widths: list[int],
                       real_features: np.ndarray, held_out_accuracy: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mu, cov = statistics(real_features)
    weights = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    write_file(folder / "features.safetensors", lambda tmp: save_file(weights, tmp))
    meta = {"name": name, "size": size, "widths": widths, "held_out_accuracy": held_out_accuracy,
            "real_samples": len(real_features), "real_mu": mu.tolist(), "real_cov": cov.tolist()}
    write_file(folder / "features.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def load_feature_space(folder: str | Path) -> FeatureSpace:
    folder = Path(folder)
    if not (folder / "features.json").is_file() or not (folder / "features.safetensors").is_file():
        raise UserError(f"validation_fd_features: {folder} holds no features.json and features.safetensors "
                        f"(simpletuner-dmd make-example writes one for the digits)")
    meta = json.loads((folder / "features.json").read_text())
    net = PixelMLP(meta["widths"])
    net.load_state_dict(load_file(folder / "features.safetensors"))
    net.eval()
    return FeatureSpace(meta["name"], int(meta["size"]), net, np.asarray(meta["real_mu"]),
                        np.asarray(meta["real_cov"]), float(meta["held_out_accuracy"]))


def train_classifier(pixels: torch.Tensor, labels: np.ndarray, *, widths: list[int], epochs: int = 60,
                     seed: int = 0) -> tuple[PixelMLP, float]:
    """An MLP classifier on flattened grey pixels; returns it and its accuracy on a held-out sixth of the data
    (trained on the rest)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PixelMLP(widths)
    y = torch.from_numpy(np.asarray(labels)).long()
    perm = torch.randperm(len(pixels), generator=gen)
    held, train = perm[:len(pixels) // 6], perm[len(pixels) // 6:]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train), generator=gen)].split(128):
            # a pixel or two of jitter: the samples a generator draws are never exactly on the data's grid
            x = pixels[idx] + 0.05 * torch.randn(pixels[idx].shape, generator=gen)
            loss = torch.nn.functional.cross_entropy(net(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(pixels[held]).argmax(1) == y[held]).float().mean())
    return net, accuracy


__all__ = ["FeatureSpace", "PixelMLP", "frechet_distance", "grey_pixels", "load_feature_space",
           "save_feature_space", "statistics", "train_classifier"]
