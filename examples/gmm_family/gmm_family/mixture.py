"""A 2-D Gaussian mixture, its exact flow-matching teacher and a small MLP network.

Flow matching convention of simpletuner-dmd: ``x_σ = (1 − σ)·x0 + σ·ε``, ``t = 1000·σ``, networks predict the flow
``v = ε − x0``.

Why the teacher is exact: for component k (mean μ_k, covariance s²·I) the noisy point is Gaussian too,
``x_σ | k ~ N(a·μ_k, v·I)`` with ``a = 1 − σ`` and ``v = a²s² + σ²``. So the responsibilities ``r_k(x_σ)`` are a softmax
of Gaussian log-densities, ``E[x0 | x_σ, k] = μ_k + (a·s²/v)(x_σ − a·μ_k)``, and with ``y = x_σ − a·μ_k`` the flow
``(x_σ − E[x0 | x_σ, k]) / σ`` simplifies to ``y·(σ − a·s²)/v − μ_k`` (no division by σ, so it is finite at σ = 0).

Conditional mixtures: with ``classes`` (one class per mode) a label ``c`` restricts the mixture to the modes of class
``c`` (weights renormalised), which is again a mixture, so the conditional flow is exact too; label ``-1`` is the whole
mixture (the unconditional branch of classifier-free guidance). The guided flow ``u + s·(c − u)`` of two exact flows
is exact, so a guided teacher's sampler has no approximation but its ODE solver.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class Mixture:
    """Modes on a ring (``ring(...)``), a grid (``grid(...)``), a named preset (``preset(name)``, ``PRESETS``) or given
    explicitly; every component has covariance ``std²·I``."""

    means: list[list[float]]
    std: float = 0.1
    weights: list[float] = field(default_factory=list)  # empty: equal weights
    classes: list[int] = field(default_factory=list)  # empty: unconditional; else the class of each mode

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 1.0, std: float = 0.1) -> "Mixture":
        angles = [2 * math.pi * k / modes for k in range(modes)]
        return cls([[radius * math.cos(a), radius * math.sin(a)] for a in angles], std)

    @classmethod
    def grid(cls, side: int = 5, spacing: float = 0.5, std: float = 0.05, uneven: bool = True) -> "Mixture":
        """``side × side`` modes on a square grid centred on 0; ``uneven``: weights 1…5 spread over the modes in a
        fixed scrambled order (mode ``i`` gets ``1 + 4·((7·i) mod n)/(n − 1)`` before normalising)."""
        n = side * side
        half = (side - 1) / 2
        means = [[spacing * (j - half), spacing * (i - half)] for i in range(side) for j in range(side)]
        weights = [1.0 + 4.0 * ((7 * k) % n) / (n - 1) for k in range(n)] if uneven else []
        return cls(means, std, weights)

    @classmethod
    def preset(cls, name: str) -> "Mixture":
        """A named mixture (``PRESETS``): ``ring`` is the default 8-mode ring, the others test other shapes."""
        if name not in PRESETS:
            raise ValueError(f"unknown mixture {name!r}: one of {', '.join(PRESETS)}")
        return PRESETS[name]()

    @property
    def num_classes(self) -> int:
        return max(self.classes) + 1 if self.classes else 0

    def _allowed(self, labels: torch.Tensor | None, device=None) -> torch.Tensor | None:
        """``(B, K)`` bool: the modes each label allows (label ``-1``: all); None for no labels or no classes."""
        if labels is None or not self.classes:
            return None
        cls = torch.tensor(self.classes, device=device if device is not None else labels.device)
        labels = labels.long().to(cls.device)[:, None]
        return (cls[None] == labels) | (labels < 0)

    @property
    def mu(self) -> torch.Tensor:
        return torch.tensor(self.means, dtype=torch.float64)

    @property
    def pi(self) -> torch.Tensor:
        w = torch.tensor(self.weights or [1.0] * len(self.means), dtype=torch.float64)
        return w / w.sum()

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
               ) -> torch.Tensor:
        """``n`` exact samples, ``(n, 2)`` float32; with ``labels`` ``(n,)`` (a conditional mixture), sample ``i``
        from class ``labels[i]`` (``-1``: any)."""
        allowed = self._allowed(labels)
        if allowed is None:
            k = torch.multinomial(self.pi, n, replacement=True, generator=generator)
        else:
            k = torch.multinomial(self.pi[None] * allowed, 1, generator=generator)[:, 0]
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.mu[k] + self.std * eps).float()

    def flow(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The exact ``E[ε − x0 | x_σ]`` for ``x`` ``(B, 2)`` and ``sigma`` ``(B,)`` (computed in fp64); with
        ``labels`` ``(B,)``, ``E[ε − x0 | x_σ, c]`` (``-1``: unconditional)."""
        x64, s = x.double(), sigma.double().clamp(0.0, 1.0)[:, None, None]  # (B, 1, 1)
        mu = self.mu.to(x.device)[None]  # (1, K, 2)
        a = 1.0 - s
        var = a ** 2 * self.std ** 2 + s ** 2  # (B, 1, 1)
        y = x64[:, None, :] - a * mu  # (B, K, 2)
        logp = torch.log(self.pi.to(x.device))[None] - (y ** 2).sum(-1) / (2 * var[..., 0]) - torch.log(var[..., 0])
        allowed = self._allowed(labels, x.device)
        if allowed is not None:
            logp = logp.masked_fill(~allowed, float("-inf"))
        r = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1)
        flow_k = y * (s - a * self.std ** 2) / var - mu
        return (r * flow_k).sum(1).to(x.dtype)

    def to_json(self) -> dict:
        return asdict(self)


