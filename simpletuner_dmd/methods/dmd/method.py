"""DMD's per-run state and its step-loop hooks.

One optimizer step:
  * ``distill_loss`` (each micro-batch): backward simulation → x̂0_gen. On generator steps (every
    ``generator_update_interval`` optimizer steps) also the KL gradient from the fake score and the guided teacher,
    all under no_grad, and ``dmd_loss`` for the host to back-propagate. x̂0_gen (detached) is stashed for the critic.
  * ``distill_after_optimizer_step``: the critic's turn — the fake score's flow loss on every stashed sample (gradient
    accumulation applies), its own clip and AdamW step.
With ``gan_loss_weight`` > 0 (DMD2's GAN term, ``gan.py``) the generator's loss gains ``softplus(−D(x̂0_gen))`` and the
critic's turn trains the classifier ``D`` on the fake score's features of the stashed sample and of the batch's real
latents, noised alike, in one batched forward; both from ``gan_start_step`` on (before it the step is DMD alone).
With ``regression_loss_weight`` > 0 (DMD v1's regression term) the generator's loss gains
``weight · metric(G(x_{t_k}, t_k), x0)`` on the teacher's ODE pairs (``simpletuner_dmd.ode_pairs``): the guided
teacher's Euler solution ``x0`` from noise and its ODE state ``x_{t_k}`` at a student step, generated once and cached.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...adapters import named_adapter_parameters
from ...flow import add_noise, flow_to_x0, guided_self_forcing
from ...errors import UserError
from ...hookspecs import hookimpl
from ...method_base import MethodBase
from ...nonfinite import DEFAULT_LIMIT, NonFiniteGuard
from ...networks import Networks
from ...optimizers import adamw
from ...passes import PassCounter
from ...pair_source import PairSource, guided_teacher, pair_generation_passes
from ...guidance import cfg_combine, highest_scale, teacher_scale
from ...types import Batch, RunContext, StepInfo, StepLoss
from .gan import GANHead, captured_output, classifier_loss, generator_loss
from .loss import critic_flow_loss, dmd_gradient, dmd_loss, dmd_timestep_bounds, sample_dmd_timesteps
from .config import DMD_SCHEMA, block_key_warnings
from ...fewstep_sampling import block_calls
from ...method_toolkit import (FewStepStudent, Weights, draw_block_exits, draw_exit_index, exit_regression,
                               load_method_state, save_method_state, second_scale_warnings)
from .rollout import Rollout, backward_simulation, block_backward_simulation

FAKE_ADAPTER = "fake_score"


@dataclass
class _Stash:
    x0: torch.Tensor  # the generator's sample, detached
    cond: Any
    real: torch.Tensor | None  # the batch's real latents (the GAN classifier's real side), when the GAN term is on
    denoised_from: float
    denoised_to: float


def guided_one_step_warnings(config: dict[str, Any]) -> list[str]:
    """A guided (``real_score_guidance_scale`` > 1) one-step student without DMD v1's regression term: one warning with
    the evidence and the setting that fixed it. Why only this case (docs/quality.md, "Guided students"): in case A's
    guided benchmark the 1-step student missed the guidance target without the term (3.91x its guidance-1 distance,
    against 2x) and met it with ``regression_loss_weight`` 16 (1.90x); the 3-step students met it without (1.86x on
    case A, 0.70x on the digits), and so did the digits' 1-step student (0.43x). The term stays off by default: its
    teacher pairs cost ``regression_num_pairs x regression_teacher_steps`` guided teacher passes, once."""
    scale = highest_scale(config)
    if len(config["dmd_denoising_steps"]) != 1 or scale <= 1 or config["regression_loss_weight"] > 0:
        return []
    passes = config["regression_num_pairs"] * config["regression_teacher_steps"]
    return [f"distillation_config.regression_loss_weight: a 1-step student at real_score_guidance_scale "
            f"{scale:g} without DMD v1's regression term missed the guidance target in the quality benchmark "
            f"(case A: 3.91x its unguided distance; 1.90x with regression_loss_weight 16; docs/quality.md, 'Guided "
            f"students'); consider regression_loss_weight 16, whose teacher pairs cost {passes} guided teacher "
            f"passes once (simpletuner-dmd estimate shows their time; they are cached in cache_dir and reused)"]


class DMD(FewStepStudent, MethodBase):
    name = "dmd"
    summary = "Distribution Matching Distillation (DMD2 / Self-Forcing): few-step student, fake score as an adapter"
    schema = DMD_SCHEMA
    progress_metrics = ("dmd_loss", "fake_score_loss")  # the logs the host's progress bar shows

    @staticmethod
    def context_parallel_problems(config: dict[str, Any]) -> list[str]:
        out = []
        if config["gan_loss_weight"] > 0:
            out.append("distillation_config.gan_loss_weight: DMD2's GAN head reads one block's features, of which each "
                       "process holds a share when the tokens are split; set gan_loss_weight: 0")
        if config["fake_score_type"] == "full":
            out.append("distillation_config.fake_score_type: a full fake score is a second network, which is not "
                       "split; use fake_score_type lora (or auto)")
        return out

    @staticmethod
    def config_warnings(config: dict[str, Any], family_cls: type, host: dict[str, Any]) -> list[str]:
        out = block_key_warnings(config, family_cls.causal, family_cls.name) + second_scale_warnings(config, family_cls)
        steps = len(config["dmd_denoising_steps"])
        student_lr = host.get("learning_rate")
        if student_lr and config["fake_score_lr"] < student_lr:
            out.append(
                f"distillation_config.fake_score_lr: {config['fake_score_lr']:g} is below learning_rate "
                f"{student_lr:g}; in the quality benchmark (docs/quality.md, case A) a critic slower than the student "
                f"collapsed the student onto 1-2 of 8 modes (recall 0.12), and on the digits (case B) the quickstart's "
                f"settings drifted away from the guided teacher (final FD 1.73x its best); use fake_score_lr >= "
                f"learning_rate, with generator_update_interval 5 as DMD2 does")
        out += guided_one_step_warnings(config)
        if config["gan_start_step"] > 0 and config["gan_loss_weight"] == 0:
            out.append(f"distillation_config.gan_start_step: {config['gan_start_step']} has no effect while "
                       f"gan_loss_weight is 0 (the GAN term is off)")
        if "validation_num_inference_steps" in host and host["validation_num_inference_steps"] != steps:
            out.append(f"validation_num_inference_steps: DMD samples with its {steps} dmd_denoising_steps; the value "
                       f"{host['validation_num_inference_steps']} applies to the teacher's reference sample only")
        return out

    @staticmethod
    def memory_plan(config: dict[str, Any], host: dict[str, Any], layout: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """What ``simpletuner-dmd estimate`` needs to know of a DMD run: its second trainable network (the fake
        score: an adapter of ``fake_score_lora_rank`` on the shared base, or a full copy) and its network passes per
        optimizer step, averaged over ``generator_update_interval`` steps (as ``test_pass_counts_are_minimal``
        counts them: a rollout of k + 1 student forwards every step, k uniform over the steps unless
        ``last_step_only``; on a generator step one student backward, one teacher forward — cond and uncond in one
        batch when guided — and one no-grad fake forward; every step the critic's forward and backward). With
        ``regression_loss_weight`` > 0 a generator step adds one student forward and backward (the regression term),
        whose graph the student's backward holds beside the rollout's: ``student_graphs`` 2, and the pairs' one-time
        generation is ``one_time_passes`` (``pair_source.pair_generation_passes``), not a per-step cost.

        ``layout`` (``{"causal": bool, "latent_frames": F}``, from ``estimate``): for a block-causal family the
        rollout runs per block — each of the B blocks its own k + 1 forwards (k shared with ``same_step_across_blocks``
        changes nothing on average) and B − 1 context writes; the exit graphs of the blocks together span at most the
        clip, so the student's graph memory stays one clip's. The KV cache adds to it through the student's backward:
        the exit passes attend to it (a checkpointed recompute needs it as it was), and its chunks are shared by
        every pass that keeps it, so it is held once — every frame but the last block's; without gradient
        checkpointing each exit pass inside the gradient window also saves its keys and values (the cache's and its
        block's) for the attention's backward. ``kv_cache_share``: those frames as a share of the clip's (Self-Forcing's
        21 frames in blocks of 3: 18/21 with checkpointing, (18 + 3 + 6 + … + 21)/21 without)."""
        k_steps = len(config["dmd_denoising_steps"])
        interval = config["generator_update_interval"]
        forwards = k_steps if config["last_step_only"] else (k_steps + 1) / 2
        if layout and layout.get("causal"):
            frames, per = int(layout["latent_frames"]), config["num_frame_per_block"]
            first = 1 if config["independent_first_frame"] and frames > 1 else 0
            blocks = first + -(-(frames - first) // per)
            forwards = blocks * forwards + (blocks - 1)
            ends = ([1] if first else []) + list(range(first + per, frames, per)) + [frames]
            kv_frames = ends[-2] if len(ends) > 1 else 0  # the cache: every frame before the last block
            if not host.get("gradient_checkpointing", True):
                window_start = frames - min(config["num_training_frames"], frames)
                kv_frames += sum(end for end in ends if end > window_start)
            kv_share = kv_frames / frames
        regression = 1 if config["regression_loss_weight"] > 0 else 0
        fake = config["fake_score_type"]
        if fake == "auto":
            fake = "lora" if host.get("model_type", "lora") == "lora" else "full"
        plan = {
            "second_network": {"kind": fake, "rank": config["fake_score_lora_rank"] or host.get("lora_rank")},
            "passes_per_step": {
                "student_forward": forwards + regression / interval, "student_backward": (1 + regression) / interval,
                "teacher_forward": 1 / interval,
                "teacher_forward_samples": (2 if highest_scale(config) > 1 else 1) / interval,
                "fake_score_forward": 1 + 1 / interval, "fake_score_backward": 1.0,
            },
        }
        if regression:
            plan["student_graphs"] = 2
            plan["one_time_passes"] = pair_generation_passes(config)
        if layout and layout.get("causal"):
            plan["kv_cache_share"] = kv_share
        return plan

    def __init__(self, config: dict[str, Any]):
        self.cfg = config
        self.steps: list[int] = list(config["dmd_denoising_steps"])
        self._pending: list[_Stash] = []
        self._critic_logs: dict[str, float] = {}
        self.passes = PassCounter()  # network passes by role in the current optimizer step
        self.last_step_passes: dict[str, int] = {}
        self.generator_updates = 0
        self.critic_updates = 0
        fake = config["fake_score_guidance_scale"]
        # The teacher's CFG (standard form) comes from _real_combine(t); the fake score's is Self-Forcing's form,
        # None: cond only (and no uncond pass).
        self._real_interval = tuple(config["real_score_guidance_interval"])
        self._fake_cfg = None if fake == 0.0 else (lambda c, u: guided_self_forcing(c, u, fake))

    # ------------------------------------------------------------------ setup

    @hookimpl
    def distill_setup(self, run: RunContext) -> None:
        cfg = self.cfg
        # the student, the teacher (base, adapters off) and the fake score's adapter, called through one helper;
        # it refuses a full student without a separate teacher, and encodes the negative prompt once
        self.nets = Networks(run, self.passes, negative_prompt=cfg["negative_prompt"], method_name=self.name)
        self.run = run
        self.family = run.family
        # a block-causal family (causal = True, with block_causal(network)): the Self-Forcing rollout and sampler
        self.causal = bool(run.family.causal)
        self.accelerator = run.accelerator
        self.student = run.student  # the bare module: adapters, state, sampling
        fake_type = cfg["fake_score_type"]
        if fake_type == "auto":
            fake_type = "lora" if run.model_type == "lora" else "full"
        if fake_type == "lora" and run.model_type != "lora":
            raise UserError("distillation_config.fake_score_type: 'lora' needs model_type 'lora' (the fake score is "
                            "an adapter on the student's frozen base)")
        self.fake_type = fake_type
        self.guard = NonFiniteGuard("fake score (critic)", int(run.host_config.get("nonfinite_skip_limit",
                                                                                   DEFAULT_LIMIT)))

        if fake_type == "lora":
            params = self.nets.add_adapter(FAKE_ADAPTER, cfg["fake_score_lora_rank"])
            self.fake_net = self.student
        else:
            self.fake_net = run.load_base()
            self.fake_net.requires_grad_(True).train()
            if run.host_config.get("gradient_checkpointing"):
                self.fake_net.enable_gradient_checkpointing()
            params = list(self.fake_net.parameters())
            self.fake_net = self.accelerator.prepare_model(self.fake_net)
        self.gan_head: GANHead | None = None
        if cfg["gan_loss_weight"] > 0:
            named = self.family.gan_feature_module
            if named is None:
                raise UserError(f"distillation_config.gan_loss_weight: the {self.family.name!r} family does not name "
                                f"the fake score's features (gan_feature_module), so the GAN term cannot run with it")
            _, width = named(self._bare_fake())
            # Seeded from the run seed, not the per-process stream: the head is outside the DDP wrapper, so nothing
            # else would make it start equal on every process (the method averages its gradient itself).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run.seed)
                head = GANHead(width)
            self.gan_head = head.to(self.accelerator.device)  # fp32; trained with the fake score
            params = params + list(self.gan_head.parameters())
        self.fake_params = params
        optimizer = adamw(params, kind=run.host_config.get("optimizer", "adamw"), lr=cfg["fake_score_lr"],
                          betas=tuple(cfg["fake_score_betas"]), eps=cfg["fake_score_eps"],
                          weight_decay=cfg["fake_score_weight_decay"])
        self.fake_optimizer = self.accelerator.prepare_optimizer(optimizer)

        self.negative_prompt = self.nets.negative_prompt
        self.uncond = self.nets.uncond  # encoded once; the text encoder may be freed after setup
        self.pair_source: PairSource | None = None
        if cfg["regression_loss_weight"] > 0:
            teacher = guided_teacher(self.nets, cfg["real_score_guidance_scale"], self._real_interval,
                                     cfg["real_score_guidance_scale_2"])
            self.pair_source = PairSource(cfg, steps=self.steps, nets=self.nets, family=self.family,
                                          accelerator=self.accelerator, teacher_flow=teacher,
                                          negative_prompt=self.negative_prompt,
                                          what="regression_loss_weight > 0")
            self.pair_source.setup(run)

    # ------------------------------------------------------------------ the regression term

    def _regression(self, step: StepInfo, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``metric(G(x_{t_k}, t_k), x0)`` on the next batch of pairs (as many as the micro-batch), k drawn as the
        rollout's exit index is (after it, from the step's generator), with a graph to the student."""
        pairs, cond = self.pair_source.take(step, latents)
        loss, k = exit_regression(self.nets, pairs, cond, self.steps, last_step_only=self.cfg["last_step_only"],
                                  metric=self.cfg["regression_metric"], generator=step.generator,
                                  dtype=latents.dtype, device=latents.device)
        return loss, {"regression_loss": float(loss.detach()), "regression_index": float(k)}

    # ------------------------------------------------------------------ the three networks

    def _student_x0(self, cond: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return flow_to_x0(x, self.nets.flow(x, t, cond), t)

        return predict

    def fake_score_flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The fake score's flow prediction (the critic's view of the student's distribution), as the loss uses it:
        for benchmarks and tests; it counts as a fake-score pass."""
        with self._fake_context():
            return self._fake_flow(x_t, t, cond)

    def _fake_context(self):
        return self.nets.adapters(FAKE_ADAPTER) if self.fake_type == "lora" else contextlib.nullcontext()

    def _guided_x0(self, flow_fn, x_t: torch.Tensor, t: torch.Tensor, cond: Any, combine) -> torch.Tensor:
        """x̂0 of ``flow_fn``, guided with ``combine`` (a CFG form; cond and uncond as one batch) when given. CFG is
        linear, so combining flows and then taking x̂0 is combining x̂0s."""
        return flow_to_x0(x_t, self.nets.guided(flow_fn, x_t, t, cond, combine), t)

    def _causal_calls(self, cond: Any, noise: torch.Tensor):
        """The student's training passes on one block through the family's block-causal switch and a fresh KV cache
        (``fewstep_sampling.block_calls``; the sampler builds its own through ``few_step_sampler``)."""
        return block_calls(self.family, self.student, self.nets.flow, cond, noise,
                           frames_per_block=self.cfg["num_frame_per_block"],
                           independent_first_frame=self.cfg["independent_first_frame"])

    def _block_rollout(self, cond: Any, noise: torch.Tensor, step: StepInfo, *, with_grad: bool):
        """Self-Forcing's rollout (``block_backward_simulation``) with this step's exits. The DMD timestep's
        ``ts_schedule`` bounds come from the exit step when every block exits at the same one; otherwise the
        defaults apply (``min_score_timestep`` … 1000)."""
        cfg = self.cfg
        predict, write, blocks = self._causal_calls(cond, noise)
        exits = draw_block_exits(len(blocks), len(self.steps), last_step_only=cfg["last_step_only"],
                                 same_step_across_blocks=cfg["same_step_across_blocks"], generator=step.generator)
        frames = noise.shape[self.family.frame_axis()]
        roll = block_backward_simulation(predict, write, noise, self.steps, blocks, exits,
                                         grad_from_frame=max(0, frames - cfg["num_training_frames"]),
                                         context_noise=cfg["context_noise"], with_grad=with_grad)
        if len(set(exits)) == 1:
            k = exits[0]
            span = (float(self.steps[k]), float(self.steps[k + 1]) if k + 1 < len(self.steps) else 0.0)
        else:
            span = (1000.0, float(cfg["min_score_timestep"]))
        return Rollout(roll.x0, sum(exits) / len(exits), span[0], span[1], roll.student_forwards)

    def _real_combine(self, t: torch.Tensor):
        """The teacher's CFG for timesteps ``t`` (``guidance.cfg_combine``: inside
        ``real_score_guidance_interval`` only), each sample at its expert's scale where the family has experts and
        ``real_score_guidance_scale_2`` is given (``guidance.teacher_scale``)."""
        scale = teacher_scale(self.family, self.cfg["real_score_guidance_scale"],
                              self.cfg["real_score_guidance_scale_2"], t)
        return cfg_combine(scale, t, self._real_interval)

    def _fake_flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, *, module=None) -> torch.Tensor:
        if module is None and self.fake_type != "lora":
            module = self.fake_net
        return self.nets.flow(x_t, t, cond, role="fake_score", module=module)

    def _bare_fake(self) -> torch.nn.Module:
        """The fake score's module without a DDP wrapper (where the family's feature module lives)."""
        return self.student if self.fake_type == "lora" else self.accelerator.unwrap_model(self.fake_net)

    def _fake_flow_and_logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, *, module=None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake score's flow and the GAN classifier's logits on its features (one forward)."""
        feature_module, _ = self.family.gan_feature_module(self._bare_fake())
        with captured_output(feature_module) as outputs:
            flow = self._fake_flow(x_t, t, cond, module=module)
        return flow, self.gan_head(outputs[-1])

    def _gan_generator_grad(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Any
                            ) -> tuple[torch.Tensor, float]:
        """``∂(gan_loss_weight · softplus(−D(x_t(x0))))/∂x0``, computed here inside the fake score's context (a
        checkpointed recompute in the host's later backward would run the student's adapter instead), on the bare
        module (no DDP reduction for a pass that trains nothing), with no gradient left on the fake score or D."""
        leaf = x0.detach().requires_grad_(True)
        x_t = add_noise(leaf, noise, t).to(x0.dtype)
        with self._fake_context():
            _, logits = self._fake_flow_and_logits(x_t, t, cond, module=self._bare_fake())
            loss = generator_loss(logits)
            (grad,) = torch.autograd.grad(loss * self.cfg["gan_loss_weight"], leaf)
        self.passes.backward("fake_score")
        return grad, float(loss.detach())

    def _draw_t(self, batch: int, denoised_from: float, denoised_to: float, device) -> torch.Tensor:
        cfg = self.cfg
        lo, hi = dmd_timestep_bounds(denoised_from, denoised_to, ts_schedule=cfg["ts_schedule"],
                                       ts_schedule_max=cfg["ts_schedule_max"],
                                       min_score_timestep=cfg["min_score_timestep"], shift=cfg["timestep_shift"])
        return sample_dmd_timesteps(batch, lo, hi, shift=cfg["timestep_shift"], min_ratio=cfg["min_timestep_ratio"],
                                      max_ratio=cfg["max_timestep_ratio"], device=device)

    # ------------------------------------------------------------------ generator turn

    def is_generator_step(self, step: StepInfo) -> bool:
        return step.global_step % self.cfg["generator_update_interval"] == 0

    def gan_active(self, step: StepInfo) -> bool:
        """Whether this step runs the GAN term: ``gan_loss_weight`` > 0 and the step at or past ``gan_start_step``
        (before it the classifier sees nothing and the student's loss has no GAN part)."""
        return self.gan_head is not None and step.global_step >= self.cfg["gan_start_step"]

    @hookimpl
    def distill_loss(self, batch: Batch, step: StepInfo, host_loss) -> StepLoss:
        cfg = self.cfg
        self.nets.at(step)
        latents = batch.latents
        axis = self.family.frame_axis()
        frames = min(cfg["num_training_frames"], latents.shape[axis])
        latents = latents.narrow(axis, 0, frames)
        generator_turn = self.is_generator_step(step)

        if self.causal:  # Self-Forcing: the whole clip, block by block; the gradient window is the last frames
            latents = batch.latents
            noise = torch.randn_like(latents)
            roll = self._block_rollout(batch.cond, noise, step, with_grad=generator_turn)
            k = roll.exit_index
        else:
            k = draw_exit_index(len(self.steps), last_step_only=cfg["last_step_only"], generator=step.generator)
            noise = torch.randn_like(latents)
            roll = backward_simulation(self._student_x0(batch.cond), noise, self.steps, k, with_grad=generator_turn)
        real = latents if self.gan_active(step) else None
        self._pending.append(_Stash(roll.x0.detach(), batch.cond, real, roll.denoised_from, roll.denoised_to))
        logs = {"dmd_exit_index": float(k)}
        if not generator_turn:
            return StepLoss(None, logs)

        x0_gen = roll.x0
        self.passes.on_backward(x0_gen, "student")
        with torch.no_grad():
            t = self._draw_t(x0_gen.shape[0], roll.denoised_from, roll.denoised_to, x0_gen.device)
            noise_t = torch.randn_like(x0_gen)
            x_t = add_noise(x0_gen.detach(), noise_t, t).to(latents.dtype)
            with self._fake_context():
                x0_fake = self._guided_x0(self._fake_flow, x_t, t, batch.cond, self._fake_cfg)
            x0_real = self._guided_x0(self.nets.teacher_flow, x_t, t, batch.cond, self._real_combine(t))
            grad, normaliser = dmd_gradient(x0_gen, x0_real, x0_fake)
        loss = dmd_loss(x0_gen, grad)
        logs.update(
            dmd_loss=float(loss.detach()),
            dmd_normaliser=float(normaliser.mean()),
            dmd_grad_abs=float(grad.abs().mean()),
            dmd_timestep=float(t.mean()),
            dmd_teacher_fake_gap=float((x0_fake - x0_real).abs().mean()),
        )
        if self.gan_active(step):
            gan_grad, gan_loss = self._gan_generator_grad(x0_gen, noise_t, t, batch.cond)
            loss = loss + (x0_gen.float() * gan_grad.float()).sum()  # its gradient w.r.t. x̂0_gen is gan_grad
            logs["gan_generator_loss"] = gan_loss
        if cfg["sft_loss_weight"] > 0:
            sft = host_loss()
            logs["sft_loss"] = float(sft.detach())
            loss = loss + cfg["sft_loss_weight"] * sft
        if cfg["regression_loss_weight"] > 0:  # last: the terms above draw exactly what they draw without it
            regression, regression_logs = self._regression(step, latents)
            loss = loss + cfg["regression_loss_weight"] * regression
            logs.update(regression_logs)
        return StepLoss(loss, logs)

    # ------------------------------------------------------------------ critic turn

    @hookimpl
    def distill_after_optimizer_step(self, step: StepInfo) -> None:
        if self.is_generator_step(step):
            self.generator_updates += 1
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.nets.at(step)
        accelerator = self.accelerator
        # accelerator.backward divides by its accumulation steps; rescale so the update is the mean over micro-batches
        scale = accelerator.gradient_accumulation_steps / len(pending)
        critic_losses: list[torch.Tensor] = []
        gan_logs: list[torch.Tensor] = []
        fake_module = self.nets.call if self.fake_type == "lora" else self.fake_net
        self.fake_optimizer.zero_grad(set_to_none=True)  # nothing from the generator's turn may reach this step
        with self._fake_context():
            for i, item in enumerate(pending):
                # Under several processes only the last micro-batch's backward all-reduces the accumulated gradient.
                sync = contextlib.nullcontext() if i == len(pending) - 1 else accelerator.no_sync(fake_module)
                with sync:
                    x0 = item.x0
                    t = self._draw_t(x0.shape[0], item.denoised_from, item.denoised_to, x0.device)
                    noise = torch.randn_like(x0)
                    x_t = add_noise(x0, noise, t)
                    if item.real is None:  # no GAN term (off, or before gan_start_step)
                        flow = self._fake_flow(x_t, t, item.cond)
                        critic_loss = critic_flow_loss(flow, x0, noise)
                    else:  # generated and real, noised alike, in one batch: one forward (one DDP reduction)
                        x_real = add_noise(item.real, torch.randn_like(item.real), t).to(x_t.dtype)
                        both = self.family.concat_conditions([item.cond, item.cond])
                        flow, logits = self._fake_flow_and_logits(torch.cat([x_t, x_real]), torch.cat([t, t]), both)
                        logits_fake, logits_real = logits.chunk(2)
                        cls_loss = classifier_loss(logits_fake, logits_real)
                        critic_loss = (critic_flow_loss(flow.chunk(2)[0], x0, noise)
                                       + self.cfg["gan_classifier_loss_weight"] * cls_loss)
                        gan_logs.append(torch.stack([cls_loss.detach(), torch.sigmoid(logits_real.detach()).mean(),
                                                     torch.sigmoid(logits_fake.detach()).mean()]))
                    accelerator.backward(critic_loss * scale)
                    critic_losses.append(critic_loss.detach())
                self.passes.backward("fake_score")
            finite = self.guard.finite(self.fake_params, *critic_losses)
            self.guard.record(finite, step.global_step)  # raises after too many in a row
            grad_norm = torch.tensor(float("nan"))
            if finite and self.gan_head is not None and accelerator.num_processes > 1:
                for p in self.gan_head.parameters():  # the head is not inside the DDP wrapper: average it here
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            if finite:
                clip = self.cfg["fake_score_grad_clip"]
                grad_norm = accelerator.clip_grad_norm_(self.fake_params, clip if clip > 0 else float("inf"))
                self.fake_optimizer.step()
                self.critic_updates += 1
            self.fake_optimizer.zero_grad(set_to_none=True)
        self._critic_logs = {
            "fake_score_loss": float(torch.stack(critic_losses).mean()),
            "fake_score_grad_norm": float(grad_norm),
            "fake_score_lr": float(self.fake_optimizer.param_groups[0]["lr"]),
            "dmd_generator_updates": float(self.generator_updates),
            "nonfinite/fake_score_skipped": float(self.guard.skipped),
        }
        if gan_logs:
            cls_loss, p_real, p_fake = torch.stack(gan_logs).mean(0).tolist()
            self._critic_logs.update(gan_classifier_loss=cls_loss, gan_real_prob=p_real, gan_fake_prob=p_fake)

    @hookimpl
    def distill_metrics(self, step: StepInfo) -> dict[str, float]:
        # Called once per optimizer step after the critic's turn: the step's passes are complete.
        self.last_step_passes = self.passes.take()
        return {**self._critic_logs, **{f"passes/{k}": float(v) for k, v in self.last_step_passes.items()}}

    # ------------------------------------------------------------------ sampling: FewStepStudent (method_toolkit)

    # ------------------------------------------------------------------ checkpoints

    def _state_parts(self) -> dict[str, Any]:
        """``dmd/``'s files besides ``state.json``: the fake score's weights (with the GAN head's) and its optimizer."""
        return {"fake_score": Weights(self._fake_weights(), "fake score's weights"),
                "fake_score_optimizer": self.fake_optimizer}

    @hookimpl
    def distill_save_state(self, checkpoint_dir: Path) -> None:
        save_method_state(checkpoint_dir, "dmd", self.accelerator, {
            "generator_updates": self.generator_updates, "critic_updates": self.critic_updates,
            "fake_score_type": self.fake_type,
            "regression_latent_shape": None if self.pair_source is None or self.pair_source.shape is None
            else list(self.pair_source.shape),
        }, self._state_parts())

    @hookimpl
    def distill_load_state(self, checkpoint_dir: Path) -> None:
        def check(meta: dict[str, Any]) -> None:
            if meta["fake_score_type"] != self.fake_type:
                raise UserError(f"checkpoint {checkpoint_dir} holds a {meta['fake_score_type']} fake score; this run "
                                f"uses {self.fake_type} (distillation_config.fake_score_type)")

        meta = load_method_state(checkpoint_dir, "dmd", "a DMD run", self._state_parts(), check=check,
                                 state_first=False)
        self.generator_updates = int(meta["generator_updates"])
        self.critic_updates = int(meta["critic_updates"])
        if self.pair_source is not None:
            self.pair_source.restore_shape(meta.get("regression_latent_shape"))

    def _fake_weights(self) -> dict[str, torch.Tensor]:
        if self.fake_type == "lora":
            weights = dict(named_adapter_parameters(self.student, FAKE_ADAPTER))
        else:
            weights = dict(self.accelerator.unwrap_model(self.fake_net).state_dict())
        if self.gan_head is not None:  # trained with the fake score, saved with it
            weights.update({f"gan_head.{k}": v for k, v in self.gan_head.state_dict().items()})
        return weights

