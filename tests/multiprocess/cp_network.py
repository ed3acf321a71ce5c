"""Run under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU): for each Wan family's tiny network, one call
through the family's ``predict_flow`` with every parameter trainable, split over the 2 processes
(``context_parallel.enable_context_parallel``, gradients reduced by ``fsdp.ReplicatedAdapters`` with one data-parallel
group) against the same network unsplit in the same process. Process 0 writes ``{family: {"output": max |Δ|,
"gradient": max |Δ| / max |g|, "parameters": n}, "refused": the line a 3-token sample stops with}`` to
``argv[1]``."""

from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace

# the repository's root is on PYTHONPATH, as the test launches it; the shim goes in before diffusers loads
from tests.simpletuner.cpu_shims import diffusers_context_parallel_on_cpu

diffusers_context_parallel_on_cpu()

import torch
import torch.distributed as dist

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.families.wan_i2v import WanI2VCondition, WanI2VFamily
from simpletuner_dmd.families.wan_ti2v import WanTI2VFamily
from simpletuner_dmd.families.wan_tiny import TINY_TRANSFORMER
from simpletuner_dmd.hosts.reference.context_parallel import enable_context_parallel
from simpletuner_dmd.hosts.reference.fsdp import (
    ReplicatedAdapters,
    trainable_parameters,
)

INNER = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
# family → (its network's overrides of the tiny config, latent channels)
CASES = {
    WanFamily: ({}, 16),
    WanI2VFamily: ({"in_channels": 36, "out_channels": 16, "image_dim": 16, "added_kv_proj_dim": INNER}, 16),
    WanTI2VFamily: ({"in_channels": 48, "out_channels": 48}, 48),
}


def inputs(family_cls, channels: int):
    """A batch of 2 samples of 3 latent frames of 4x4 (24 tokens each after the 2x2 patch), the family's condition."""
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, channels, 3, 4, 4, generator=g)
    t = torch.tensor([700.0, 250.0])
    text = torch.randn(2, 7, TINY_TRANSFORMER["text_dim"], generator=g)
    if family_cls is WanI2VFamily:
        frames = torch.randn(2, 20, 3, 4, 4, generator=g)
        return x_t, t, WanI2VCondition(text, torch.randn(2, 5, 16, generator=g), frames)
    return x_t, t, text


def main(out: str) -> None:
    from diffusers import WanTransformer3DModel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    accelerator = SimpleNamespace(num_processes=dist.get_world_size(), device=torch.device("cpu"))
    report = {}
    for family_cls, (overrides, channels) in CASES.items():
        family = family_cls()
        torch.manual_seed(0)
        plain = WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides})
        split = copy.deepcopy(plain)
        enable_context_parallel(split, accelerator, 2)
        wrapped = ReplicatedAdapters(split, trainable_parameters(split), data_parallel_size=1)
        x_t, t, cond = inputs(family_cls, channels)
        flows = []
        for network in (plain, wrapped):
            flow = family.predict_flow(network, x_t, t, cond)
            (flow.float() ** 2).mean().backward()
            flows.append(flow.detach())
        grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), split.parameters()) if p.grad is not None]
        scale = max(float(a.abs().max()) for a, _ in grads)
        report[family_cls.name] = {
            "output": float((flows[0] - flows[1]).abs().max()),
            "gradient": max(float((a - b).abs().max()) for a, b in grads) / scale,
            "parameters": len(grads),
            "split": split._parallel_config is not None,
        }
        if family_cls is WanFamily:  # 1 latent frame of 2x6 is 3 tokens, which 2 processes cannot split evenly
            try:
                family.predict_flow(wrapped, torch.randn(1, channels, 1, 2, 6), torch.tensor([500.0]), cond[:1])
            except UserError as exc:
                report["refused"] = str(exc)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
