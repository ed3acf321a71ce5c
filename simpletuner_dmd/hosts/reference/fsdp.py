"""FSDP2 in the reference host (``fsdp_enable: true``, ``fsdp_version: 2``): the frozen base sharded across processes,
the adapters replicated.

What is sharded: the frozen base's weights, with torch's ``fully_shard`` (FSDP2) on a one-dimensional device mesh of
every process — each transformer block (the classes the model names in ``_no_split_modules``, as accelerate's FSDP2
auto-wrap does) and then the root, so a process holds ``1/N`` of the base and gathers one block at a time in the
forward and again in the backward (``reshard_after_forward``).

What is not: every trainable parameter — the student's LoRA and the method's adapters on the same base (DMD's fake
score) — is left out of the sharding (``ignored_params``). They stay ordinary tensors, replicated on every process
like under DDP, so each optimizer (the student's, and the one a method makes in ``distill_setup``) keeps pointing at
the parameters it was built on, and a checkpoint holds them whole, as today: a 2-process checkpoint resumes on 1
process. Sharding happens after ``distill_setup`` (every adapter exists then) and replaces only the frozen base's
parameters, which no optimizer holds.

``ReplicatedAdapters`` stands where accelerate's DDP wrapper stood: it starts the adapters equal on every process (a
broadcast from process 0, as DDP does) and averages their gradients over the processes at the backward that DDP
would synchronise (``no_sync``, which ``accelerator.accumulate`` and a method's micro-batch loop use, skips it).
With context parallelism (``context_parallel.py``) the same wrapper stands over the unsharded base too, and sums the
gradients over each context-parallel group before averaging over the groups.

Every call of the sharded base needs every process (each gathers a block from the others), so what used to run on
the main process alone — validation, the FD report — runs on every process with this module (the main process writes).
With one process there is nothing to shard: the run is the single-process run (a warning says so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def fsdp_problems(host: dict[str, Any]) -> list[str]:
    """What ``fsdp_enable`` cannot run with, one line each (``validate-config``). (The teacher's ODE pairs of a
    method's regression term are refused later, by ``pair_source``, only when they would be generated from the
    sharded base: set ``regression_latent_shape`` and they are made at set-up, before the base is sharded.)"""
    if not host.get("fsdp_enable"):
        return []
    problems = []
    if host.get("base_model_precision") == "int8-quanto":
        problems.append("config.fsdp_enable: cannot shard an int8-quanto base (optimum-quanto's int8 tensors are not "
                        "DTensors); set base_model_precision: no_change (bf16 on a GPU) or fsdp_enable: false")
    if host.get("model_type") != "lora":
        problems.append("config.fsdp_enable: needs model_type lora (FSDP2 here shards the frozen base under the "
                        "adapters; a full student has no frozen base)")
    return problems


def fsdp_warning(host: dict[str, Any], num_processes: int) -> str | None:
    if host.get("fsdp_enable") and num_processes == 1:
        return ("fsdp_enable: one process, nothing to shard; this run is the single-process run (launch with "
                "accelerate launch --num_processes N to shard the base N ways)")
    return None


def sharding(host: dict[str, Any], accelerator: Any) -> bool:
    """Whether this run shards its base: ``fsdp_enable`` with several processes."""
    return bool(host.get("fsdp_enable")) and accelerator.num_processes > 1


def block_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The units sharded one by one before the root: the modules of the classes the model names in
    ``_no_split_modules`` (diffusers' ``WanTransformer3DModel``: its ``WanTransformerBlock``s)."""
    names = set(getattr(network, "_no_split_modules", None) or ())
    return [m for m in network.modules() if m is not network and type(m).__name__ in names]


def shard_frozen_base(network: torch.nn.Module, accelerator: Any, data_parallel_size: int | None = None
                      ) -> ReplicatedAdapters:
    """Shard ``network``'s frozen parameters in place over every process (blocks, then the root) and return the
    wrapper the training passes call. Call it after every adapter exists and before the base is called again.
    ``data_parallel_size``: see ``ReplicatedAdapters`` (default: every process is its own group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in network.parameters() if p.requires_grad}
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for block in block_modules(network):
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(network, mesh=mesh, ignored_params=trainable)
    return ReplicatedAdapters(network, trainable_parameters(network), data_parallel_size)


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in network.parameters() if p.requires_grad]


class ReplicatedAdapters(torch.nn.Module):
    """The base (sharded by FSDP2, or split by context parallelism, or both) with its replicated adapters, as the
    training passes call it (DDP's place: ``.module`` is the bare network; ``no_sync()`` as DDP's).

    At each synchronised backward every trainable parameter's gradient becomes the sum over all processes divided by
    ``data_parallel_size`` (default: the process count, DDP's mean). Under context parallelism of degree C the
    processes of a group hold parts of one sample's gradient: with ``data_parallel_size = W / C`` that is the sum over
    each group averaged over the groups."""

    def __init__(self, module: torch.nn.Module, trainable: list[torch.nn.Parameter],
                 data_parallel_size: int | None = None):
        import torch.distributed as dist

        super().__init__()
        self.module = module
        self.world = dist.get_world_size()
        self.divisor = data_parallel_size or self.world
        self._sync = True
        with torch.no_grad():  # equal start on every process (a LoRA's A is drawn from each process's own stream)
            for p in trainable:
                dist.broadcast(p.data, src=0)
        self._hooks = [p.register_post_accumulate_grad_hook(self._average) for p in trainable]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside accumulate gradients locally; the next backward outside averages the sum (as DDP)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _average(self, p: torch.nn.Parameter) -> None:
        # After p.grad has received this backward's contribution: the sum over processes of what each accumulated,
        # divided by the data-parallel degree — DDP's mean without context parallelism (with two processes, halving is
        # exact, so the order of sum and division does not matter).
        if self._sync and p.grad is not None:
            import torch.distributed as dist

            dist.all_reduce(p.grad)
            if self.divisor != 1:
                p.grad.div_(self.divisor)


__all__ = ["ReplicatedAdapters", "block_modules", "fsdp_problems", "fsdp_warning", "shard_frozen_base", "sharding",
           "trainable_parameters"]
