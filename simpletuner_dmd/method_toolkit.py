"""What distillation methods share instead of copying, so that no method imports another method's modules:

- **the exit-step keys** (``SHARED_KEYS``, ``BLOCK_ONLY_KEYS``): the ``distillation_config`` keys of a few-step
  student regressed onto the teacher's ODE pairs — its timesteps, the teacher's guidance, the pairs, the block layout —
  with one name, meaning and default for every method that has them (DMD and ``ode_init``: a DMD config runs
  ``ode_init`` unchanged, and both share one pair cache);
- **the exit draws** (``draw_exit_index``, ``draw_block_exits``): the student step ``k ~ U{0, …, K−1}`` at which a
  rollout exits or a regression is taken, one per clip or one per block, from the step's generator (equal on every
  process);
- **the regression at an exit step** (``exit_regression``, ``regression_loss``): ``metric(G(x_{t_k}, t_k), x0)`` on
  the teacher's ODE pairs (DMD v1's regression term; ``ode_init``'s bidirectional loss);
- **method-state save/load** (``save_method_state``, ``load_method_state``, ``Weights``): a method's folder in a
  checkpoint, ``<checkpoint>/<method>/`` — ``state.json`` (counters), named tensors (an adapter's, a head's) as
  safetensors and optimizers' states through ``state_io``;
- **the few-step student's sampling** (``FewStepStudent``): the ``distill_sampler`` and ``distill_scheduler`` hooks and
  the ``streaming`` settings of a student sampled through its ``dmd_denoising_steps`` (DMD, ``ode_init``).

The flow math is in ``flow.py``; the networks of a run and the guided (cond + uncond) batch in ``networks.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Key, in_range, parse_timestep_list
from .errors import UserError
from .fewstep_sampling import few_step_sampler, streaming_settings
from .flow import flow_to_x0
from .hookspecs import hookimpl
from .state_io import load_state, load_weights_into, save_state, save_weights

# --------------------------------------------------------------------------- the exit-step keys

REGRESSION_METRICS = ("l2", "l1", "pseudo_huber")


def guidance_check(v: float) -> str | None:
    """A teacher CFG scale: 0 or 1 (off, cond only) or greater than 1 (the standard form)."""
    if v < 0 or 0 < v < 1:
        return f"must be 0 or 1 (off, cond only) or greater than 1 (standard CFG form), got {v}"
    return None


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


SHARED_KEYS: dict[str, Key] = {key.name: key for key in (
    Key("dmd_denoising_steps", "any", [1000, 757, 522],
        "Student timesteps (0..1000, strictly decreasing) of the backward simulation and of sampling.",
        parse=parse_timestep_list),
    Key("real_score_guidance_scale", "float", 3.0,
        "Teacher CFG, standard form u + s(c - u); 0 or 1: cond only. FastVideo/Self-Forcing value = ours - 1.",
        check=guidance_check),
    Key("real_score_guidance_scale_2", "float", None, "Teacher CFG where the second (low-noise) expert of a "
        "family with experts runs (Wan 2.2 A14B: t < boundary_ratio·1000; WanPipeline's guidance_scale_2), same "
        "form; real_score_guidance_scale is then the first (high-noise) expert's. Default: real_score_guidance_scale "
        "on both.", check=guidance_check, nullable=True),
    Key("real_score_guidance_interval", "any", [0.0, 1000.0], "Timesteps \"lo,hi\" (0..1000) where the teacher's "
        "CFG acts; at DMD timesteps outside, the teacher is cond only (a guidance interval, Kynkäänniemi et al. "
        "2024). Default: everywhere.", parse=parse_interval),
    Key("num_frame_per_block", "int", 3, "Latent frames per block of a block-causal rollout.",
        check=in_range(1)),
    Key("independent_first_frame", "bool", False, "Block layout [1, n, n, …] in a block-causal rollout."),
    Key("same_step_across_blocks", "bool", False, "All blocks exit at the same step (block-causal)."),
    Key("last_step_only", "bool", False, "Always exit the backward simulation at the last student step."),
    Key("context_noise", "float", 0.0, "Timestep to which fed-back context blocks are re-noised (block-causal).",
        check=in_range(0, 1000)),
    Key("kv_cache_window", "int", None, "Latent frames of context a block-causal student's sampler keeps in its "
        "KV cache (a rolling window, for clips longer than training); default: all.", check=in_range(1),
        nullable=True),
    Key("negative_prompt", "str", None, "Negative prompt of the teacher's unconditional branch (default: "
        "validation_negative_prompt).", nullable=True),
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
)}
"""The keys of a few-step student trained at exit steps against the teacher's ODE pairs, by name: each method's
schema takes the ones it has from here (same name, meaning and default everywhere)."""

def second_scale_warnings(config: dict[str, Any], family_cls: type) -> list[str]:
    """``real_score_guidance_scale_2`` given for a family whose network has no experts (``expert_guidance`` None):
    one warning naming the key and the family (the teacher uses ``real_score_guidance_scale`` everywhere)."""
    if config.get("real_score_guidance_scale_2") is None or getattr(family_cls, "expert_guidance", None) is not None:
        return []
    return [f"distillation_config.real_score_guidance_scale_2: has no effect with the family {family_cls.name!r} (one "
            f"network, no experts switched by timestep); the teacher uses real_score_guidance_scale everywhere"]


# The keys that only act in a block-causal (self-forcing) rollout, with their defaults.
BLOCK_ONLY_KEYS = ("num_frame_per_block", "independent_first_frame", "same_step_across_blocks", "context_noise",
                   "kv_cache_window")

# --------------------------------------------------------------------------- the exit draws


def draw_exit_index(num_steps: int, *, last_step_only: bool, generator: torch.Generator | None) -> int:
    """k ~ U{0, …, K−1} from a generator seeded alike on every process (so every rank exits at the same k)."""
    if last_step_only:
        return num_steps - 1
    return int(torch.randint(num_steps, (1,), generator=generator).item())


def draw_block_exits(num_blocks: int, num_steps: int, *, last_step_only: bool, same_step_across_blocks: bool,
                     generator: torch.Generator | None) -> list[int]:
    """One exit index per block, ``U{0, …, K−1}`` from the step's generator (equal on every process);
    ``last_step_only``: K−1 for every block; ``same_step_across_blocks``: every block exits at the first block's."""
    if last_step_only:
        return [num_steps - 1] * num_blocks
    draws = torch.randint(num_steps, (num_blocks,), generator=generator).tolist()
    return [draws[0]] * num_blocks if same_step_across_blocks else draws


