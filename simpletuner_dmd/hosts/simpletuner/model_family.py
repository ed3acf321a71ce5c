"""The family that serves any flow-matching SimpleTuner model through SimpleTuner's own model object.

SimpleTuner trains about forty model families; each has a model object (``ImageModelFoundation`` subclass) whose
``model_predict(prepared_batch)`` runs its network on a prepared batch and whose ``prediction_to_noiseward_flow``
turns the prediction into the noise-ward flow ``v = ε − x0`` this package's methods use. ``SimpleTunerModelFamily``
drives that object, so every method of the plugin runs on a SimpleTuner family that no plugin family declares (Flux,
Qwen-Image, LTX-Video, Wan image-to-video, …) without a line of family-specific code:

- **the condition** is the prepared batch itself, less the entries that describe one network call (``noisy_latents``,
  ``timesteps``, ``sigmas``, the noise, the targets — ``PER_CALL``): text embeddings, pooled embeddings, attention
  masks, image or video conditioning latents and embeddings, and the clean ``latents`` that some families condition on
  (Wan image-to-video takes its first frame from them when no conditioning frame is given) all travel with it.
- **a network call** (``predict_flow``) is ``model_predict`` on that condition with the method's latents as
  ``noisy_latents`` and its timesteps as ``timesteps`` (``t = 1000·σ``, SimpleTuner's scale) and ``sigmas``;
  the network the method names is the one SimpleTuner's model object calls (the student's network with the adapters
  the method switched on or off: the teacher is the base with every adapter off, the fake score a second adapter).
- **the negative prompt** is SimpleTuner's ``encode_text_batch([text], is_negative_prompt=True)``, encoded once at
  set-up, in the batch's layout (``text_condition``: the entries SimpleTuner's collate and ``prepare_batch`` make of
  a text embedding). A text-only condition borrows every other entry (the image conditioning, the clean latents) from
  the condition it is batched with (``concat_conditions``): CFG's unconditional half keeps the sample's image.
- **latents** are ``(B, C, F, H, W)`` as every method expects; an image family's 4-D latents get a frame axis of 1 on
  the way in and lose it on the way out.

Nothing here imports SimpleTuner: the family talks to the model object by duck typing, bound by the bridge with
``bind_simpletuner_model`` before any call. It serves ``model_type: lora`` (the student, the teacher and the fake
score share the one network SimpleTuner's model object calls).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ...errors import UserError
from ...family_base import FamilyBase
from ...families.common import autocast, lora_metadata
from ...hookspecs import hookimpl

PER_CALL = frozenset({
    "noisy_latents", "noise", "input_noise", "sigmas", "timesteps", "target", "flow_target", "model_prediction",
    "twinflow_time_sign", "scheduled_sampling_plan", "i2v_conditioning_mask",
})
"""Prepared-batch entries that describe one network call (its noisy input, its timestep, its noise and target) rather
than the sample: the family sets the first three per call and drops the rest."""

TEXT_ENTRIES = frozenset({
    "prompt_embeds", "encoder_hidden_states", "add_text_embeds", "added_cond_kwargs", "encoder_attention_mask",
    "batch_time_ids", "text_encoder_output", "t5xxl_ids", "t5xxl_weights", "prompts",
})
"""The entries SimpleTuner makes of a text embedding (collate, then ``prepare_batch``): what a negative prompt's
condition replaces; every other entry is the sample's."""


@dataclass
class SimpleTunerCondition:
    """A batch of conditions in SimpleTuner's prepared-batch layout. ``entries`` maps batch keys to values whose
    first axis is the batch (``rows``); ``text_only`` marks an encoded text (the negative prompt) that takes its
    other entries from the condition it is concatenated with."""

    entries: dict[str, Any]
    rows: int
    text_only: bool = False
    images: bool = field(default=False)  # SimpleTuner's latents are (B, C, H, W): no frame axis

    def __repr__(self) -> str:  # the entries are tensors: show their keys and shapes only
        shapes = {k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for k, v in self.entries.items()}
        return f"SimpleTunerCondition(rows={self.rows}, text_only={self.text_only}, {shapes})"


def _join(values: list[Any], rows: list[int], key: str) -> Any:
    """One entry (``key``) of several conditions joined along the batch: tensors (and lists) of one row per sample are
    concatenated, mappings entry by entry; anything else (a flag, a string naming the conditioning type, a tensor that
    is not per sample) is the first condition's."""
    first = values[0]
    if all(v is None for v in values):
        return None
    if isinstance(first, Mapping):
        return {k: _join([v.get(k) if isinstance(v, Mapping) else None for v in values], rows, f"{key}.{k}")
                for k in first}
    if torch.is_tensor(first) and all(torch.is_tensor(v) and v.ndim and v.shape[0] == r for v, r in zip(values, rows)):
        if len({v.shape[1:] for v in values}) > 1:
            raise ValueError(f"condition entry {key}: shapes {[tuple(v.shape) for v in values]} cannot be batched")
        return torch.cat(values, dim=0)
    if isinstance(first, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == r
                                                 for v, r in zip(values, rows)):
        return [item for v in values for item in v]
    return first


