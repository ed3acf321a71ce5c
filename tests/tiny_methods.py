"""A method set up alone on the tiny Wan transformer, as the reference host does it (shared by the method tests)."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch

from simpletuner_dmd.families.wan import WanFamily
from simpletuner_dmd.hosts.reference import trainer as T
from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA
from simpletuner_dmd.types import Batch, RunContext, StepInfo


def stock_student_latents(pipe, out, prompt: str, seed: int, **shape) -> torch.Tensor:
    """The exported student ``out`` (its LoRA already loaded into ``pipe``) sampled by the stock pipeline with its saved
    scheduler (``out/scheduler``), at guidance 1 and its trained step count, from one generator seeded ``seed`` (the
    starting noise, then each re-noise: what the reference host's validation draws); the undecoded latents, a
    video pipeline's ``frames`` or an image pipeline's ``images``."""
    from simpletuner_dmd.fewstep_scheduler import FewStepFlowScheduler

    pipe.scheduler = FewStepFlowScheduler.from_pretrained(str(out), subfolder="scheduler")
    generator = torch.Generator().manual_seed(seed)
    pipe.scheduler.generator = generator
    result = pipe(prompt=prompt, generator=generator, guidance_scale=1.0, output_type="latent",
                  num_inference_steps=len(pipe.scheduler.config.few_step_timesteps), **shape)
    return result.frames if hasattr(result, "frames") else result.images


def embed(texts: list[str]) -> torch.Tensor:
    """A deterministic stand-in text encoder: each text → its own (1, 8, 32) embedding."""
    out = [torch.randn(8, 32, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.stack(out)


def build_method(tiny_wan, cls, method_cfg=None, *, host=None, negative="ugly", new_network=None, family=None):
    """``cls`` validated, built and set up on the tiny Wan (student LoRA from the host's own ``build_models``);
    ``family``: another family instance on the same weights (default: Wan's)."""
    from accelerate import Accelerator

    cfg = {**HOST_SCHEMA.defaults(), "pretrained_model_name_or_path": str(tiny_wan), **(host or {})}
    m_cfg, problems, _ = cls.schema.validate(method_cfg or {}, prefix="distillation_config")
    assert not problems, problems
    family = family or WanFamily()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    new_network = new_network or (lambda: T.frozen_base(cfg, family, torch.float32))
    models = T.build_models(cfg, family, accelerator, distilling=True, new_network=new_network)
    method = cls(m_cfg)
    method.distill_setup(run=RunContext(
        host_config=cfg, method_config=m_cfg, family=family, student=models.network, accelerator=accelerator,
        encode_prompts=embed, negative_prompt=negative, output_dir=None, model_type=cfg["model_type"],
        student_adapter=T.STUDENT_ADAPTER if cfg["model_type"] == "lora" else None, load_base=new_network,
        teacher=models.teacher))
    optimizer = torch.optim.AdamW(list(models.student_params.values()), lr=1e-3)
    return SimpleNamespace(method=method, models=models, family=family, optimizer=optimizer, cfg=cfg)


def perturb_adapters(network, seed=1):
    """Give every LoRA B a non-zero value so each adapter really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def batch(b=2, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(latents=torch.randn(b, 16, frames, 4, 4, generator=g), cond=torch.randn(b, 8, 32, generator=g))


def step_info(step=0):
    return StepInfo(step, 0, 1, True, torch.Generator().manual_seed(123 + step))


def snapshot(network):
    return {n: p.detach().clone() for n, p in network.named_parameters()}
