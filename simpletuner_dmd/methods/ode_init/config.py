"""The schema of ``ode_init``'s ``distillation_config``: DMD's keys for the student's steps, the teacher's guidance,
the teacher's ODE pairs and the block layout, with DMD's names, meanings and defaults (so a DMD config runs
``ode_init`` unchanged, and both runs share one pair cache), and nothing else."""

from __future__ import annotations

from ...config import Schema
from ...method_toolkit import BLOCK_ONLY_KEYS, SHARED_KEYS  # noqa: F401 — the keys that act only block-causally

SHARED_WITH_DMD = (
    "dmd_denoising_steps", "real_score_guidance_scale", "real_score_guidance_scale_2", "real_score_guidance_interval",
    "negative_prompt",
    "regression_metric", "regression_num_pairs", "regression_teacher_steps", "regression_prompts",
    "regression_latent_shape",
    "num_frame_per_block", "independent_first_frame", "same_step_across_blocks", "last_step_only", "context_noise",
    "kv_cache_window",
)

ODE_INIT_SCHEMA = Schema(keys=tuple(SHARED_KEYS[name] for name in SHARED_WITH_DMD))
