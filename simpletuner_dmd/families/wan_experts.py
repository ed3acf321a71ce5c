"""The ``wan2.2`` family: Wan 2.2 A14B, a denoiser of two experts switched at a boundary timestep.

diffusers' ``WanPipeline`` for A14B carries ``transformer`` (the high-noise expert) and ``transformer_2`` (the low-noise
expert) and a ``boundary_ratio`` in its config: a step at timestep ``t`` runs ``transformer`` when
``t >= boundary_ratio · num_train_timesteps`` and ``transformer_2`` otherwise. Here both experts live in one module,
``WanExperts``, whose forward routes *each sample* of a batch by that same rule. Everything a method does therefore
crosses the boundary correctly without knowing there is one: the student's exit step, the critic's timestep and the
teacher's CFG pair each run the expert their own timestep selects, even when they fall on different sides.

Adapters: the student is one peft adapter over both experts' attention projections (one LoRA per expert, trained
together), and DMD's fake score is a second adapter over both; the teacher is the two frozen (optionally int8) experts
with every adapter off. So each expert's fake score is an adapter on that expert's own frozen base, and only the frozen
weights of both experts (not a second or third copy) are in memory. A batch whose samples all fall on one side runs one
expert; a batch split by the boundary runs the two sub-batches one after the other, so only one expert's activations
are live at a time except where both halves keep a graph for the backward.

Exports, one file per expert, so that each can be loaded and weighted on its own:

- ``pytorch_lora_weights.safetensors``: the high-noise expert (``transformer``), which a plain
  ``pipe.load_lora_weights(folder)`` loads;
- ``pytorch_lora_weights_transformer_2.safetensors``: the low-noise expert, which
  ``pipe.load_lora_weights(folder, weight_name=…, load_into_transformer_2=True)`` loads into ``transformer_2``;
- the original (ComfyUI) layout as two files, ``…_high_noise.safetensors`` and ``…_low_noise.safetensors``, as the
  published Wan 2.2 LoRAs are distributed.

Not here: DMD2's GAN term and DCM's discriminator read one expert's features and are refused by name; ``model_type:
full`` (two full 14B students) is refused; the image-to-video variants (A14B I2V) are not built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

from ..errors import UserError
from ..hookspecs import hookimpl
from ..lora_files import MAIN_FILE, read_lora
from .common import load_part, lora_metadata
from .wan import WAN21_14B, WanFamily
from .wan_tiny import make_tiny_wan

EXPERTS = ("transformer", "transformer_2")  # high noise first, as WanPipeline names them
SECOND_FILE = "pytorch_lora_weights_transformer_2.safetensors"
EXPERT_FILES = dict(zip(EXPERTS, (MAIN_FILE, SECOND_FILE)))  # each expert's diffusers-layout LoRA file
ORIGINAL_TAGS = {"transformer": "high_noise", "transformer_2": "low_noise"}

# Wan 2.2 T2V-A14B: each expert has Wan 2.1 14B's transformer config; the boundary of its model_index.json.
PUBLISHED_CONFIGS = {"Wan-AI/Wan2.2-T2V-A14B-Diffusers": {**WAN21_14B, "boundary_ratio": 0.875}}


class WanExperts(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Two ``WanTransformer3DModel`` experts as one network: ``forward`` sends each sample to ``transformer`` when its
    timestep is ``>= boundary_ratio · 1000`` and to ``transformer_2`` otherwise (``WanPipeline``'s rule)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, boundary_ratio: float = 0.875):
        super().__init__()
        self.transformer: torch.nn.Module | None = None
        self.transformer_2: torch.nn.Module | None = None

    @classmethod
    def of(cls, high: torch.nn.Module, low: torch.nn.Module, boundary_ratio: float) -> "WanExperts":
        experts = cls(boundary_ratio=float(boundary_ratio))
        experts.transformer, experts.transformer_2 = high, low
        return experts

    @property
    def boundary_timestep(self) -> float:
        return float(self.config.boundary_ratio) * 1000.0

    def expert_of(self, timestep: float) -> str:
        """``"transformer"`` or ``"transformer_2"``: the expert a step at ``timestep`` runs."""
        return EXPERTS[0] if timestep >= self.boundary_timestep else EXPERTS[1]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        if kwargs:
            raise TypeError(f"WanExperts.forward takes no {sorted(kwargs)}")
        if timestep.ndim != 1 or timestep.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"the experts are chosen per sample: one timestep per sample expected, got "
                             f"{tuple(timestep.shape)}")
        high = timestep >= self.boundary_timestep
        if bool(high.all()) or not bool(high.any()):
            expert = self.transformer if bool(high.all()) else self.transformer_2
            return (expert(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           return_dict=False)[0],)
        outputs, order = [], []
        for expert, rows in ((self.transformer, high.nonzero().squeeze(1)), (self.transformer_2,
                                                                            (~high).nonzero().squeeze(1))):
            outputs.append(expert(hidden_states=hidden_states[rows], timestep=timestep[rows],
                                  encoder_hidden_states=encoder_hidden_states[rows], return_dict=False)[0])
            order.append(rows)
        return (torch.cat(outputs)[torch.argsort(torch.cat(order))],)


def split_by_expert(lora_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"transformer.blocks.0…": w, "transformer_2.blocks.0…": w}`` → ``{"transformer": {"blocks.0…": w}, …}``;
    a key of neither expert raises ``ValueError``."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPERTS}
    for key, tensor in lora_state.items():
        expert, _, rest = key.partition(".")
        if expert not in parts or not rest:
            raise ValueError(f"{key}: not an adapter weight of transformer or transformer_2")
        parts[expert][rest] = tensor
    return parts


class WanExpertsFamily(WanFamily):
    name = "wan2.2"
    summary = "Wan 2.2 T2V-A14B: two experts (high/low noise) switched at boundary_ratio, one LoRA per expert"
    causal = False
    routes_by_timestep = True  # one call may run different sub-networks: methods that read features must refuse it
    context_parallel = False  # WanExperts (two networks behind one call) has no _cp_plan of its own
    active_parameter_share = 0.5  # a call runs one expert of two (`estimate`'s step time scales with it)
    published_configs = PUBLISHED_CONFIGS
    gan_feature_module = None  # the GAN classifier would read one expert's features only: not offered
    lora_parts = {expert: f"{expert}." for expert in EXPERTS}  # a teacher LoRA per expert (`into`)
    card_notes = ("In ComfyUI, as with every Wan 2.2 A14B LoRA pair: the `high_noise` file goes on the high-noise "
                  "model and the `low_noise` file on the low-noise model; switch models at the first σ below "
                  "boundary_ratio (the σ list above says which steps fall on each side).",)

    boundary_override: float | None = None  # the host's boundary_ratio (configure), else the model's

    def configure(self, host: dict) -> None:
        """The reference host's ``boundary_ratio`` (None: the model's ``model_index.json``)."""
        self.boundary_override = host.get("boundary_ratio")

    def load_network(self, model_path: str, *, dtype: torch.dtype) -> WanExperts:
        """Both experts, switched at the host's ``boundary_ratio`` when given, else at the model's; the family
        keeps the ratio (``boundary_ratio``) for the teacher's guidance per expert and the model card."""
        from diffusers import WanTransformer3DModel

        ratio = boundary_ratio(model_path) if self.boundary_override is None else float(self.boundary_override)
        high = load_part(WanTransformer3DModel, model_path, "transformer", dtype, "Wan 2.2 A14B pipeline")
        low = load_part(WanTransformer3DModel, model_path, "transformer_2", dtype, "Wan 2.2 A14B pipeline")
        self.boundary_ratio = ratio
        return WanExperts.of(high, low, ratio)

    def expert_guidance(self, scale: float, scale_2: float, t: torch.Tensor) -> torch.Tensor:
        """Each sample's CFG scale: ``scale`` where ``transformer`` (high noise) runs, ``t >= boundary_ratio · 1000``
        (``WanExperts``' rule), ``scale_2`` where ``transformer_2`` runs (``WanPipeline``'s ``guidance_scale`` and
        ``guidance_scale_2``)."""
        if self.boundary_ratio is None:
            raise RuntimeError("wan2.2: expert_guidance before load_network read the experts' boundary_ratio")
        high = t >= float(self.boundary_ratio) * 1000.0
        return torch.where(high, torch.full_like(t, scale, dtype=torch.float32),
                           torch.full_like(t, scale_2, dtype=torch.float32))

    def pipeline_setup_code(self) -> list[str]:
        """The model card's line that gives the stock ``WanPipeline`` the boundary the student was trained with."""
        return [f"pipe.register_to_config(boundary_ratio={self.boundary_ratio!r})  # where the experts switch, as "
                f"in training"]

    @staticmethod
    def config_problems(host: dict) -> list[str]:
        if host.get("model_type") == "full":
            return ["config.model_type: full is not supported by the wan2.2 family (two full 14B students); use lora"]
        return []

    @staticmethod
    def meta_network(transformer_config: dict) -> torch.nn.Module:
        """Both experts on the ``meta`` device (``estimate`` counts their parameters: twice one expert's)."""
        config = {k: v for k, v in transformer_config.items() if k != "boundary_ratio"}
        high, low = WanFamily.meta_network(config), WanFamily.meta_network(config)
        with torch.device("meta"):
            return WanExperts.of(high, low, transformer_config.get("boundary_ratio", 0.875))

    @staticmethod
    def make_tiny(path: str | Path, *, seed: int = 0) -> Path:
        """A tiny two-expert ``WanPipeline`` (the tiny Wan 2.1 parts, a second transformer drawn from another seed,
        ``boundary_ratio`` 0.875 as T2V-A14B), saved to ``path``."""
        return make_tiny_wan(path, seed=seed, second_transformer_seed=seed + 1, boundary_ratio=0.875)

    # ----------------------------------------------------------------------- LoRA files, one per expert

    def save_lora(self, lora_state: dict[str, torch.Tensor], folder: Path, peft_config: Any) -> Path:
        """Two diffusers files (module docstring); returns the high-noise expert's."""
        from diffusers import WanPipeline

        metadata = lora_metadata(peft_config)
        parts = split_by_expert(lora_state)
        for expert, weight_name in EXPERT_FILES.items():
            WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=parts[expert], weight_name=weight_name,
                                          transformer_lora_adapter_metadata=metadata)
        return Path(folder) / MAIN_FILE

    def read_lora(self, folder: Path) -> dict[str, torch.Tensor]:
        """The inverse of ``save_lora``: the peft state of the student adapter over both experts."""
        state: dict[str, torch.Tensor] = {}
        for expert, weight_name in EXPERT_FILES.items():
            file = Path(folder) / weight_name
            if not file.is_file():
                raise UserError(f"{folder}: no {weight_name} (a wan2.2 student has one LoRA file per expert)")
            state.update({f"{expert}.{key}": tensor for key, tensor in read_lora(None, file).items()})
        return state

    def load_lora_into_pipeline(self, pipe: Any, folder: Path, *, adapter_name: str) -> None:
        """Each expert's file into its own transformer of a stock ``WanPipeline`` (``load_into_transformer_2``)."""
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
        pipe.load_lora_weights(str(folder), weight_name=SECOND_FILE, adapter_name=adapter_name,
                               load_into_transformer_2=True)

    def lora_loading_code(self) -> list[str]:
        """The model card's lines that load the student into ``pipe``."""
        return ['pipe.load_lora_weights("path/to/this/folder")  # the high-noise expert (transformer)',
                f'pipe.load_lora_weights("path/to/this/folder", weight_name="{SECOND_FILE}",',
                "                        load_into_transformer_2=True)  # the low-noise expert"]

    def original_lora_state(self, lora_state: dict[str, torch.Tensor], peft_config: Any
                            ) -> dict[str, dict[str, torch.Tensor]]:
        """One original-layout (ComfyUI) state per expert, keyed ``high_noise`` / ``low_noise`` (the export appends
        the key to the file name)."""
        return {ORIGINAL_TAGS[expert]: super(WanExpertsFamily, self).original_lora_state(part, peft_config)
                for expert, part in split_by_expert(lora_state).items()}


def boundary_ratio(model_path: str) -> float:
    """``boundary_ratio`` of a two-expert ``WanPipeline`` folder's ``model_index.json``."""
    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        raise UserError(f"{model_path}: no model_index.json (the wan2.2 family loads a local diffusers Wan 2.2 A14B "
                        f"folder, whose model_index.json carries boundary_ratio)")
    config = json.loads(index.read_text(encoding="utf-8"))
    if config.get("boundary_ratio") is None or config.get("transformer_2") in (None, [None, None]):
        raise UserError(f"{model_path}: not a two-expert Wan 2.2 pipeline (model_index.json needs transformer_2 and "
                        f"boundary_ratio); a one-transformer Wan is the wan family")
    return float(config["boundary_ratio"])


@hookimpl
def register_model_families(register):
    register(WanExpertsFamily)
