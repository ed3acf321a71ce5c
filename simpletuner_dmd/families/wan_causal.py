"""The ``wan-causal`` model family: Wan 2.1 as a block-causal student (Self-Forcing), on the same pretrained weights.

The network is diffusers' ``WanTransformer3DModel`` loaded exactly as the ``wan`` family loads it, with
``block_causal.BlockCausalWan`` installed on it: outside a causal context it *is* the bidirectional Wan — which is
what the teacher (the base with its adapters off) and the fake score need — and inside one it attends block-causally
(``masked``) or through a KV cache (``cached``). Methods reach that switch through ``block_causal(network)``; DMD's
Self-Forcing rollout and its streaming sampler use it, so every block key of ``distillation_config``
(``num_frame_per_block``, ``independent_first_frame``, ``same_step_across_blocks``, ``last_step_only``,
``num_training_frames``, ``context_noise``) acts with this family.
"""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from .block_causal import BlockCausalWan, frame_timesteps
from .wan import WanFamily


class WanCausalFamily(WanFamily):
    name = "wan-causal"
    summary = "Wan 2.1 T2V as a block-causal student (Self-Forcing rollout, KV cache); same weights as wan"
    causal = True
    context_parallel = False  # its block-causal attention (block_causal.py) is not diffusers' context-parallel one

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
                     ) -> torch.Tensor:
        """As ``wan``'s, and also with one timestep per latent frame, ``(B, F)`` (a block-causal pass whose blocks
        sit at different noise levels: ODE initialisation, teacher forcing), expanded to Wan's per-token layout."""
        if timesteps.ndim == 2:
            b, _, f, h, w = x_t.shape
            if timesteps.shape != (b, f):
                raise ValueError(f"per-frame timesteps must be (batch, frames) = {(b, f)}, got "
                                 f"{tuple(timesteps.shape)}")
            tokens = self.block_causal(network).tokens_per_frame(x_t)
            with self._autocast(x_t.device):
                return network(hidden_states=x_t, timestep=frame_timesteps(timesteps, tokens),
                               encoder_hidden_states=cond, return_dict=False)[0]
        return super().predict_flow(network, x_t, timesteps, cond)

    def load_network(self, model_path: str, *, dtype: torch.dtype) -> torch.nn.Module:
        network = super().load_network(model_path, dtype=dtype)
        network.block_causal = BlockCausalWan(network)  # a plain attribute: not a submodule, nothing saved
        return network

    @staticmethod
    def block_causal(network: torch.nn.Module) -> BlockCausalWan:
        """The causal switch of ``network`` (the bare module or its DDP wrapper)."""
        bare = getattr(network, "module", network)
        switch = getattr(bare, "block_causal", None)
        if switch is None:
            raise ValueError("this network was not loaded by the wan-causal family (no block-causal switch)")
        return switch


@hookimpl
def register_model_families(register):
    register(WanCausalFamily)
