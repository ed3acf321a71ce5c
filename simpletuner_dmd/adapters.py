"""Switching peft adapters on one shared base — exception-safe, and without losing ``requires_grad``.

peft's ``set_adapter``/``enable_adapters`` flip ``requires_grad`` of the adapters they deactivate. Switching between
the student's forward and its ``backward()`` then leaves the student with no gradient and no error; with gradient
checkpointing the recompute in ``backward()`` also runs with whatever adapter is active at that time. So every switch
here is a context: inside it the named adapter (or none) is active; on exit — also on an exception — the previous
active adapter, the enabled flag and every adapter weight's ``requires_grad`` are restored. Run a network's backward
inside the same context as its forward.
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
        self.model = model

    def adapter_names(self) -> set[str]:
        names: set[str] = set()
        for layer in self.layers:
            names.update(layer.lora_A.keys() if hasattr(layer, "lora_A") else [])
        return names

    def _snapshot(self):
        active = [list(layer.active_adapters) for layer in self.layers]
        disabled = [layer.disable_adapters for layer in self.layers]
        grads = [(p, p.requires_grad) for layer in self.layers for p in _adapter_params(layer)]
        return active, disabled, grads

    def _restore(self, snapshot) -> None:
        active, disabled, grads = snapshot
        for layer, names, was_disabled in zip(self.layers, active, disabled):
            layer.enable_adapters(True)
            layer.set_adapter(names)
            if was_disabled:
                layer.enable_adapters(False)
        for p, flag in grads:
            p.requires_grad_(flag)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Only adapter ``name`` is active (and trainable) inside."""
        snapshot = self._snapshot()
        try:
            for layer in self.layers:
                layer.enable_adapters(True)
                layer.set_adapter(name)
            yield
        finally:
            self._restore(snapshot)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Every adapter is off inside: the network is the frozen base (the teacher)."""
        snapshot = self._snapshot()
        try:
            for layer in self.layers:
                layer.enable_adapters(False)
            yield
        finally:
            self._restore(snapshot)


def _adapter_params(layer: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    for attr in layer.adapter_layer_names:
        for sub in getattr(layer, attr).values():
            yield from sub.parameters() if isinstance(sub, torch.nn.Module) else [sub]


def adapter_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``name`` (peft names them ``….lora_A.<name>.weight``)."""
    marker = f".{name}."
    return [p for n, p in model.named_parameters() if marker in n and (".lora_" in n)]
