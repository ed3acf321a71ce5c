"""The schema of DCM's ``distillation_config``. Key names follow SimpleTuner's DCM distiller (``mode``,
``euler_timesteps``, ``dcm_shift``, ``multiphase``, ``distill_cfg``, ``adv_weight``, ``model_family``,
``discriminator_head_stride``, ``discriminator_total_layers``); each acts as its help says, or is warned about by name
where it cannot (``model_family`` is the host's). Extras are explicit and documented."""

from __future__ import annotations

from typing import Any

from ...config import Key, Schema, in_range, parse_betas


def _phases_fit(values: dict[str, Any]) -> list[str]:
    problems = []
    if values["multiphase"] > values["euler_timesteps"]:
        problems.append(f"multiphase: must be <= euler_timesteps ({values['multiphase']} > "
                        f"{values['euler_timesteps']})")
    if values["mode"] == "fine" and values["multiphase"] < 2:
        problems.append("multiphase: mode 'fine' needs at least 2 phases (the first is the semantic expert's, the "
                        "rest the detail expert's)")
    return problems


DCM_SCHEMA = Schema(
    keys=(
        Key("mode", "str", "semantic", "semantic: one expert (the student LoRA) on every phase; fine: the student is "
            "the semantic expert on the first (high-noise) phase and a second LoRA on top, the detail expert, takes "
            "the other phases with GAN + feature matching.", choices=("semantic", "fine")),
        Key("euler_timesteps", "int", 50, "Points N of the teacher's Euler schedule.", check=in_range(1, 1000)),
        Key("dcm_shift", "float", 17.0, "Timestep shift of the Euler schedule, sigma' = s*sigma/(1+(s-1)*sigma).",
            check=in_range(0, lo_open=True)),
        Key("multiphase", "int", 4, "Phases of the schedule (PCM); each step of the student's sampler crosses one.",
            check=in_range(1)),
        Key("distill_cfg", "float", 5.0, "Teacher CFG in SimpleTuner/DCM's form c + s(c - u) (= standard s + 1); "
            "0: cond only.", check=in_range(0)),
        Key("adv_weight", "float", 0.5, "Weight of the detail expert's GAN (hinge) loss. SimpleTuner's adv_weight a "
            "scaled a hidden 5x hinge and 10x feature matching: its 0.1 is adv_weight 0.5, "
            "feature_matching_weight 1.0 here.", check=in_range(0)),
        Key("feature_matching_weight", "float", 1.0, "Weight of the detail expert's feature-matching loss (teacher "
            "features of its sample vs the teacher trajectory's).", check=in_range(0)),
        Key("model_family", "str", None, "Accepted for SimpleTuner configs; the host's model_family is used (a "
            "different value is warned about).", nullable=True),
        Key("discriminator_head_stride", "int", 2, "The discriminator reads every N-th block of the teacher.",
            check=in_range(1)),
        Key("discriminator_total_layers", "int", None, "Blocks the discriminator may read, from the first "
            "(default: all of the network's; more than it has is an error).", check=in_range(1), nullable=True),
        Key("discriminator_hidden_dim", "int", 256, "Hidden width of each discriminator head.", check=in_range(1)),
        Key("discriminator_lr", "float", 1e-5, "Discriminator AdamW learning rate.", check=in_range(0, lo_open=True)),
        Key("discriminator_betas", "list", (0.0, 0.999), "Discriminator AdamW betas.", parse=parse_betas),
        Key("discriminator_weight_decay", "float", 0.0, "Discriminator AdamW weight decay.", check=in_range(0)),
        Key("discriminator_grad_clip", "float", 1.0, "Discriminator gradient clip by global norm (0: off).",
            check=in_range(0)),
        Key("detail_lr", "float", None, "Detail expert AdamW learning rate (default: learning_rate).",
            check=in_range(0, lo_open=True), nullable=True),
        Key("detail_lora_rank", "int", None, "Rank of the detail expert's LoRA (default: lora_rank).",
            check=in_range(1), nullable=True),
        Key("negative_prompt", "str", None, "Negative prompt of the teacher's unconditional branch (default: "
            "validation_negative_prompt).", nullable=True),
    ),
    cross_checks=(_phases_fit,),
)

FINE_ONLY_KEYS = ("adv_weight", "feature_matching_weight", "discriminator_head_stride", "discriminator_total_layers",
                  "discriminator_hidden_dim", "discriminator_lr", "discriminator_betas", "discriminator_weight_decay",
                  "discriminator_grad_clip", "detail_lr", "detail_lora_rank")


def dcm_warnings(config: dict[str, Any], family_name: str, host: dict[str, Any]) -> list[str]:
    out = []
    if config["mode"] == "semantic":
        defaults = DCM_SCHEMA.defaults()
        out += [f"distillation_config.{name}: has no effect in mode 'semantic' (no detail expert, no discriminator)"
                for name in FINE_ONLY_KEYS if config[name] != defaults[name]]
    if config["model_family"] is not None and config["model_family"] != family_name:
        out.append(f"distillation_config.model_family: {config['model_family']!r} is ignored; the host's "
                   f"model_family {family_name!r} is used")
    steps = config["multiphase"]
    if "validation_num_inference_steps" in host and host["validation_num_inference_steps"] != steps:
        out.append(f"validation_num_inference_steps: DCM samples with its {steps} phases (multiphase); the value "
                   f"{host['validation_num_inference_steps']} applies to the teacher's reference sample only")
    return out
