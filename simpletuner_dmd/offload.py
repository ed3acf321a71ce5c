"""Activation offload: the tensors autograd saves for a backward pass, kept in (pinned) CPU memory instead of on the
GPU, and brought back when the backward needs them.

With gradient checkpointing, what a network's forward saves is each checkpointed block's input (the blocks'
insides are recomputed in the backward): ``tokens × hidden × blocks`` values, the largest part of a DMD step's memory
on a large model at video resolution (``simpletuner-dmd estimate`` shows it). Parameters and their views (the
weights a matmul saves), tensor subclasses (optimum-quanto's int8 weights) and small tensors stay where they are:
moving them would cost transfers and save nothing.

The values are copied, never changed: gradients are bit-identical with and without it (``tests/test_offload.py``).
On a GPU the copies to the CPU are issued without blocking (from pinned memory) and overlap the forward; the copies
back happen as the backward reaches each tensor.
"""

from __future__ import annotations

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors stay put: their transfers would cost more than they save


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """``with ActivationOffload(): loss = forward(...)`` — the graph built inside keeps its large saved activations
    on the CPU; ``loss.backward()`` may run outside the block. ``offloaded_bytes`` counts what was moved (or, on a
    CPU-only run, what would be)."""

    def __init__(self, *, min_bytes: int = MIN_BYTES):
        self.offloaded_bytes = 0
        pin = torch.cuda.is_available()

        def pack(tensor: torch.Tensor):
            size = tensor.numel() * tensor.element_size()
            if (size < min_bytes or isinstance(tensor, torch.nn.Parameter)
                    or isinstance(tensor._base, torch.nn.Parameter) or type(tensor) is not torch.Tensor):
                return (None, tensor)
            self.offloaded_bytes += size
            if tensor.device.type == "cpu":
                return (None, tensor)  # already there: the same path, nothing to move
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
            host.copy_(tensor, non_blocking=pin)
            return (tensor.device, host)

        def unpack(packed):
            device, tensor = packed
            return tensor if device is None else tensor.to(device, non_blocking=True)

        super().__init__(pack, unpack)


__all__ = ["ActivationOffload", "MIN_BYTES"]