# --------------------------------------------------------------------------- the regression at an exit step

PSEUDO_HUBER_C = 0.00054  # iCT's c for a unit-dimension sample: its sqrt(|δ|² + (c·√d)²) − c·√d, divided by √d


def regression_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, metric: str) -> torch.Tensor:
    """DMD v1's regression term in latent space, fp32: ``l2`` ``mean((x̂0 − x0)²)``; ``l1`` ``mean|x̂0 − x0|``;
    ``pseudo_huber`` ``sqrt(mean_sample((x̂0 − x0)²) + c²) − c`` per sample, averaged (iCT's pseudo-Huber distance
    divided by √d, so ``c`` does not depend on the latent size)."""
    diff = x0_student.float() - x0_teacher.float()
    if metric == "l2":
        return torch.mean(diff ** 2)
    if metric == "l1":
        return torch.mean(diff.abs())
    if metric == "pseudo_huber":
        per_sample = (diff ** 2).flatten(1).mean(1)
        return torch.mean(torch.sqrt(per_sample + PSEUDO_HUBER_C ** 2) - PSEUDO_HUBER_C)
    raise ValueError(f"unknown regression metric {metric!r}")


def exit_regression(nets: Any, pairs: Any, cond: Any, steps: list[int], *, last_step_only: bool, metric: str,
                    generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
                    ) -> tuple[torch.Tensor, int]:
    """``metric(G(x_{t_k}, t_k), x0)`` on a batch of the teacher's ODE pairs (``ode_pairs.ODEPairBatch``: the states
    ``x_{t_k}`` at every student step and the solution ``x0``), k drawn with ``draw_exit_index`` from ``generator``;
    the student ``G`` called through ``nets`` (``networks.Networks``: a counted training pass with a graph, its
    backward counted too). Returns the loss and k."""
    k = draw_exit_index(len(steps), last_step_only=last_step_only, generator=generator)
    t = torch.full((len(pairs),), float(steps[k]), device=device)
    x = pairs.states[:, k].to(dtype)
    x0 = flow_to_x0(x, nets.flow(x, t, cond), t)
    nets.passes.on_backward(x0, "student")
    return regression_loss(x0, pairs.x0, metric), k


# --------------------------------------------------------------------------- method-state save/load

STATE_FILE = "state.json"


@dataclass
class Weights:
    """Named trained tensors (an adapter's, a head's), saved as ``<name>.safetensors`` (``state_io.save_weights``)
    and copied back in place by name (``state_io.load_weights_into``; ``what`` names them in its error)."""
    tensors: dict[str, torch.Tensor]
    what: str = "weights"


