"""Switching peft adapters on one shared base — exception-safe, and without touching ``requires_grad``.

peft's ``set_adapter``/``enable_adapters`` flip ``requires_grad`` of the adapters they deactivate. Switching between
the student's forward and its ``backward()`` then leaves the student with no gradient and no error; they also walk every
adapter weight, which made a switch cost as much as a small forward pass (measured by ``benchmarks/step_cost.py``).
So a switch here only changes *which* adapter a LoRA layer's forward uses — each layer's active-adapter list and its
disabled flag — and restores both on exit, also on an exception. Every adapter stays trainable; what isolates them is
that each network's forward runs inside its own context (under ``no_grad`` where it must not learn) and that each
optimizer holds only its own adapter's weights. With gradient checkpointing the recompute in ``backward()`` runs with
whatever adapter is active at that time, so run a network's backward inside the same context as its forward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class AdapterSwitch:
    """Context managers over the LoRA layers of one model (found once, at construction)."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError("the model has no peft adapter layers")

    def adapter_names(self) -> set[str]:
        names: set[str] = set()
        for layer in self.layers:
            for attr in layer.adapter_layer_names:
                names.update(getattr(layer, attr).keys())
        return names

    @contextlib.contextmanager
    def _state(self, active: list[str] | None, disabled: bool) -> Iterator[None]:
        # The attributes behind peft's `active_adapters` and `disable_adapters` properties: setting them directly is
        # what keeps requires_grad as it is (see the module docstring). tests/test_dmd_model.py pins the behaviour.
        saved = [(layer._active_adapter, layer._disable_adapters) for layer in self.layers]
        try:
            for layer in self.layers:
                if active is not None:
                    layer._active_adapter = list(active)
                layer._disable_adapters = disabled
            yield
        finally:
            for layer, (names, was_disabled) in zip(self.layers, saved):
                layer._active_adapter = names
                layer._disable_adapters = was_disabled

    def use(self, *names: str):
        """Only the adapters ``names`` act inside (several: their LoRA deltas add up, e.g. DCM's detail expert on top of
        its semantic expert)."""
        unknown = [n for n in names if n not in self.adapter_names()]
        if not names or unknown:
            raise KeyError(f"no adapter named {unknown!r}; the model has {sorted(self.adapter_names())}")
        return self._state(list(names), False)

    def disabled(self):
        """No adapter acts inside: the network is the frozen base (the teacher)."""
        return self._state(None, True)


def named_adapter_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter ``name`` by their full names (peft names them ``….lora_A.<name>.weight``)."""
    marker = f".{name}."
    return {n: p for n, p in model.named_parameters() if marker in n and ".lora_" in n}


def adapter_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``name``."""
    return list(named_adapter_parameters(model, name).values())


def add_adapter_beside(model: torch.nn.Module, existing: str, name: str, rank: int | None
                       ) -> list[torch.nn.Parameter]:
    """A new LoRA adapter ``name`` on ``model``'s base beside adapter ``existing`` (B = 0: it starts as a no-op), with
    the same target modules and the same alpha/rank scale, trainable weights in fp32. ``existing`` stays the active
    adapter and both stay trainable (each network's own context and optimizer isolate them). Returns the new
    adapter's parameters. (DMD's fake score, DCM's detail expert.)"""
    import warnings

    from peft import LoraConfig

    existing_cfg = model.peft_config[existing]
    rank = rank or existing_cfg.r
    alpha = existing_cfg.lora_alpha * rank / existing_cfg.r
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, lora_dropout=0.0,
                       target_modules=sorted(existing_cfg.target_modules)),
            adapter_name=name,
        )
    model.set_adapter(existing)  # diffusers' add_adapter activates the new adapter
    params = adapter_parameters(model, name)
    for p in params:
        p.data = p.data.float()  # like the student's: trainable weights in fp32, compute in the autocast dtype
    for p in params + adapter_parameters(model, existing):
        p.requires_grad_(True)
    return params
