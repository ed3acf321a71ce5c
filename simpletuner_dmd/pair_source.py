"""The guided teacher's ODE pairs as a method uses them: set up once, generated lazily, streamed by step.

``simpletuner_dmd.ode_pairs`` builds, caches and streams the pairs; this is the piece between it and a method's
hooks, shared by DMD's regression term (``regression_loss_weight``) and the ``ode_init`` method, with the same
``distillation_config`` keys in both (``regression_prompts``, ``regression_num_pairs``, ``regression_teacher_steps``,
``regression_latent_shape``, ``dmd_denoising_steps``, ``real_score_guidance_scale``/``_2``/``_interval``,
``negative_prompt``), so an ``ode_init`` run and a DMD run with the same keys share one cache.

- ``PairSource.setup(run)`` (in ``distill_setup``: ``encode_prompts`` is valid only then): encodes the prompts, finds
  the cache folder (the host's ``cache_dir``, else ``output_dir/cache``) and, when ``regression_latent_shape`` is
  given, generates (or reuses) the pairs now;
- ``take(step, latents)``: the next ``len(latents)`` pairs of this process's stream (generated first, at the first
  batch's shape, when no shape was given) and their batched conditions;
- ``shape`` is what a checkpoint keeps, so a resumed run reuses the pairs its first run generated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError
from .guidance import applies, cfg_combine, highest_scale, teacher_scale
from .ode_pairs import ODEPairBatch, ODEPairs, ODEPairSpec, ODEPairStream, dtype_name, prepare_ode_pairs
from .passes import PassCounter
from .types import RunContext, StepInfo

SHARD_BYTES = 256 * 2 ** 20  # a shard file holds at most this much (one is in memory at a time)


def _sharded(module: Any) -> bool:
    """Whether ``module`` is sharded by FSDP2 (``fsdp_enable``) or splits its tokens (diffusers' context parallelism,
    ``context_parallel_size``): each call of it then needs every process."""
    if getattr(module, "_parallel_config", None) is not None:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def pair_generation_passes(config: dict[str, Any]) -> dict[str, float]:
    """The one-time cost of the teacher's ODE pairs, by ``estimate``'s pass roles: ``regression_num_pairs`` solves of
    ``regression_teacher_steps`` Euler steps, each step one teacher forward (cond and uncond as one batch of two
    samples when guided). Paid before the first optimizer step, once: the pairs are cached in the host's
    ``cache_dir`` and reused by every run with the same keys (``ode_pairs``)."""
    solves = config["regression_num_pairs"] * config["regression_teacher_steps"]
    samples = 2 if highest_scale(config) > 1 else 1
    return {"teacher_forward": float(solves), "teacher_forward_samples": float(solves * samples)}


def guided_teacher(nets: Any, scale: float, interval: tuple[float, float], scale_2: float | None = None
                   ) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """The guided teacher's flow (the real score: base, adapters off; its CFG on the negative prompt as one batch),
    through the bare module: what the pairs are solved with. ``scale_2``: the second expert's scale of a family
    with experts (``real_score_guidance_scale_2``; ``guidance.teacher_scale``)."""
    def flow(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        bare = lambda x_, t_, c_: nets.teacher_flow(x_, t_, c_, bare=True)  # noqa: E731
        per_sample = teacher_scale(nets.family, scale, scale_2, t)
        return nets.guided(bare, x, t, cond, cfg_combine(per_sample, t, tuple(interval)))

    return flow


class PairSource:
    """The teacher's ODE pairs for one run. ``teacher_flow(x, t, cond)`` is the teacher's guided flow (the method's
    real score with its CFG); ``nets`` is the method's ``Networks`` (its pass counter is set aside while the pairs are
    generated: a one-time cost, not a step's passes); ``what`` names the key that asked for pairs, for errors."""

    def __init__(self, config: dict[str, Any], *, steps: list[int], nets: Any, family: Any, accelerator: Any,
                 teacher_flow: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], negative_prompt: str,
                 what: str):
        self.cfg, self.steps, self.nets, self.family = config, list(steps), nets, family
        self.accelerator, self.teacher_flow, self.negative_prompt, self.what = (accelerator, teacher_flow,
                                                                               negative_prompt, what)
        self.pairs: ODEPairs | None = None
        self.stream: ODEPairStream | None = None
        self.shape: tuple[int, ...] | None = None  # the pairs' latent shape, once known (kept in checkpoints)
        self.conds: list[Any] = []

    def setup(self, run: RunContext) -> None:
        cfg = self.cfg
        prompts = cfg["regression_prompts"]
        if prompts is None and run.host_config.get("validation_prompt"):
            prompts = [run.host_config.get("validation_prompt")]
        if not prompts:
            raise UserError(f"distillation_config.regression_prompts: {self.what} generates the teacher's ODE pairs "
                            f"for prompts; set regression_prompts (a list of texts) or the host's validation_prompt")
        cache = run.host_config.get("cache_dir")
        if cache:
            root = Path(cache)
        elif run.output_dir is not None:
            root = Path(run.output_dir) / "cache"
        else:
            raise UserError(f"distillation_config: {self.what} needs a cache folder for the teacher's ODE pairs; set "
                            f"the host's cache_dir")
        self.run, self.root, self.prompts = run, root / "ode_pairs", tuple(prompts)
        self.conds = [run.encode_prompts([text]) for text in prompts]  # batch-1 each, by index
        if cfg["regression_latent_shape"] is not None:
            self.pairs = self._prepare(tuple(cfg["regression_latent_shape"]))

    def restore_shape(self, shape: list[int] | None) -> None:
        """A checkpoint's pair shape: a resumed run reuses the pairs its first run generated."""
        if self.pairs is None and shape:
            self.shape = tuple(int(n) for n in shape)

    def _prepare(self, shape: tuple[int, ...]) -> ODEPairs:
        """Generate (every process its share; the main process's shape decides) or reuse the pairs for ``shape``."""
        cfg, run = self.cfg, self.run
        self.shape = shape
        dtype = self.family.autocast_dtype or torch.float32
        per_pair = (len(self.steps) + 2) * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        teacher_module = run.teacher if run.teacher is not None else run.student
        if _sharded(teacher_module):
            raise UserError(f"distillation_config.regression_latent_shape: {self.what} with a sharded or split "
                            "base (fsdp_enable, context_parallel_size) needs the pairs' shape given, so the teacher's "
                            "ODE pairs are made at set-up, before the base is sharded or split (each process "
                            "generates its own share of them)")
        spec = ODEPairSpec(
            teacher_id=f"{self.family.name}:{run.host_config.get('pretrained_model_name_or_path') or ''}:"
                       f"{type(teacher_module).__name__}",
            prompts=self.prompts, shape=shape, count=cfg["regression_num_pairs"], seed=run.seed,
            student_steps=tuple(self.steps), teacher_steps=cfg["regression_teacher_steps"],
            shift=float(run.host_config.get("flow_schedule_shift", 1.0)),
            guidance_scale=cfg["real_score_guidance_scale"], negative_prompt=self.negative_prompt,
            guidance_interval=tuple(cfg["real_score_guidance_interval"]), **self._expert_guidance(),
            dtype=dtype_name(dtype), shard_size=max(1, min(256, SHARD_BYTES // per_pair)))
        counted, self.nets.passes = self.nets.passes, PassCounter()
        try:
            return prepare_ode_pairs(spec, self.teacher_flow, self.conds, family=self.family, cache_dir=self.root,
                                     accelerator=self.accelerator,
                                     batch_size=max(1, min(64, 2 ** 22 // math.prod(shape))),
                                     device=self.accelerator.device)
        finally:
            self.nets.passes = counted

    def _expert_guidance(self) -> dict[str, float]:
        """The second expert's scale and where the experts switch, for the pairs' key, when a second scale applies
        (``guidance.applies``); nothing otherwise, so a one-scale run keeps the key (and the cache) it had."""
        scale, scale_2 = self.cfg["real_score_guidance_scale"], self.cfg.get("real_score_guidance_scale_2")
        if not applies(self.family, scale, scale_2):
            return {}
        return {"guidance_scale_2": float(scale_2), "boundary_ratio": float(self.family.boundary_ratio)}

    def take(self, step: StepInfo, latents: torch.Tensor) -> tuple[ODEPairBatch, Any]:
        """The next ``len(latents)`` pairs (on ``latents``' device) and their conditions as one batch."""
        if self.pairs is None:  # a resumed run keeps the shape its first run took from its first batch
            self.pairs = self._prepare(self.shape or tuple(latents.shape[1:]))
        if self.stream is None:  # a new order after a resume; another on each data-parallel process
            rank = self.run.data_parallel_rank
            rank = self.accelerator.process_index if rank is None else rank
            seed = (self.run.seed * 1_000_003 + step.global_step) * 64 + rank
            self.stream = self.pairs.stream(latents.shape[0], seed=seed, device=latents.device)
        pairs = self.stream.take(latents.shape[0])
        cond = self.family.concat_conditions([self.conds[i] for i in pairs.cond_index.tolist()])
        return pairs, cond
