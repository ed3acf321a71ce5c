"""Shared set-up of the cost benchmarks (CPU: ``step_cost.py``; GPU: ``gpu_cost.py``).

Builds one training configuration from a Wan transformer config with random weights — no model folder, no download —
through the reference host's own ``build_models`` and the DMD method's own hooks, and runs one optimizer step exactly
as the reference host does.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from simpletuner_dmd.offload import ActivationOffload
from simpletuner_dmd.families.block_causal import BlockCausalWan
from simpletuner_dmd.families.wan import WAN21_1_3B, WAN21_14B, WanFamily
from simpletuner_dmd.families.wan_causal import WanCausalFamily
from simpletuner_dmd.families.wan_experts import WanExperts, WanExpertsFamily
from simpletuner_dmd.hosts.reference import trainer as T
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
from simpletuner_dmd.methods.dmd.config import DMD_SCHEMA
from simpletuner_dmd.methods.dmd.method import DMD
from simpletuner_dmd.types import Batch, RunContext, StepInfo

# Wan 2.1's published transformer configs (the family's, which `estimate` reads too), and a mid-size one for CPUs.
WAN_1_3B, WAN_14B = WAN21_1_3B, WAN21_14B
CPU_MID = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
               text_dim=256, freq_dim=256, ffn_dim=2048, num_layers=8, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=64)  # 35M parameters: weights matter, as at scale
TINY = dict(CPU_MID, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=2, text_dim=32)

# plain LoRA fine-tuning; DMD with the fake score as an adapter; as a full copy; DMD's Self-Forcing rollout on the
# block-causal family (fake score an adapter; blocks of CAUSAL_BLOCK latent frames through the KV cache); DMD on Wan
# 2.2 A14B's two experts (wan2.2: two networks of the config, switched at boundary 0.875; adapters on both)
KINDS = ("lora", "dmd", "dmd_full", "dmd_causal", "dmd_experts")
CAUSAL_BLOCK = 2


@dataclass
class Setup:
    kind: str
    models: T.Models
    family: WanFamily
    method: DMD | None
    optimizer: torch.optim.Optimizer
    batch: Batch
    loss_fn: Callable[[Batch], torch.Tensor]
    accelerator: Any
    host: dict  # the reference host's keys this configuration runs with (``estimate`` reads the same)
    network: torch.nn.Module  # what the host's passes call: the student network, or the host's wrapper (spread)


def host_config(*, rank: int, checkpointing: bool, quantize: bool, dtype: torch.dtype, **overrides: Any) -> dict:
    """The reference host's keys of a cost benchmark's run (``overrides``: e.g. ``fsdp_enable``)."""
    return {**HOST_SCHEMA.defaults(), "lora_rank": rank, "lora_alpha": rank, "gradient_checkpointing": checkpointing,
            "base_model_precision": "int8-quanto" if quantize else "no_change",
            "mixed_precision": "no" if dtype == torch.float32 else "bf16", **overrides}


def dmd_config(kind: str, frames_per_block: int = CAUSAL_BLOCK) -> dict:
    """The validated ``distillation_config`` of a DMD ``kind``: the last step's exit, the fake score an adapter (a
    full copy for ``dmd_full``)."""
    cfg, problems, _ = DMD_SCHEMA.validate(
        {"last_step_only": True, "fake_score_type": "full" if kind == "dmd_full" else "lora",
         **({"num_frame_per_block": frames_per_block} if kind == "dmd_causal" else {})},
        prefix="distillation_config")
    assert not problems, problems
    return cfg


def build(kind: str, *, config: dict, latent_shape: tuple, text_shape: tuple, quantize: bool, checkpointing: bool,
          rank: int, dtype: torch.dtype, device: str, seed: int = 0, frames_per_block: int = CAUSAL_BLOCK,
          host_overrides: dict | None = None) -> Setup:
    """``host_overrides``: more reference-host keys; the several-process ones (``fsdp_enable``,
    ``context_parallel_size``) take the host's own steps after the method's set-up (``spread``)."""
    from accelerate import Accelerator
    from diffusers import WanTransformer3DModel

    accelerator = Accelerator(cpu=device == "cpu")
    host = host_config(rank=rank, checkpointing=checkpointing, quantize=quantize, dtype=dtype,
                       **(host_overrides or {}))
    causal, experts = kind == "dmd_causal", kind == "dmd_experts"
    family_cls = WanCausalFamily if causal else WanExpertsFamily if experts else WanFamily
    family = family_cls(autocast_dtype=None if dtype == torch.float32 else dtype)

    def new_network() -> torch.nn.Module:
        torch.manual_seed(seed)  # every copy starts from the same random weights
        with torch.device(device):
            network = WanTransformer3DModel(**config).to(dtype)
            if experts:  # as the wan2.2 family's load_network does: a second expert beside the first
                network = WanExperts.of(network, WanTransformer3DModel(**config).to(dtype), 0.875)
        if causal:  # as the wan-causal family's load_network does
            network.block_causal = BlockCausalWan(network)
        return network.requires_grad_(False)

    models = T.build_models(host, family, accelerator, new_network=new_network, distilling=kind != "lora")
    method = None
    if kind != "lora":
        cfg = dmd_config(kind, frames_per_block)
        method = DMD(cfg)
        text = torch.zeros(1, *text_shape[1:], device=device)
        method.distill_setup(run=RunContext(
            host_config=host, method_config=cfg, family=family, student=models.network, accelerator=accelerator,
            encode_prompts=lambda texts: text, negative_prompt="", output_dir=None, model_type="lora",
            student_adapter=T.STUDENT_ADAPTER, load_base=new_network, teacher=None, seed=seed))
    optimizer = torch.optim.AdamW(list(models.student_params.values()), lr=1e-5)
    g = torch.Generator().manual_seed(seed)
    batch = Batch(latents=torch.randn(latent_shape, generator=g).to(device, dtype),
                  cond=torch.randn(text_shape, generator=g).to(device, dtype))
    network = spread(models.network, host, accelerator)
    loss_fn = T._host_loss_fn(family, network, host, torch.zeros(text_shape, device=device, dtype=dtype))
    return Setup(kind, models, family, method, optimizer, batch, loss_fn, accelerator, host, network)


def spread(network: torch.nn.Module, host: dict, accelerator: Any) -> torch.nn.Module:
    """What the training passes call, as the reference host's ``set_up`` makes it once every adapter exists
    (``context_parallel.parallel_network``: the tokens split, the base sharded, the adapters' gradients reduced);
    otherwise the network itself (one process has nothing to spread; on several processes without either key the host
    would wrap it in DDP, which no cost benchmark runs)."""
    from simpletuner_dmd.hosts.reference.context_parallel import parallel_network

    return parallel_network(network, host, accelerator) or network


def train_step(setup: Setup, step: int = 0, *, offload: bool = False) -> None:
    """One optimizer step as the reference host runs it (one micro-batch); ``offload``: with the host's
    ``activation_offload`` around the student's and the critic's passes."""
    around = ActivationOffload if offload else contextlib.nullcontext
    info = StepInfo(step, 0, 1, True, torch.Generator().manual_seed(step))
    with around():
        if setup.method is None:
            loss = setup.loss_fn(setup.batch)
        else:
            loss = setup.method.distill_loss(batch=setup.batch, step=info,
                                             host_loss=lambda: setup.loss_fn(setup.batch)).loss
        loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.method is not None:
        with around():
            setup.method.distill_after_optimizer_step(step=info)
        setup.method.distill_metrics(step=info)


def unavoidable_passes(setup: Setup) -> dict[str, Callable[[], None]]:
    """Each pass a DMD iteration cannot do without, runnable alone (with the exit at the last of K steps):
    K − 1 no-grad student forwards, one student forward + backward, one batched teacher forward (cond + uncond), one
    no-grad fake-score forward, one fake-score forward + backward."""
    m, b = setup.method, setup.batch
    x, cond = b.latents, b.cond
    t = torch.full((x.shape[0],), 500.0, device=x.device)

    def student_nograd():
        with torch.no_grad():
            m._student_x0(cond)(x, t)

    def student_grad():
        m._student_x0(cond)(x, t).float().sum().backward()
        setup.optimizer.zero_grad(set_to_none=True)

    def teacher():
        with torch.no_grad():
            m._guided_x0(m.nets.teacher_flow, x, t, cond, m._real_combine(t))

    def fake_nograd():
        with torch.no_grad(), m._fake_context():
            m._fake_flow(x, t, cond)

    def fake_grad():
        with m._fake_context():
            m._fake_flow(x, t, cond).float().sum().backward()
        m.fake_optimizer.zero_grad(set_to_none=True)

    steps = len(m.steps)
    return {"student forward, no grad": (student_nograd, steps - 1), "student forward + backward": (student_grad, 1),
            "teacher forward (cond + uncond)": (teacher, 1), "fake score forward, no grad": (fake_nograd, 1),
            "fake score forward + backward": (fake_grad, 1)}


def timed(fn: Callable[[], None], device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@contextlib.contextmanager
def quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
