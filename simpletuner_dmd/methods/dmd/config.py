"""The schema of DMD's ``distillation_config``: every key of the seed quickstart, plus a few explicit, default-off
extras. The semantics of each key are in ``shared/notes/dmd-algorithm.md`` and in ``loss.py`` / ``rollout.py``."""

from __future__ import annotations

from typing import Any

from ...config import Key, Schema, in_range, parse_betas, parse_timestep_list


def _guidance(v: float) -> str | None:
    if v < 0 or 0 < v < 1:
        return f"must be 0 or 1 (off, cond only) or greater than 1 (standard CFG form), got {v}"
    return None


REGRESSION_METRICS = ("l2", "l1", "pseudo_huber")


def parse_prompts(value: Any) -> list[str]:
    """A text or a non-empty list of texts → a list of texts."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a text or a non-empty list of texts, got {value!r}")
    return list(value)


def parse_latent_shape(value: Any) -> list[int]:
    """A list of positive integers (one sample's latent shape, without the batch axis)."""
    ok = (isinstance(value, (list, tuple)) and value
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
    if not ok:
        raise ValueError(f"must be a list of positive integers like [16, 21, 60, 104], got {value!r}")
    return list(value)


def parse_interval(value: Any) -> list[float]:
    """\"lo,hi\" or [lo, hi]: a timestep interval with 0 <= lo < hi <= 1000."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        lo, hi = (float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"must be two timesteps \"lo,hi\" like \"0,700\", got {value!r}") from None
    if not 0 <= lo < hi <= 1000:
        raise ValueError(f"must satisfy 0 <= lo < hi <= 1000, got {value!r}")
    return [lo, hi]


def _ratio_window(values: dict[str, Any]) -> list[str]:
    lo, hi = values["min_timestep_ratio"], values["max_timestep_ratio"]
    if not lo < hi:
        return [f"min_timestep_ratio: must be smaller than max_timestep_ratio ({lo} >= {hi})"]
    return []


DMD_SCHEMA = Schema(
    keys=(
        Key("dmd_denoising_steps", "any", [1000, 757, 522],
            "Student timesteps (0..1000, strictly decreasing) of the backward simulation and of sampling.",
            parse=parse_timestep_list),
        Key("generator_update_interval", "int", 1,
            "Update the student every N optimizer steps; the fake score updates every step.", check=in_range(1)),
        Key("real_score_guidance_scale", "float", 3.0,
            "Teacher CFG, standard form u + s(c - u); 0 or 1: cond only. FastVideo/Self-Forcing value = ours - 1.",
            check=_guidance),
        Key("real_score_guidance_interval", "any", [0.0, 1000.0], "Timesteps \"lo,hi\" (0..1000) where the teacher's "
            "CFG acts; at DMD timesteps outside, the teacher is cond only (a guidance interval, Kynkäänniemi et al. "
            "2024). Default: everywhere.", parse=parse_interval),
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
        Key("num_frame_per_block", "int", 3, "Latent frames per block of a block-causal rollout.",
            check=in_range(1)),
        Key("independent_first_frame", "bool", False, "Block layout [1, n, n, …] in a block-causal rollout."),
        Key("same_step_across_blocks", "bool", False, "All blocks exit at the same step (block-causal)."),
        Key("last_step_only", "bool", False, "Always exit the backward simulation at the last student step."),
        Key("num_training_frames", "int", 21, "Most latent frames generated in the backward simulation.",
            check=in_range(1)),
        Key("context_noise", "float", 0.0, "Timestep to which fed-back context blocks are re-noised (block-causal).",
            check=in_range(0, 1000)),
        Key("kv_cache_window", "int", None, "Latent frames of context a block-causal student's sampler keeps in its "
            "KV cache (a rolling window, for clips longer than training); default: all.", check=in_range(1),
            nullable=True),
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
        Key("negative_prompt", "str", None, "Negative prompt of the teacher's unconditional branch (default: "
            "validation_negative_prompt).", nullable=True),
        Key("gan_loss_weight", "float", 0.0, "DMD2's GAN term: weight of the student's softplus(-D(fake)) added to "
            "dmd_loss, with D a classifier on the fake score's features trained on real vs generated samples (needs "
            "the host's real batches and a family that names its features). 0: off.", check=in_range(0)),
        Key("gan_classifier_loss_weight", "float", 1e-2, "Weight of the classifier's loss, softplus(D(fake)) + "
            "softplus(-D(real)), in the fake score's loss (when gan_loss_weight > 0).", check=in_range(0)),
        Key("sft_loss_weight", "float", 0.0, "Weight of the host's own denoising loss added to dmd_loss (DMD "
            "proper: 0).", check=in_range(0)),
        Key("regression_loss_weight", "float", 0.0, "DMD v1's regression term: weight of metric(x̂0 of the student "
            "fed the teacher's ODE state at a student step, the teacher's ODE solution) added to dmd_loss, on "
            "regression_num_pairs pairs the guided teacher generates once into the host's cache_dir (default "
            "output_dir/cache). 0: off.", check=in_range(0)),
        Key("regression_metric", "str", "l2", "Latent distance of the regression term: l2 mean((x̂0 - x0)²), l1 "
            "mean|x̂0 - x0|, pseudo_huber sqrt(mean((x̂0 - x0)²) + c²) - c per sample (c = 0.00054).",
            choices=REGRESSION_METRICS),
        Key("regression_num_pairs", "int", 1024, "Teacher ODE pairs generated for the regression term (on disk: "
            "K + 2 latents each).", check=in_range(1)),
        Key("regression_teacher_steps", "int", 50, "Euler steps of the teacher's ODE solve (its schedule shifted by "
            "the host's flow_schedule_shift, with the dmd_denoising_steps inserted).", check=in_range(1)),
        Key("regression_prompts", "any", None, "Prompts the pairs are generated for (a list of texts; pair j uses "
            "prompt j mod their count). Default: the host's validation_prompt.", parse=parse_prompts,
            nullable=True),
        Key("regression_latent_shape", "any", None, "One pair's latent shape without the batch axis, e.g. [16, 21, "
            "60, 104]: pairs generated at set-up. Default: the first training batch's (pairs generated at the first "
            "generator step).", parse=parse_latent_shape, nullable=True),
    ),
    cross_checks=(_ratio_window,),
)

# The keys that only act in a block-causal (self-forcing) rollout, with their defaults.
BLOCK_ONLY_KEYS = ("num_frame_per_block", "independent_first_frame", "same_step_across_blocks", "context_noise",
                   "kv_cache_window")


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