Part = Any  # Weights, or an optimizer (anything with state_dict / load_state_dict)


def _file(name: str, part: Part) -> str:
    return f"{name}.safetensors" if isinstance(part, Weights) else f"{name}.json"


def save_method_state(checkpoint_dir: Path, method: str, accelerator: Any, state: dict[str, Any],
                      parts: dict[str, Part] | None = None) -> Path | None:
    """Write a method's state into ``<checkpoint_dir>/<method>/`` (the body of a ``distill_save_state``): each of
    ``parts`` by name — ``Weights`` as ``<name>.safetensors``, an optimizer's ``state_dict()`` as ``<name>.json`` +
    ``<name>.safetensors`` (``state_io.save_state``) — then ``state`` (JSON-able counters) as ``state.json``. Only
    the main process writes; returns the folder there, None elsewhere."""
    if not accelerator.is_main_process:
        return None
    folder = Path(checkpoint_dir) / method
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (parts or {}).items():
        if isinstance(part, Weights):
            save_weights(part.tensors, folder / _file(name, part))
        else:
            save_state(folder / name, part.state_dict())
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def load_method_state(checkpoint_dir: Path, method: str, written_by: str, parts: dict[str, Part] | None = None, *,
                      check: Callable[[dict[str, Any]], None] | None = None, state_first: bool = True
                      ) -> dict[str, Any]:
    """Restore what ``save_method_state`` wrote (the body of a ``distill_load_state``) and return ``state.json``'s
    counters. Every file is checked first (``state.json`` before or after ``parts``' files, ``state_first``): a
    missing one is a ``UserError`` naming it and ``written_by`` (\"a DMD run\"); then ``check(state)`` may refuse
    the checkpoint before anything is loaded; then each part is loaded in place, in order."""
    parts = parts or {}
    folder = Path(checkpoint_dir) / method
    files = [_file(name, part) for name, part in parts.items()]
    files = [STATE_FILE, *files] if state_first else [*files, STATE_FILE]
    for name in files:
        if not (folder / name).is_file():
            raise UserError(f"checkpoint {checkpoint_dir} has no {method}/{name}: it was not written by {written_by}")
    state = json.loads((folder / STATE_FILE).read_text())
    if check is not None:
        check(state)
    for name, part in parts.items():
        if isinstance(part, Weights):
            load_weights_into(part.tensors, folder / _file(name, part), part.what)
        else:
            part.load_state_dict(load_state(folder / name))
    return state


__all__ = ["BLOCK_ONLY_KEYS", "PSEUDO_HUBER_C", "REGRESSION_METRICS", "SHARED_KEYS", "STATE_FILE", "Weights",
           "draw_block_exits", "draw_exit_index", "exit_regression", "guidance_check", "load_method_state",
           "parse_interval", "parse_latent_shape", "parse_prompts", "regression_loss", "save_method_state",
           "second_scale_warnings"]


# --------------------------------------------------------------------------- the few-step student's sampling


class FewStepStudent:
    """Sampling for a method whose student runs through its ``dmd_denoising_steps`` (DMD, and ``ode_init``, whose
    student is the DMD student of the same keys): a base class beside ``MethodBase``. The method sets ``self.cfg``
    (its config), ``self.steps`` (the denoising steps), ``self.family``, ``self.student``, ``self.nets`` and
    ``self.causal`` (the family's ``causal``)."""

    @staticmethod
    def streaming(config: dict[str, Any]) -> dict[str, Any]:
        """How a block-causal student of this config must be run (``fewstep_sampling.streaming_settings``)."""
        return streaming_settings(config)

    @hookimpl
    def distill_sampler(self):
        """The student through its ``dmd_denoising_steps`` (``fewstep_sampling.few_step_sampler``); a block-causal
        family's student streamed block by block through the KV cache, as it was trained."""
        cfg = self.cfg
        return few_step_sampler(self.family, self.student, self.nets.sample_flow, self.steps, causal=self.causal,
                                frames_per_block=cfg["num_frame_per_block"],
                                independent_first_frame=cfg["independent_first_frame"],
                                context_noise=cfg["context_noise"], window=cfg["kv_cache_window"])

    @hookimpl
    def distill_scheduler(self):
        """The few-step scheduler stock pipelines sample the student with (saved at the export)."""
        from .fewstep_scheduler import FewStepFlowScheduler  # diffusers: loaded when the export asks, not before

        return FewStepFlowScheduler(few_step_timesteps=list(self.steps))
