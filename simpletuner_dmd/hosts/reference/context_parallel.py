"""Context parallelism in the reference host (``context_parallel_size: C``): one sample's tokens split over C processes.

What is split: the video's latent tokens, through diffusers' context parallelism (Ulysses). The network's class names
where its sequence is cut and put back together (``_cp_plan``; ``WanTransformer3DModel``: the hidden states entering
the first block and the rotary embedding are split along the tokens, the output of ``proj_out`` is gathered);
between those points each process holds 1/C of the tokens, and every self-attention exchanges heads for tokens with
the other processes of its group (an all-to-all), so each process attends over the whole sequence with 1/C of the
heads. Cross-attention to the text runs locally (the text is not split). The gathered output is the whole prediction
on every process of the group, so the loss is the same on each.

One module, every pass: ``enable_context_parallel`` is applied to the frozen base itself, after ``distill_setup``, so
the student (student adapter on), the teacher (adapters off) and the fake score (its adapter on) — calls of that one
module with adapters switched — are all split, forward and backward.

The gradients: each process's backward reaches the parameters only through its own tokens, so the gradient of the
sample is the SUM of the group's gradients (diffusers does not add them). With ``W`` processes in groups of ``C``
(``data-parallel`` degree ``D = W / C``), the adapters' gradients must be summed over a group and averaged over the
``D`` groups: ``ReplicatedAdapters`` (``fsdp.py``) all-reduces the sum over all ``W`` processes and divides by ``D``,
in place of accelerate's DDP (which would divide by ``W``). The same wrapper serves with and without ``fsdp_enable``.

The data: the processes of one group must see the same batch and draw the same noise and timesteps. Ranks
``g·C … g·C + C − 1`` form group ``g`` (``Layout``): batches are dealt by the data-parallel rank ``g`` over ``D``
groups, and each process seeds its random streams with ``seed + g`` (without context parallelism ``g`` is the process
index, as before).

Refused: at ``validate-config`` (``context_parallel_problems``), a family whose network has no ``_cp_plan``
(``FamilyBase.context_parallel``), a full student, what a method cannot run split
(``MethodBase.context_parallel_problems``), and — with the model folder at hand — a degree that does not divide the
attention heads (Ulysses splits them) or the validation sample's latent tokens (diffusers splits them in equal
parts); at launch (``layout``), a process count the degree does not divide; at a call, a batch whose token count the
degree does not divide (one line, before diffusers' assertion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from ...estimate import Parallel, parallel_problems
from .fsdp import ReplicatedAdapters, shard_frozen_base, sharding, trainable_parameters


@dataclass(frozen=True)
class Layout:
    """How this process's run is spread: groups of ``context_parallel`` processes share one sample; this process is in
    group ``data_parallel_rank`` of ``data_parallel_size``."""

    context_parallel: int
    data_parallel_rank: int
    data_parallel_size: int


def context_parallel_size(host: dict[str, Any]) -> int:
    return int(host.get("context_parallel_size") or 1)


def layout(host: dict[str, Any], accelerator: Any) -> Layout:
    """This process's ``Layout``; a process count that ``context_parallel_size`` does not divide is one user error."""
    c, world = context_parallel_size(host), accelerator.num_processes
    if world % c:
        raise UserError(f"context_parallel_size {c} must divide the number of processes ({world}): launch with "
                        f"accelerate launch --num_processes {c}·k, or set context_parallel_size to a divisor of {world}")
    return Layout(c, accelerator.process_index // c, world // c)


def context_parallel_problems(host: dict[str, Any], family_cls: type, method_cls: type | None,
                              method_config: dict[str, Any]) -> list[str]:
    """What ``context_parallel_size`` > 1 cannot run with, one line each (``validate-config``, before any file is
    read; the degree against the model is ``degree_problems``)."""
    c = context_parallel_size(host)
    if c == 1:
        return []
    problems = []
    if not getattr(family_cls, "context_parallel", False):
        problems.append(f"config.context_parallel_size: the {family_cls.name} family's network cannot split its "
                        f"tokens (no diffusers _cp_plan for it here); set context_parallel_size: 1")
    if host.get("model_type") != "lora":
        problems.append("config.context_parallel_size: needs model_type lora (the student, the teacher and the fake "
                        "score must be one base module with adapters, which is the module split)")
    if method_cls is not None:
        problems += [f"config.context_parallel_size: {p}" for p in method_cls.context_parallel_problems(method_config)]
    return problems


def degree_problems(host: dict[str, Any], family_cls: type, transformer_config: dict[str, Any]) -> list[str]:
    """The degree against the network (its attention heads) and the validation sample's latent tokens, one line
    each (``validate-config``, once the model folder is known; the same rule as ``simpletuner-dmd estimate``)."""
    c = context_parallel_size(host)
    if c == 1 or family_cls.activation_shape is None:
        return []
    w, h = host["validation_resolution"]
    shape = family_cls.activation_shape(transformer_config, width=w, height=h,
                                        frames=host["validation_num_video_frames"])
    lines = parallel_problems(Parallel(gpus=c, context_parallel=c), transformer_config, shape, {})
    return [f"config.context_parallel_size: {line} (the validation sample, {w}x{h}x"
            f"{host['validation_num_video_frames']})" if "tokens" in line else f"config.context_parallel_size: {line}"
            for line in lines]


def enable_context_parallel(network: torch.nn.Module, accelerator: Any, degree: int) -> None:
    """Split ``network``'s tokens over groups of ``degree`` consecutive processes (Ulysses, diffusers'
    ``enable_parallelism``) in place. Call it on every process, once every adapter exists; the training passes then
    need every process of a group at each call, and the adapters' gradients must be summed over the group
    (``fsdp.ReplicatedAdapters`` with ``data_parallel_size = num_processes // degree``). On a CPU, diffusers needs
    ``tests/simpletuner/cpu_shims.diffusers_context_parallel_on_cpu()`` applied first (test and benchmark runs)."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    plan = getattr(network, "_cp_plan", None)
    if plan is None:
        raise UserError(f"context_parallel_size: {type(network).__name__} has no diffusers _cp_plan; it cannot split "
                        "its tokens")
    world = accelerator.num_processes
    mesh = init_device_mesh(accelerator.device.type, (world // degree, 1, degree),
                            mesh_dim_names=("data", "ring", "ulysses"))
    network.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh["ring", "ulysses"]))
    _refuse_uneven_splits(network, degree)


def parallel_network(network: torch.nn.Module, host: dict[str, Any], accelerator: Any) -> torch.nn.Module | None:
    """What the training passes call, once every adapter exists (the reference host's ``set_up``; the memory
    benchmark): with ``context_parallel_size`` C > 1 the tokens split over groups of C processes, with ``fsdp_enable``
    on several processes the frozen base sharded, and with either the adapters' gradients reduced by
    ``fsdp.ReplicatedAdapters`` (summed over a group, averaged over the groups). ``None`` when neither applies: the
    caller prepares the network as usual (accelerate's DDP, or one process)."""
    spread = layout(host, accelerator)
    if spread.context_parallel > 1:
        enable_context_parallel(network, accelerator, spread.context_parallel)
    if sharding(host, accelerator):
        return shard_frozen_base(network, accelerator, spread.data_parallel_size)
    if spread.context_parallel > 1:
        return ReplicatedAdapters(network, trainable_parameters(network), spread.data_parallel_size)
    return None


def _refuse_uneven_splits(network: torch.nn.Module, degree: int) -> None:
    """Every split the plan makes (diffusers' ``ContextParallelSplitHook``s: inputs such as the first block's hidden
    states, outputs such as the rotary embedding's) first checks that the degree divides the length it cuts: one user
    error instead of diffusers' bare assertion."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    wrapped = 0
    for name, module in network.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            if isinstance(hook, ContextParallelSplitHook):
                hook._prepare_cp_input = _checked_split(hook._prepare_cp_input, degree, name or "the network")
                wrapped += 1
    if not wrapped:
        raise RuntimeError("enable_parallelism registered no ContextParallelSplitHook: diffusers changed its hooks")


def _checked_split(prepare: Any, degree: int, where: str) -> Any:
    def prepare_cp_input(x: torch.Tensor, cp_input: Any) -> torch.Tensor:
        if (cp_input.expected_dims is None or x.dim() == cp_input.expected_dims) and x.shape[cp_input.split_dim] % degree:
            raise UserError(f"context_parallel_size {degree} must divide the sample's {x.shape[cp_input.split_dim]:,} "
                            f"tokens (split at {where}); choose sizes or frame counts whose latent token count it "
                            "divides")
        return prepare(x, cp_input)

    return prepare_cp_input


__all__ = ["Layout", "context_parallel_problems", "context_parallel_size", "degree_problems",
           "enable_context_parallel", "layout", "parallel_network"]
