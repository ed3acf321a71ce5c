"""The plugin module named by the ``simpletuner_dmd`` entry point: one family class and its registration hook.

Only what methods need (``simpletuner_dmd.ModelFamily``: ``predict_flow``, ``frame_axis``, condition batching) plus
two members of ``LoadingFamily`` that the quality benchmark, a small host, uses (``load_network``, ``euler_sampler``).
Conditions travel as ``(B, 1)`` tensors holding a class label (``embed_prompts``: ``"class 1"`` → 1, any other text,
the empty negative prompt included, → ``-1``, unconditional), so that batching them works like any other family's; an
unconditional mixture ignores them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from simpletuner_dmd import FamilyBase, hookimpl


class GMMFamily(FamilyBase):
    name = "gmm"
    summary = "2-D Gaussian mixture: exact flow-matching teacher, MLP student and fake score (example plugin)"
    causal = False
    lora_target_modules = ("net.0", "net.2", "net.4")

    def __init__(self, *, autocast_dtype: torch.dtype | None = None):
        self.autocast_dtype = autocast_dtype  # unused: everything is fp32/fp64

    # ---- what every method uses
    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond
                     ) -> torch.Tensor:
        """The flow ``ε − x0`` at ``t = 1000·σ``; ``x_t`` is ``(B, 2, 1, 1, 1)``."""
        if timesteps.ndim != 1 or timesteps.shape[0] != x_t.shape[0]:
            raise ValueError(f"one timestep per sample expected, got {tuple(timesteps.shape)} for {tuple(x_t.shape)}")
        return network(x_t, timesteps, cond)

    def frame_axis(self) -> int:
        return 2

    def gan_feature_module(self, network: torch.nn.Module) -> tuple[torch.nn.Module, int]:
        """Optional: the MLP's last hidden activation ``(B, hidden)``, for DMD2's GAN classifier."""
        return network.net[-2], network.dims["hidden"]

    def concat_conditions(self, conds: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conds, dim=0)

    def repeat_condition(self, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        return cond.expand(batch_size, *cond.shape[1:])

    # ---- what a host uses
    def load_network(self, model_path: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from .mixture import load_network

        return load_network(model_path, dtype)

    sample_shape = (2, 1, 1, 1)  # one sample's latent shape (a point of the plane)

    def embed_prompts(self, texts: list[str]) -> torch.Tensor:
        """A ``RunContext.encode_prompts`` for the mixture: ``"class K"`` is label K, any other text ``-1`` (the
        unconditional branch; an unconditional mixture ignores labels)."""
        labels = [float(t.split()[1]) if t.startswith("class ") and t.split()[1:2] and t.split()[1].isdigit()
                  else -1.0 for t in texts]
        return torch.tensor(labels).reshape(len(texts), 1)

    def euler_sampler(self, network: torch.nn.Module, *, steps: int, shift: float = 1.0):
        """Euler on the flow ODE over ``steps`` uniform (optionally shifted) σs from 1 to 0; with ``uncond`` and a
        ``guidance_scale`` other than 1, the guided flow ``u + s·(c − u)`` (standard CFG)."""

        def sample(noise, cond, uncond, guidance_scale, generator):
            sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
            x = noise
            with torch.no_grad():
                for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
                    t = torch.full((x.shape[0],), s * 1000.0, device=x.device)
                    v = self.predict_flow(network, x, t, cond)
                    if uncond is not None and guidance_scale != 1.0:
                        u = self.predict_flow(network, x, t, self.repeat_condition(uncond, x.shape[0]))
                        v = u + guidance_scale * (v - u)
                    x = x + (s_next - s) * v
            return x

        return sample


@hookimpl
def register_model_families(register):
    register(GMMFamily)
