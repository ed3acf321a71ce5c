"""The schema of LCM's ``distillation_config``. Key names follow SimpleTuner's LCM distiller (``num_ddim_timesteps``,
``w_min``, ``w_max``, ``loss_type``, ``huber_c``, ``timestep_scaling_factor``, ``shift``); each key acts as its help
says (SimpleTuner's ``shift`` was accepted and never used)."""

from __future__ import annotations

from typing import Any

from ...config import Key, Schema, in_range


def _guidance_window(values: dict[str, Any]) -> list[str]:
    if values["w_max"] < values["w_min"]:
        return [f"w_max: must be >= w_min ({values['w_max']} < {values['w_min']})"]
    return []


def _steps_fit(values: dict[str, Any]) -> list[str]:
    if values["num_inference_steps"] > values["num_ddim_timesteps"]:
        return [f"num_inference_steps: must be <= num_ddim_timesteps ({values['num_inference_steps']} > "
                f"{values['num_ddim_timesteps']}): the sampler uses points of the skipping schedule"]
    return []


LCM_SCHEMA = Schema(
    keys=(
        Key("num_ddim_timesteps", "int", 50, "Points N of the teacher's ODE-solver (skipping) schedule; one training "
            "pair is two neighbouring points, 1000/N apart before the shift.", check=in_range(1, 1000)),
        Key("w_min", "float", 1.0, "Lowest teacher guidance of the per-sample draw, standard CFG form u + w(c - u) "
            "(diffusers' LCM w = ours - 1); 1: cond only.", check=in_range(1)),
        Key("w_max", "float", 15.0, "Highest teacher guidance of the per-sample draw (standard form).",
            check=in_range(1)),
        Key("loss_type", "str", "l2", "l2, or huber (pseudo-Huber sqrt(d^2 + c^2) - c).", choices=("l2", "huber")),
        Key("huber_c", "float", 0.001, "c of the pseudo-Huber loss.", check=in_range(0, lo_open=True)),
        Key("timestep_scaling_factor", "float", 10.0, "Boundary-condition scalings c_skip/c_out are taken at "
            "t * factor (t on the 0..1000 scale).", check=in_range(0, lo_open=True)),
        Key("shift", "float", None, "Timestep shift of the skipping schedule, sigma' = s*sigma/(1+(s-1)*sigma) "
            "(default: the host's flow_schedule_shift).", check=in_range(0, lo_open=True), nullable=True),
        Key("num_inference_steps", "int", 4, "Steps of the multi-step consistency sampler used for validation "
            "(points of the skipping schedule).", check=in_range(1)),
        Key("negative_prompt", "str", None, "Negative prompt of the teacher's unconditional branch (default: "
            "validation_negative_prompt).", nullable=True),
    ),
    cross_checks=(_guidance_window, _steps_fit),
)