PRESETS = {
    # the default: 8 equal modes on a ring of radius 1, std 0.1
    "ring": lambda: Mixture.ring(8, 1.0, 0.1),
    # 25 modes on a 5 × 5 grid (spacing 0.5, so it spans [-1, 1]²), std 0.05, weights 1…5 (0.013 to 0.067 each)
    "grid25": lambda: Mixture.grid(5, 0.5, 0.05, uneven=True),
    # 3 modes at a larger scale than the noise (means ~3 from the origin), std 0.3, weights 0.75 / 0.2 / 0.05
    "uneven3": lambda: Mixture([[-3.0, -1.5], [3.0, -1.5], [0.0, 3.0]], 0.3, [0.75, 0.2, 0.05]),
    # the ring's 8 modes in 2 classes (even and odd modes, interleaved): a conditional mixture for guidance
    "ring2c": lambda: Mixture(Mixture.ring(8, 1.0, 0.1).means, 0.1, [], [k % 2 for k in range(8)]),
}


def labels_of(cond: torch.Tensor | None) -> torch.Tensor | None:
    """The class labels a condition tensor ``(B, 1)`` carries (``GMMFamily.embed_prompts``: ``-1`` unconditional)."""
    return None if cond is None else cond.reshape(cond.shape[0], -1)[:, 0].round().long()


class ClosedFormTeacher(nn.Module):
    """The exact teacher as a module: ``forward(x_t (B, 2, 1, 1, 1), t (B,)) → flow`` of the same shape."""

    kind = "closed_form"

    def __init__(self, mixture: Mixture):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        flat = x_t.reshape(x_t.shape[0], -1)
        return self.mixture.flow(flat, timesteps.float() / 1000.0, labels_of(cond)).reshape(x_t.shape)

    def config(self) -> dict:
        return {"kind": self.kind, "mixture": self.mixture.to_json()}


class FlowMLP(nn.Module):
    """A small MLP flow predictor: ``[x, Fourier features of σ] → v``, for the student and the fake score. With
    ``classes`` > 0 it is conditional: a one-hot of the label (``classes + 1`` entries, the last for ``-1``,
    unconditional) joins the input."""

    kind = "mlp"

    def __init__(self, dim: int = 2, hidden: int = 256, layers: int = 3, frequencies: int = 16, classes: int = 0):
        super().__init__()
        self.dims = {"dim": dim, "hidden": hidden, "layers": layers, "frequencies": frequencies,
                     **({"classes": classes} if classes else {})}
        self.classes = classes
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.linspace(0, 6, frequencies), persistent=False)
        inputs = dim + 2 * frequencies + 1 + (classes + 1 if classes else 0)
        blocks: list[nn.Module] = [nn.Linear(inputs, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.SiLU()]
        blocks.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        flat = x_t.reshape(x_t.shape[0], -1)
        sigma = (timesteps.float() / 1000.0)[:, None]
        angles = sigma * self.freqs[None]
        parts = [flat.float(), sigma, torch.sin(angles), torch.cos(angles)]
        if self.classes:
            labels = labels_of(cond)
            if labels is None:
                raise ValueError("a conditional FlowMLP needs its condition (label -1: unconditional)")
            labels = torch.where(labels < 0, torch.full_like(labels, self.classes), labels)
            parts.append(nn.functional.one_hot(labels, self.classes + 1).float())
        feats = torch.cat(parts, dim=1)
        return self.net(feats).reshape(x_t.shape).to(x_t.dtype)

    def config(self) -> dict:
        return {"kind": self.kind, **self.dims}


def save_network(network: nn.Module, folder: str | Path) -> Path:
    """A "model folder": ``config.json`` (+ ``model.safetensors`` for an MLP)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(network.config(), indent=1))
    if isinstance(network, FlowMLP):
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                  str(folder / "model.safetensors"))
    return folder


def load_network(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    kind = config.pop("kind")
    if kind == ClosedFormTeacher.kind:
        return ClosedFormTeacher(Mixture(**config["mixture"]))
    if kind == FlowMLP.kind:
        network = FlowMLP(**config)
        network.load_state_dict(load_file(str(folder / "model.safetensors")))
        return network.to(dtype)
    raise ValueError(f"{folder}: unknown network kind {kind!r}")
