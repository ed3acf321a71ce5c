"""DCM (dual-expert consistency model): phased consistency distillation with a semantic and a detail expert.

The teacher's Euler schedule (``euler_timesteps`` points, shifted by ``dcm_shift``) is cut into ``multiphase`` phases.
For a point j of phase [e_m, e_{m+1}): ``x_j`` from the data; under no_grad the guided teacher (base, adapters off)
takes one Euler step to ``x_{j+1}`` and the expert of the phase maps it to the phase end ``e`` — the target
(``x_{j+1}`` itself when j + 1 = e); with grad, the expert maps ``x_j`` to the phase end; the loss is their MSE.

* ``mode: semantic`` — one expert, the student LoRA, on every phase (SimpleTuner's semantic mode).
* ``mode: fine`` — the student LoRA is the semantic expert and trains (host's optimizer, ``distill_loss``) on the
  first phase only (t > the boundary); a second LoRA, ``dcm_detail``, on top of it is the detail expert for the other
  phases. The detail expert trains in ``distill_after_optimizer_step`` with its own optimizer: consistency + GAN hinge
  + feature matching through the frozen teacher's features; then the discriminator (its own AdamW) takes its hinge
  step. Each micro-batch belongs to one expert, drawn with the phases' share of the schedule.

Isolation: the semantic expert's forward runs with only its adapter active; the detail expert's with both and the
semantic adapter's ``requires_grad`` off, so no detail loss reaches it. Backward passes run inside the same adapter
context as their forward (gradient checkpointing recomputes there); the generator's gradient through the teacher's
features is taken with adapters off (``autograd.grad`` w.r.t. the sample) and then pushed through the detail expert.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...adapters import adapter_parameters, named_adapter_parameters
from ...errors import UserError
from ...hookspecs import hookimpl
from ...method_base import MethodBase
from ...nonfinite import DEFAULT_LIMIT, NonFiniteGuard
from ...optimizers import adamw
from ...passes import PassCounter
from ...types import Batch, RunContext, StepInfo, StepLoss
from ...method_toolkit import Weights, load_method_state, save_method_state
from ...networks import Networks, frozen, guided_batch
from ...flow import add_noise, guided, guided_self_forcing
from .discriminator import Discriminator, capture, feature_layers, find_blocks, hidden_width
from .loss import (adversarial_index, boundary_timestep, euler_sigmas, expert_of, feature_matching, hinge_d_loss,
                   hinge_g_loss, phase_edges, phase_end, phase_jump, renoise)
from .config import DCM_SCHEMA, dcm_warnings

DETAIL_ADAPTER = "dcm_detail"


@dataclass
class _Detail:
    x_j: torch.Tensor
    t_j: torch.Tensor
    sigma_j: torch.Tensor
    sigma_end: torch.Tensor
    end: torch.Tensor
    target: torch.Tensor
    cond: Any


class DCM(MethodBase):
    name = "dcm"
    summary = "Dual-expert consistency model: semantic + detail LoRA experts switched by timestep, GAN on the detail"
    schema = DCM_SCHEMA
    progress_metrics = ("dcm_loss",)  # the logs the host's progress bar shows

    @staticmethod
    def context_parallel_problems(config: dict[str, Any]) -> list[str]:
        return ["DCM's discriminator reads blocks' features, of which each process holds a share when the tokens are "
                "split; use context_parallel_size: 1 with DCM"]

    @staticmethod
    def config_warnings(config: dict[str, Any], family_cls: type, host: dict[str, Any]) -> list[str]:
        return dcm_warnings(config, family_cls.name, host)

    def __init__(self, config: dict[str, Any]):
        self.cfg = config
        self.fine = config["mode"] == "fine"
        self.sigmas = euler_sigmas(config["euler_timesteps"], config["dcm_shift"])
        self.edges = phase_edges(config["euler_timesteps"], config["multiphase"])
        self.boundary = boundary_timestep(self.sigmas, self.edges)
        self.passes = PassCounter()
        self._pending: list[_Detail] = []
        self._logs: dict[str, float] = {}
        self.semantic_batches = 0
        self.detail_updates = 0
        self.discriminator_updates = 0
        scale = config["distill_cfg"]
        self._combine = None if scale == 0.0 else (lambda c, u: guided_self_forcing(c, u, scale))

    # ------------------------------------------------------------------ setup

    @hookimpl
    def distill_setup(self, run: RunContext) -> None:
        cfg = self.cfg
        if self.fine and run.model_type != "lora":
            raise UserError("distillation_config.mode: 'fine' needs model_type 'lora' (the detail expert is a second "
                            "adapter on the student's base)")
        self.run = run
        self.family = run.family
        self.accelerator = run.accelerator
        self.nets = Networks(run, self.passes, negative_prompt=cfg["negative_prompt"], method_name=self.name)
        self.student_adapter = run.student_adapter
        if not self.fine:
            return
        if run.family.routes_by_timestep:
            raise UserError(f"DCM's fine phase: its discriminator reads one list of blocks, but the {run.family.name!r} "
                            f"family runs different sub-networks by timestep; use mode \"semantic\"")
        self.detail_params = self.nets.add_adapter(DETAIL_ADAPTER, cfg["detail_lora_rank"])
        self.semantic_params = adapter_parameters(run.student, run.student_adapter)
        limit = int(run.host_config.get("nonfinite_skip_limit", DEFAULT_LIMIT))
        self.detail_guard = NonFiniteGuard("DCM detail expert", limit)
        self.disc_guard = NonFiniteGuard("DCM discriminator", limit)
        lr = cfg["detail_lr"] or float(run.host_config.get("learning_rate", 1e-4))
        kind = run.host_config.get("optimizer", "adamw")
        self.detail_optimizer = self.accelerator.prepare_optimizer(adamw(self.detail_params, kind=kind, lr=lr))

        self.blocks = find_blocks(run.student)
        try:
            self.layers = feature_layers(len(self.blocks), cfg["discriminator_head_stride"],
                                           cfg["discriminator_total_layers"])
        except ValueError as exc:
            raise UserError(f"distillation_config.discriminator_total_layers: {exc}") from None
        width = hidden_width(self.blocks[0])
        device = next(p for p in self.detail_params).device
        self.discriminator = Discriminator(width, len(self.layers), cfg["discriminator_hidden_dim"]).to(device)
        self.disc_optimizer = self.accelerator.prepare_optimizer(adamw(
            self.discriminator.parameters(), kind=run.host_config.get("optimizer", "adamw"),
            lr=cfg["discriminator_lr"], betas=tuple(cfg["discriminator_betas"]),
            weight_decay=cfg["discriminator_weight_decay"]))

    # ------------------------------------------------------------------ the experts

    def _expert(self, semantic: bool):
        """The adapter context of one expert."""
        if not self.fine:
            return self.nets.adapters()  # one expert: whatever the host made active (the student)
        return self.nets.adapters(self.student_adapter) if semantic else self.nets.adapters(self.student_adapter,
                                                                                              DETAIL_ADAPTER)

    def _draw(self, b: int, step: StepInfo) -> tuple[bool, torch.Tensor]:
        """The micro-batch's expert (same on every rank) and one Euler index per sample inside its phases."""
        n, e1 = self.cfg["euler_timesteps"], self.edges[1]
        if not self.fine:
            return True, torch.randint(0, n, (b,))
        semantic = bool(torch.rand(1, generator=step.generator).item() < e1 / n)
        lo, hi = (0, e1) if semantic else (e1, n)
        return semantic, torch.randint(lo, hi, (b,))

    def _targets(self, x0: torch.Tensor, j: torch.Tensor, cond: Any, semantic: bool):
        """x_j, its timestep, σ_j, the phase end (index, σ) and the no-grad target at the phase end."""
        device = x0.device
        j1 = j + 1
        end = phase_end(j, self.edges)
        sigma_j, sigma_j1, sigma_end = (self.sigmas[i].to(device) for i in (j, j1, end))
        t_j, t_j1 = sigma_j * 1000.0, sigma_j1 * 1000.0
        x_j = add_noise(x0, torch.randn_like(x0), t_j)
        with torch.no_grad():
            v_teacher = self.nets.guided(self.nets.teacher_flow, x_j, t_j, cond, self._combine)
            x_j1 = phase_jump(x_j, v_teacher, sigma_j, sigma_j1).to(x0.dtype)
            with self._expert(semantic):
                v_target = self.nets.flow(x_j1, t_j1, cond, role="student" if semantic else "detail")
            target = phase_jump(x_j1, v_target, sigma_j1, sigma_end)
            at_end = (j1 == end).to(device).view(-1, *([1] * (x0.ndim - 1)))
            target = torch.where(at_end, x_j1.float(), target)  # the boundary condition: f(x_e, σ_e) = x_e
        return x_j, t_j, sigma_j, end, sigma_end, target

    # ------------------------------------------------------------------ semantic expert (the host's student)

    @hookimpl
    def distill_loss(self, batch: Batch, step: StepInfo, host_loss) -> StepLoss:
        self.nets.at(step)
        x0 = batch.latents
        semantic, j = self._draw(x0.shape[0], step)
        x_j, t_j, sigma_j, end, sigma_end, target = self._targets(x0, j, batch.cond, semantic)
        logs = {"dcm_timestep": float(t_j.mean()), "dcm_semantic_batch": float(semantic)}
        if not semantic:  # the detail expert's turn comes after the student's optimizer step
            self._pending.append(_Detail(x_j, t_j, sigma_j, sigma_end, end, target, batch.cond))
            return StepLoss(None, logs)
        with self._expert(True):
            pred = phase_jump(x_j, self.nets.flow(x_j, t_j, batch.cond), sigma_j, sigma_end)
        self.passes.on_backward(pred, "student")
        loss = torch.mean((pred - target) ** 2)
        self.semantic_batches += 1
        logs["dcm_loss"] = logs["dcm_semantic_loss"] = float(loss.detach())
        return StepLoss(loss, logs)

    # ------------------------------------------------------------------ detail expert and discriminator

    def _teacher_features(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> list[torch.Tensor]:
        # The bare module: the gradient of this pass goes to the sample only, never to a parameter (DDP must not wait
        # for one).
        with capture(self.blocks, self.layers, self.family.block_features) as feats:
            self.nets.teacher_flow(x, t, cond, bare=True)
        return list(feats)

    @hookimpl
    def distill_after_optimizer_step(self, step: StepInfo) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        cfg = self.cfg
        self.nets.at(step)
        scale = self.accelerator.gradient_accumulation_steps / len(pending)
        cons_losses, g_losses, fm_losses, d_items = [], [], [], []
        for i, item in enumerate(pending):
            # Under several processes only the last micro-batch's backward all-reduces the accumulated gradient.
            last = i == len(pending) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.nets.call)
            noise = torch.randn_like(item.target)
            sigma_adv = self.sigmas[adversarial_index(item.end, cfg["euler_timesteps"])].to(item.target.device)
            t_adv = sigma_adv * 1000.0
            real_adv = renoise(item.target, noise, item.sigma_end, sigma_adv).to(item.x_j.dtype)
            with sync, self._expert(False), frozen(self.semantic_params):
                pred = phase_jump(item.x_j, self.nets.flow(item.x_j, item.t_j, item.cond, role="detail"),
                                    item.sigma_j, item.sigma_end)
                cons = torch.mean((pred - item.target) ** 2)
                fake_adv = renoise(pred, noise, item.sigma_end, sigma_adv)
                # The adversarial gradient w.r.t. the sample, through the frozen teacher (adapters off) ...
                z = fake_adv.detach().to(item.x_j.dtype).requires_grad_(True)
                with self.nets.teacher_context():  # its backward (and any recompute) with adapters off too
                    with torch.no_grad():
                        real_feats = self._teacher_features(real_adv, t_adv, item.cond)
                    fake_feats = self._teacher_features(z, t_adv, item.cond)
                    with frozen(list(self.discriminator.parameters())):
                        g_hinge = hinge_g_loss(self.discriminator(fake_feats))
                    fm = feature_matching(fake_feats, real_feats)
                    adv = cfg["adv_weight"] * g_hinge + cfg["feature_matching_weight"] * fm
                    (grad_z,) = torch.autograd.grad(adv, z) if adv.requires_grad else (torch.zeros_like(z),)
                self.passes.backward("teacher")
                # ... then through the detail expert, with its adapters active (recompute-safe)
                surrogate = cons + (fake_adv * grad_z.float()).sum()
                self.accelerator.backward(surrogate * scale)
                self.passes.backward("detail")
            cons_losses.append(float(cons.detach()))
            g_losses.append(float(g_hinge.detach()))
            fm_losses.append(float(fm.detach()))
            d_items.append(([f.detach() for f in real_feats], [f.detach() for f in fake_feats]))
        finite = self.detail_guard.finite(self.detail_params, *(torch.tensor(x) for x in cons_losses + g_losses))
        self.detail_guard.record(finite, step.global_step)  # raises after too many in a row
        detail_norm = torch.tensor(float("nan"))
        if finite:
            limit = float(self.run.host_config.get("max_grad_norm", 1.0)) or float("inf")
            detail_norm = self.accelerator.clip_grad_norm_(self.detail_params, limit)
            self.detail_optimizer.step()
            self.detail_updates += 1
        self.detail_optimizer.zero_grad(set_to_none=True)
        for p in self.semantic_params:  # frozen above, so none should exist; the host's next step must start clean
            p.grad = None

        d_losses = []
        for real_feats, fake_feats in d_items:
            d_loss = hinge_d_loss(self.discriminator(real_feats), self.discriminator(fake_feats))
            self.accelerator.backward(d_loss * scale)
            d_losses.append(float(d_loss.detach()))
        if self.accelerator.num_processes > 1:  # the discriminator is not DDP-wrapped: average its gradient here
            for p in self.discriminator.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        d_params = list(self.discriminator.parameters())
        finite = self.disc_guard.finite(d_params, *(torch.tensor(x) for x in d_losses))
        self.disc_guard.record(finite, step.global_step)
        d_norm = torch.tensor(float("nan"))
        if finite:
            clip = cfg["discriminator_grad_clip"]
            d_norm = self.accelerator.clip_grad_norm_(d_params, clip if clip > 0 else float("inf"))
            self.disc_optimizer.step()
            self.discriminator_updates += 1
        self.disc_optimizer.zero_grad(set_to_none=True)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        self._logs = {"dcm_detail_loss": mean(cons_losses), "dcm_gan_g_loss": mean(g_losses),
                      "dcm_feature_matching": mean(fm_losses), "dcm_gan_d_loss": mean(d_losses),
                      "dcm_detail_grad_norm": float(detail_norm), "dcm_discriminator_grad_norm": float(d_norm)}

    @hookimpl
    def distill_metrics(self, step: StepInfo) -> dict[str, float]:
        logs, self._logs = self._logs, {}
        return {**logs, **{f"passes/{k}": float(v) for k, v in self.passes.take().items()}}

    # ------------------------------------------------------------------ sampling

    @staticmethod
    def usage_notes(config) -> list[str]:
        """What a user of the exported student must know beyond its schedule (the model card shows it)."""
        if config.get("mode") != "fine":
            return []
        return ["`mode: fine` trained a second (detail) adapter for the phases after the boundary. A stock pipeline "
                "with this LoRA alone samples the semantic expert throughout; the reference host's validation samples "
                "switch to the detail expert at the boundary as training did."]

    @hookimpl
    def distill_scheduler(self):
        """One Euler jump per phase (``distill_sampler``'s rule). With ``mode: fine`` a stock pipeline also has to
        switch to the detail expert at the boundary (docs/using-the-student.md); the schedule is the same."""
        from ...fewstep_scheduler import FewStepFlowScheduler

        return FewStepFlowScheduler(few_step_timesteps=[float(self.sigmas[i]) * 1000.0 for i in self.edges[:-1]],
                                    step_rule="euler")

    @hookimpl
    def distill_sampler(self):
        starts = self.edges[:-1]

        def student_flow(x, t, cond):
            """The bare student's flow with the active expert (not a counted training pass)."""
            return self.family.predict_flow(self.nets.student, x, t, cond).float()

        def sampler(noise, cond, uncond, guidance_scale, generator):
            """One deterministic Euler jump per phase, from its start to its end, with the phase's expert."""
            use_cfg = uncond is not None and guidance_scale not in (0.0, 1.0)
            combine = (lambda c, u: guided(c, u, guidance_scale)) if use_cfg else None
            x = noise
            with torch.no_grad():
                for start, end in zip(starts, self.edges[1:]):
                    sigma, sigma_end = self.sigmas[start].to(x.device), self.sigmas[end].to(x.device)
                    t = torch.full((x.shape[0],), float(sigma) * 1000.0, device=x.device)
                    with self._expert(bool(expert_of(t[:1], self.boundary).item())):
                        v = guided_batch(self.family, student_flow, x, t, cond, uncond, combine)
                    x = phase_jump(x, v, sigma.expand(x.shape[0]), sigma_end.expand(x.shape[0])).to(noise.dtype)
            return x

        return sampler

    # ------------------------------------------------------------------ checkpoints

    def _counters(self) -> dict[str, Any]:
        return {"mode": self.cfg["mode"], "semantic_batches": self.semantic_batches,
                "detail_updates": self.detail_updates, "discriminator_updates": self.discriminator_updates}

    def _detail_weights(self) -> dict[str, torch.Tensor]:
        return named_adapter_parameters(self.run.student, DETAIL_ADAPTER)

    def _state_parts(self) -> dict[str, Any]:
        """``dcm/``'s files besides ``state.json`` (``mode: fine`` only): the detail expert, the discriminator and
        their optimizers."""
        if not self.fine:
            return {}
        return {"detail_expert": Weights(self._detail_weights(), "detail expert's weights"),
                "detail_optimizer": self.detail_optimizer,
                "discriminator": Weights(self.discriminator.state_dict(), "discriminator's weights"),
                "discriminator_optimizer": self.disc_optimizer}

    @hookimpl
    def distill_save_state(self, checkpoint_dir: Path) -> None:
        folder = save_method_state(checkpoint_dir, "dcm", self.accelerator, self._counters(), self._state_parts())
        if folder is None or not self.fine:
            return
        if hasattr(self.family, "save_lora"):  # the detail expert in the family's LoRA format, loadable on its own
            from peft.utils import get_peft_model_state_dict

            self.family.save_lora(get_peft_model_state_dict(self.run.student, adapter_name=DETAIL_ADAPTER),
                                  folder / "detail_expert", self.run.student.peft_config[DETAIL_ADAPTER])

    @hookimpl
    def distill_load_state(self, checkpoint_dir: Path) -> None:
        def check(meta: dict[str, Any]) -> None:
            if meta["mode"] != self.cfg["mode"]:
                raise UserError(f"checkpoint {checkpoint_dir} is from DCM mode {meta['mode']!r}; this run uses "
                                f"{self.cfg['mode']!r} (distillation_config.mode)")

        meta = load_method_state(checkpoint_dir, "dcm", f"a DCM run in mode {self.cfg['mode']!r}", self._state_parts(),
                                 check=check)
        self.semantic_batches = int(meta["semantic_batches"])
        self.detail_updates = int(meta["detail_updates"])
        self.discriminator_updates = int(meta["discriminator_updates"])
