"""The schema of DMD's ``distillation_config``: every key of the seed quickstart, plus a few explicit, default-off
extras. The semantics of each key are in ``docs/config.md`` (every key, exactly) and in ``loss.py`` / ``rollout.py``."""

from __future__ import annotations

from typing import Any

from ...config import Key, Schema, in_range, parse_betas
# The keys DMD shares with ode_init (and their parsers, re-exported here) live in the method toolkit.
from ...method_toolkit import BLOCK_ONLY_KEYS, SHARED_KEYS

K = SHARED_KEYS


def _ratio_window(values: dict[str, Any]) -> list[str]:
    lo, hi = values["min_timestep_ratio"], values["max_timestep_ratio"]
    if not lo < hi:
        return [f"min_timestep_ratio: must be smaller than max_timestep_ratio ({lo} >= {hi})"]
    return []


DMD_SCHEMA = Schema(
    keys=(
        K["dmd_denoising_steps"],
        Key("generator_update_interval", "int", 1,
            "Update the student every N optimizer steps; the fake score updates every step.", check=in_range(1)),
        K["real_score_guidance_scale"],
        K["real_score_guidance_scale_2"],
        K["real_score_guidance_interval"],
        Key("fake_score_lr", "float", 1e-5, "Fake score AdamW learning rate.", check=in_range(0, lo_open=True)),
        Key("fake_score_weight_decay", "float", 0.01, "Fake score AdamW weight decay.", check=in_range(0)),
        Key("fake_score_betas", "list", (0.9, 0.999), "Fake score AdamW betas.", parse=parse_betas),
        Key("fake_score_eps", "float", 1e-8, "Fake score AdamW epsilon.", check=in_range(0, lo_open=True)),
        Key("fake_score_grad_clip", "float", 1.0, "Fake score gradient clip by global norm (0: off).",
            check=in_range(0)),
        Key("fake_score_guidance_scale", "float", 0.0,
            "CFG on the fake score, Self-Forcing form c + s(c - u); 0: off.", check=in_range(0)),
        Key("min_timestep_ratio", "float", 0.02, "DMD/critic timesteps are clamped to >= ratio * 1000.",
            check=in_range(0, 1)),
        Key("max_timestep_ratio", "float", 0.98, "DMD/critic timesteps are clamped to <= ratio * 1000.",
            check=in_range(0, 1)),
        K["num_frame_per_block"],
        K["independent_first_frame"],
        K["same_step_across_blocks"],
        K["last_step_only"],
        Key("num_training_frames", "int", 21, "Most latent frames generated in the backward simulation.",
            check=in_range(1)),
        K["context_noise"],
        K["kv_cache_window"],
        Key("ts_schedule", "bool", True, "Lower bound of the DMD timestep = the exit step's next timestep."),
        Key("ts_schedule_max", "bool", False, "Upper bound of the DMD timestep = the exit step's timestep."),
        Key("min_score_timestep", "float", 0.0, "Lower bound of the DMD timestep when ts_schedule is false.",
            check=in_range(0, 1000, hi_open=True)),
        Key("timestep_shift", "float", 1.0, "Shift s of the DMD timestep draw, sigma' = s*sigma/(1+(s-1)*sigma).",
            check=in_range(1)),
        # ---- extras (not in the seed), explicit and off by default
        Key("fake_score_type", "str", "auto", "auto: a LoRA adapter on the shared base when model_type is lora, a "
            "full copy otherwise; lora / full force one.", choices=("auto", "lora", "full")),
        Key("fake_score_lora_rank", "int", None, "Rank of the fake score's adapter (default: lora_rank).",
            check=in_range(1), nullable=True),
        K["negative_prompt"],
        Key("gan_loss_weight", "float", 0.0, "DMD2's GAN term: weight of the student's softplus(-D(fake)) added to "
            "dmd_loss, with D a classifier on the fake score's features trained on real vs generated samples (needs "
            "the host's real batches and a family that names its features). 0: off.", check=in_range(0)),
        Key("gan_classifier_loss_weight", "float", 1e-2, "Weight of the classifier's loss, softplus(D(fake)) + "
            "softplus(-D(real)), in the fake score's loss (when gan_loss_weight > 0).", check=in_range(0)),
        Key("gan_start_step", "int", 0, "Optimizer step from which the GAN term runs (when gan_loss_weight > 0): "
            "before it neither the classifier trains nor the student's term is added, so the run is DMD alone, as "
            "DMD2's best ImageNet student resumed a DMD-only run with the term. 0: from the start.",
            check=in_range(0)),
        Key("sft_loss_weight", "float", 0.0, "Weight of the host's own denoising loss added to dmd_loss (DMD "
            "proper: 0).", check=in_range(0)),
        Key("regression_loss_weight", "float", 0.0, "DMD v1's regression term: weight of metric(x̂0 of the student "
            "fed the teacher's ODE state at a student step, the teacher's ODE solution) added to dmd_loss, on "
            "regression_num_pairs pairs the guided teacher generates once into the host's cache_dir (default "
            "output_dir/cache). 0: off.", check=in_range(0)),
        K["regression_metric"],
        K["regression_num_pairs"],
        K["regression_teacher_steps"],
        K["regression_prompts"],
        K["regression_latent_shape"],
    ),
    cross_checks=(_ratio_window,),
)


def block_key_warnings(config: dict[str, Any], causal: bool, family_name: str) -> list[str]:
    """One warning per block key set to a non-default value when the family is bidirectional."""
    if causal:
        return []
    defaults = DMD_SCHEMA.defaults()
    return [
        f"distillation_config.{name}: has no effect with the bidirectional family {family_name!r} (the whole clip "
        f"is one block; only last_step_only and num_training_frames act)"
        for name in BLOCK_ONLY_KEYS
        if config[name] != defaults[name]
    ]