def _repeat(value: Any, rows: int, times: int) -> Any:
    if isinstance(value, Mapping):
        return {k: _repeat(v, rows, times) for k, v in value.items()}
    if torch.is_tensor(value) and value.ndim and value.shape[0] == rows:
        return value.repeat_interleave(times, dim=0) if rows > 1 else value.expand(times, *value.shape[1:])
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return [item for item in value for _ in range(times)]
    return value


def _as_rows(tensor: Any) -> Any:
    """One sample's encoded-text tensor as SimpleTuner's collate batches it (``compute_prompt_embeddings``): 1-D and
    2-D entries are stacked (a new batch axis: an ``(L, D)`` embedding, but also a ``(1, L)`` mask, which becomes
    ``(1, 1, L)``), 3-D ones concatenated (they carry their batch axis)."""
    if torch.is_tensor(tensor) and tensor.ndim in (1, 2):
        return tensor.unsqueeze(0)
    return tensor


class SimpleTunerModelFamily(FamilyBase):
    name = "simpletuner-model"
    summary = ("any flow-matching SimpleTuner model family no plugin family declares (Flux, Qwen-Image, LTX-Video, "
               "Wan image-to-video, ...), through SimpleTuner's own model_predict; inside SimpleTuner only")
    causal = False
    video = True
    simpletuner_fallback = True
    # SimpleTuner's `wan` flavours that condition on an image: the plugin's `wan` family (text-to-video, 16 input
    # channels) would be picked by name for them.
    simpletuner_names = tuple(("wan", flavour) for flavour in (
        "i2v-14b-2.1", "i2v-14b-2.1-720p", "i2v-14b-2.2-high", "i2v-14b-2.2-low", "flf2v-14b-2.1"))

    def __init__(self, autocast_dtype: torch.dtype | None = None) -> None:
        self.autocast_dtype = autocast_dtype
        self.model: Any = None  # SimpleTuner's model object, bound by the bridge

    @staticmethod
    def config_problems(host: dict) -> list[str]:
        """The reference host loads models itself; this family calls SimpleTuner's model object."""
        return ["model_family simpletuner-model serves SimpleTuner's own model objects, inside SimpleTuner only "
                "(set model_family as SimpleTuner names it there); this host loads wan, sd3 and the other families "
                "`simpletuner-dmd plugins` lists"]

    def load_network(self, model_path: str, *, dtype: torch.dtype) -> torch.nn.Module:
        """A separate copy of the network (``model_type: full``'s frozen teacher) is not built on this route yet."""
        raise UserError("model_type full: the simpletuner-model route (SimpleTuner's own model_predict) serves "
                        "model_type lora; a full student needs a separate frozen teacher it cannot load yet")

    # ------------------------------------------------------------------ the bridge's side

    def bind_simpletuner_model(self, model: Any) -> None:
        """The bridge hands over SimpleTuner's model object before any call (``PluginDistiller.__init__``)."""
        self.model = model

    def _bound(self) -> Any:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} is used before the bridge bound SimpleTuner's model object")
        return self.model

    def from_simpletuner_batch(self, prepared_batch: Mapping[str, Any]) -> tuple[torch.Tensor, SimpleTunerCondition]:
        latents = prepared_batch["latents"]
        images = latents.ndim == 4
        entries = {k: v for k, v in prepared_batch.items() if k not in PER_CALL}
        cond = SimpleTunerCondition(entries, rows=latents.shape[0], images=images)
        return (latents.unsqueeze(2) if images else latents), cond

    def from_simpletuner_text(self, encoded: Any) -> SimpleTunerCondition:
        """``encode_text_batch([text])``'s output (the model's text-embed-cache format) → the entries SimpleTuner's
        collate (``compute_prompt_embeddings``, or the model's own ``collate_prompt_embeds``) and ``prepare_batch``
        make of it for one sample."""
        model = self._bound()
        collated = model.collate_prompt_embeds([encoded]) if hasattr(model, "collate_prompt_embeds") else {}
        if not collated:
            if not isinstance(encoded, Mapping):
                raise UserError(f"SimpleTuner's {type(model).__name__}.encode_text_batch returned a "
                                f"{type(encoded).__name__}; the generic family reads its text-embed-cache mapping")
            collated = {}
            for source, target in (("prompt_embeds", "prompt_embeds"), ("pooled_prompt_embeds", "pooled_prompt_embeds"),
                                   ("attention_mask", "attention_masks"), ("prompt_attention_mask", "attention_masks"),
                                   ("attention_masks", "attention_masks"), ("time_ids", "time_ids")):
                if encoded.get(source) is not None:
                    collated[target] = _as_rows(encoded[source])
        entries: dict[str, Any] = {"text_encoder_output": collated}
        if collated.get("prompt_embeds") is not None:
            entries["prompt_embeds"] = entries["encoder_hidden_states"] = collated["prompt_embeds"]
        added: dict[str, Any] = {}
        if collated.get("pooled_prompt_embeds") is not None:
            entries["add_text_embeds"] = added["text_embeds"] = collated["pooled_prompt_embeds"]
        if collated.get("batch_time_ids") is not None or collated.get("time_ids") is not None:
            entries["batch_time_ids"] = added["time_ids"] = collated.get("batch_time_ids", collated.get("time_ids"))
        if collated.get("attention_masks") is not None:
            entries["encoder_attention_mask"] = collated["attention_masks"]
        entries["added_cond_kwargs"] = added
        return SimpleTunerCondition(entries, rows=1, text_only=True)

    # ------------------------------------------------------------------ ModelFamily

    def predict_flow(self, network: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                     cond: SimpleTunerCondition) -> torch.Tensor:
        if timesteps.ndim != 1 or timesteps.shape[0] != x_t.shape[0]:
            raise ValueError(f"one timestep per sample expected, got {tuple(timesteps.shape)} for {tuple(x_t.shape)}")
        if cond.rows != x_t.shape[0]:
            raise ValueError(f"a condition of {cond.rows} rows for {x_t.shape[0]} samples")
        model = self._bound()
        x = x_t.squeeze(2) if cond.images else x_t
        batch = dict(cond.entries)
        batch.setdefault("latents", x)  # an encoded text alone: SimpleTuner reads the batch's shape from it
        batch["noisy_latents"] = x
        batch["timesteps"] = timesteps
        batch["sigmas"] = timesteps.float() / 1000.0
        with self._calling(model, network), autocast(self.autocast_dtype, x_t.device):
            prediction = model.model_predict(batch)["model_prediction"]
        # SimpleTuner 3.x has no direction helper: every flow-matching family there predicts the noise-ward flow
        to_flow = getattr(model, "prediction_to_noiseward_flow", None)
        flow = prediction if to_flow is None else to_flow(prediction)
        return flow.unsqueeze(2) if cond.images else flow

    @contextlib.contextmanager
    def _calling(self, model: Any, network: torch.nn.Module) -> Iterator[None]:
        """SimpleTuner's ``model_predict`` calls ``model.model``: the network the method names is that module (bare or
        wrapped for DDP) — or, for a separate copy, put in its place for the call."""
        current = model.model
        if network is current or network is model.get_trained_component() or network is getattr(current, "module",
                                                                                                  None):
            yield
            return
        model.model = network
        try:
            yield
        finally:  # not a handler: SimpleTuner's network goes back whatever happened
            model.model = current

    def frame_axis(self) -> int:
        return 2

    def concat_conditions(self, conds: list[SimpleTunerCondition]) -> SimpleTunerCondition:
        full = next((c for c in conds if not c.text_only), None)
        parts = []
        for c in conds:
            if c.text_only and full is not None:
                if c.rows != full.rows:
                    raise ValueError(f"an encoded text of {c.rows} rows batched with a condition of {full.rows}")
                c = SimpleTunerCondition({**{k: v for k, v in full.entries.items() if k not in TEXT_ENTRIES},
                                          **c.entries}, rows=c.rows, images=full.images)
            parts.append(c)
        rows = [c.rows for c in parts]
        keys = list(dict.fromkeys(k for c in parts for k in c.entries))
        entries = {k: _join([c.entries.get(k) for c in parts], rows, k) for k in keys}
        return SimpleTunerCondition(entries, rows=sum(rows), text_only=full is None,
                                    images=parts[0].images if full is None else full.images)

    def repeat_condition(self, cond: SimpleTunerCondition, batch_size: int) -> SimpleTunerCondition:
        if batch_size % cond.rows:
            raise ValueError(f"a condition of {cond.rows} rows cannot be repeated to {batch_size}")
        times = batch_size // cond.rows
        return SimpleTunerCondition({k: _repeat(v, cond.rows, times) for k, v in cond.entries.items()},
                                    rows=batch_size, text_only=cond.text_only, images=cond.images)

    def save_lora(self, lora_state: dict[str, torch.Tensor], folder: Path, peft_config: Any) -> Path:
        """A method's own adapter (DCM's detail adapter) in the layout the family's stock pipeline loads, written by
        that pipeline's ``save_lora_weights`` (SimpleTuner's model object names the pipeline class)."""
        pipeline = self._pipeline_class()
        pipeline.save_lora_weights(str(folder), transformer_lora_layers=lora_state,
                                   transformer_lora_adapter_metadata=lora_metadata(peft_config))
        return Path(folder) / "pytorch_lora_weights.safetensors"

    def lora_pipeline(self) -> Any:
        """The pipeline class that reads a LoRA file for the network (``teacher_loras``): the model object's."""
        return self._pipeline_class()

    def _pipeline_class(self) -> Any:
        model = self._bound()
        classes = getattr(model, "PIPELINE_CLASSES", None) or {}
        for pipeline in classes.values():
            if hasattr(pipeline, "save_lora_weights"):
                return pipeline
        raise UserError(f"SimpleTuner's {type(model).__name__} names no pipeline that saves LoRA weights")


@hookimpl
def register_model_families(register):
    register(SimpleTunerModelFamily)


__all__ = ["PER_CALL", "SimpleTunerCondition", "SimpleTunerModelFamily", "TEXT_ENTRIES"]
