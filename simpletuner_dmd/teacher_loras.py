"""The user's own LoRAs as the teacher, and one combined fast LoRA out ("distil your own model", issue 30).

``teacher_loras`` (a host key) lists LoRA files with scales — ``[{"path": "style.safetensors", "scale": 0.8}]``; a
plain string is a path at scale 1.0; ``"into"`` names the pipeline part a file belongs to (default ``"transformer"``;
Wan 2.2 A14B: ``"transformer_2"`` for its low-noise expert, as diffusers' ``load_into_transformer_2``). Each file may be
in the diffusers layout or in the model's original (ComfyUI) layout: it is read through the family's stock pipeline
class's ``lora_state_dict`` (diffusers' own conversion of the original layout; rank and alpha from the file's metadata,
else scale 1, as ``load_lora_weights`` does).

``merge_teacher_loras`` adds ``scale · (alpha / rank) · B @ A`` to each weight the file names, in fp32, into the frozen
base as it is loaded — before it is quantized or sharded — so the teacher, the student's base and the fake score's base
are all the user's model. A file that does not fit the base is one ``UserError`` naming the first key that does not.

``combined_lora`` is the other end: the student LoRA (trained on top of the user's model) and the user's LoRAs as one
LoRA for the *stock* base. The deltas are concatenated by rank, so the sum is exact::

    A = [A_user_1; …; A_student]     B = [f_1 · B_user_1, …, f_student · B_student]     (peft scale 1: alpha = rank)

where ``f`` is each source's own factor (its scale times its alpha / rank). Every module gets the same rank ``R`` (the
sum of each source's largest rank), a source's block zero-padded where it is smaller or where it does not touch the
module (zeros add nothing), so one ``LoraConfig`` describes the file and stock loaders read it as they read any LoRA.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import UserError

KEY = "teacher_loras"
ENTRY_KEYS = ("path", "scale", "into")


@dataclass(frozen=True)
class LoraDelta:
    """One module's low-rank delta: ``ΔW = factor · up @ down`` (``down``: A, ``(r, in)``; ``up``: B, ``(out, r)``)."""

    down: torch.Tensor
    up: torch.Tensor
    factor: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# --------------------------------------------------------------------------- the key


def parse_teacher_loras(value: Any) -> list[dict[str, Any]]:
    """The key's value → ``[{"path": str, "scale": float, "into": str}, …]`` (the config's ``Key.parse``). A string is
    one path at scale 1.0; a list holds strings or objects with ``path`` (required), ``scale`` (a finite number,
    default 1.0) and ``into`` (default ``"transformer"``). Raises ValueError naming the first bad entry."""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"must be a list of LoRA files ({{\"path\": …, \"scale\": …}} or a path), got "
                         f"{type(value).__name__} {value!r}")
    entries = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ValueError(f"[{i}]: must be a path or an object {{\"path\": …, \"scale\": …}}, got {item!r}")
        unknown = sorted(set(item) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(f"[{i}]: unknown key {unknown[0]!r} (an entry has {', '.join(ENTRY_KEYS)})")
        path, scale, into = item.get("path"), item.get("scale", 1.0), item.get("into", "transformer")
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise ValueError(f"[{i}].path: must name a LoRA file, got {path!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"[{i}].scale: must be a finite number, got {scale!r}")
        if not isinstance(into, str):
            raise ValueError(f"[{i}].into: must be the name of a pipeline part like \"transformer\", got {into!r}")
        entries.append({"path": path, "scale": float(scale), "into": into})
    return entries


def teacher_lora_part_problems(entries: list[dict[str, Any]], family_cls: Any, *, prefix: str = "config"
                               ) -> list[str]:
    """One line per entry whose ``into`` is not one of the family's ``lora_parts`` (``validate-config``)."""
    parts = dict(family_cls.lora_parts)
    return [f"{prefix}.{KEY}[{i}].into: the {family_cls.name} family's LoRAs go into "
            f"{', '.join(map(repr, parts))}, got {entry['into']!r}"
            for i, entry in enumerate(entries) if entry["into"] not in parts]


def teacher_lora_file_problems(entries: list[dict[str, Any]], *, prefix: str = "config") -> list[str]:
    """One line per entry whose file is missing (``validate-config``, before anything loads)."""
    return [f"{prefix}.{KEY}[{i}].path: file not found: {entry['path']}"
            for i, entry in enumerate(entries) if not Path(entry["path"]).is_file()]


# --------------------------------------------------------------------------- reading a file


def _pipeline_class(family: Any) -> Any:
    """The pipeline class whose ``lora_state_dict`` reads the family's LoRA files: the family's ``lora_pipeline()``,
    else diffusers' class named ``pipeline_class``."""
    if family.lora_pipeline is not None:
        return family.lora_pipeline()
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _state_and_metadata(pipeline: Any, path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``pipeline.lora_state_dict(path)`` and the file's LoRA metadata. Pipelines whose loader returns a file's alphas
    apart (Flux's ``return_alphas``) get them back into the state as ``<module>.alpha`` keys."""
    import inspect

    if "return_alphas" not in inspect.signature(pipeline.lora_state_dict).parameters:
        return pipeline.lora_state_dict(path, return_lora_metadata=True)
    state, alphas, metadata = pipeline.lora_state_dict(path, return_alphas=True, return_lora_metadata=True)
    return {**state, **{k if k.endswith(".alpha") else f"{k}.alpha": torch.as_tensor(v)
                        for k, v in (alphas or {}).items()}}, metadata


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end of the module's name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_teacher_lora(family: Any, entry: dict[str, Any], *, index: int = 0) -> dict[str, LoraDelta]:
    """One entry's file as ``{module name in the family's network: LoraDelta}``, its scale folded into each factor.
    Keys outside the pipeline's transformer (a text encoder's) and keys that are no LoRA A/B weight (biases, DoRA …)
    raise ``UserError`` naming the first of them."""
    path, part = entry["path"], entry["into"]
    where = f"{KEY}[{index}]: {path}"
    if not Path(path).is_file():
        raise UserError(f"{where}: file not found")
    pipeline = _pipeline_class(family)
    try:
        state, metadata = _state_and_metadata(pipeline, path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{where}: not a LoRA file {family.pipeline_class} can read ({exc})") from exc
    # diffusers names a file's keys by the pipeline's transformer whichever part it goes into (Wan 2.2's second
    # expert's files too: `load_into_transformer_2` picks the part), so `into` places the modules, not the keys
    prefix = f"{getattr(pipeline, 'transformer_name', 'transformer')}."
    meta = {k.removeprefix(prefix): v for k, v in (metadata or {}).items()}
    if meta.get("use_dora") or meta.get("use_rslora") or meta.get("lora_bias"):
        raise UserError(f"{where}: DoRA, rsLoRA and LoRA biases cannot be merged; a plain LoRA only")
    network_prefix = dict(family.lora_parts)[part]
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        rest = key.removeprefix(prefix) if key.startswith(prefix) else None
        module, kind = (None, None)
        if rest is not None:
            for marker in (".lora_A.weight", ".lora_B.weight", ".alpha"):
                if rest.endswith(marker):
                    module, kind = rest[: -len(marker)], marker
                    break
        if module is None:
            raise UserError(f"{where} does not fit the {family.name} base: {key} is not a LoRA weight of "
                            f"{family.pipeline_class}'s {prefix[:-1]} (the merge takes its lora_A / lora_B weights)")
        if kind == ".alpha":
            alphas[module] = float(tensor)
        else:
            (downs if kind == ".lora_A.weight" else ups)[module] = tensor
    unpaired = sorted(set(ups) ^ set(downs))
    if unpaired:
        raise UserError(f"{where}: {prefix}{unpaired[0]} has only one of lora_A and lora_B")
    scale = entry["scale"]
    deltas = {}
    for module in sorted(downs):
        rank = int(downs[module].shape[0])
        if module in alphas:
            alpha = alphas[module]
        elif meta:
            alpha = float(_pattern_value(meta.get("alpha_pattern") or {}, module, meta.get("lora_alpha", rank)))
            rank_meta = int(_pattern_value(meta.get("rank_pattern") or {}, module, meta.get("r", rank)))
            alpha = alpha * rank / rank_meta if rank_meta != rank else alpha  # (peft's scale is alpha / r)
        else:
            alpha = float(rank)  # no metadata, no alpha: scale 1, as diffusers loads it
        deltas[network_prefix + module] = LoraDelta(downs[module], ups[module], scale * alpha / rank)
    if not deltas:
        raise UserError(f"{where}: no LoRA weights for the {family.name} family's {part}")
    return deltas


def read_teacher_loras(family: Any, entries: list[dict[str, Any]]) -> list[dict[str, LoraDelta]]:
    """Every entry's deltas, in order."""
    return [read_teacher_lora(family, entry, index=i) for i, entry in enumerate(entries)]


# --------------------------------------------------------------------------- the merge


def merge_teacher_loras(network: torch.nn.Module, family: Any, entries: list[dict[str, Any]]) -> list[str]:
    """Add every entry's deltas to ``network``'s weights in place (fp32 sums, stored in each weight's dtype). Every
    file is checked against the network before any weight changes: a module it names that the network lacks, or of
    another shape, is one ``UserError`` naming that key. Returns one log line per file."""
    loaded = read_teacher_loras(family, entries)
    modules = dict(network.named_modules())
    for i, deltas in enumerate(loaded):
        for name, delta in deltas.items():
            _check_fits(modules.get(name), name, delta, f"{KEY}[{i}]: {entries[i]['path']}", family)
    with torch.no_grad():
        for deltas in loaded:
            for name, delta in deltas.items():
                weight = modules[name].weight
                update = delta.factor * (delta.up.float() @ delta.down.float())
                weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))
    return [f"{KEY}: merged {entry['path']} (scale {entry['scale']:g}, {len(deltas)} modules of "
            f"{entry['into']}) into the frozen base" for entry, deltas in zip(entries, loaded)]


def _check_fits(module: Any, name: str, delta: LoraDelta, where: str, family: Any) -> None:
    def refuse(why: str):
        raise UserError(f"{where} does not fit the {family.name} base: {name}.lora_A.weight: {why}")

    if module is None:
        refuse("the base has no such module")
    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or weight is None:
        refuse(f"the base's module is a {type(module).__name__}, not a Linear layer")
    if delta.up.shape[1] != delta.rank:
        refuse(f"lora_A has rank {delta.rank}, lora_B {delta.up.shape[1]}")
    want = (int(delta.up.shape[0]), int(delta.down.shape[1]))
    if tuple(weight.shape) != want:
        refuse(f"the LoRA is {want[0]}x{want[1]} (out x in), the base's weight {weight.shape[0]}x{weight.shape[1]}")


# --------------------------------------------------------------------------- one combined LoRA


def combined_lora(student_state: dict[str, torch.Tensor], student_config: Any,
                  users: list[dict[str, LoraDelta]], parts: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], Any]:
    """The user's LoRAs (``read_teacher_loras``) and the student adapter (its peft state, keys
    ``<module>.lora_A.weight``, and its ``LoraConfig``) as one peft state and ``LoraConfig`` for the stock base (module
    docstring). ``parts``: the family's ``lora_parts`` (the target modules are named as within their pipeline part).
    fp32."""
    from peft import LoraConfig

    student_factor = float(student_config.lora_alpha) / float(student_config.r)
    student: dict[str, LoraDelta] = {}
    for key, tensor in student_state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            student[module] = LoraDelta(tensor, student_state[f"{module}.lora_B.weight"], student_factor)
    sources = [*users, student]
    widths = [max((d.rank for d in source.values()), default=0) for source in sources]
    rank = sum(widths)
    shapes = {name: (d.up.shape[0], d.down.shape[1]) for source in sources for name, d in source.items()}
    # One LoraConfig serves every part's file (Wan 2.2: one per expert), so every part gets every target module (zeros
    # where no source touches it there): a module named in the config but absent from a part's file makes peft warn.
    prefixes = [prefix for prefix in parts.values() if prefix and any(name.startswith(prefix) for name in shapes)]
    if len(prefixes) > 1:
        within = {_within_part(name, parts): shape for name, shape in shapes.items()}
        for prefix in prefixes:
            for name, shape in within.items():
                shapes.setdefault(prefix + name, shape)
    state: dict[str, torch.Tensor] = {}
    for name, (out_features, in_features) in sorted(shapes.items()):
        down = torch.zeros(rank, in_features)
        up = torch.zeros(out_features, rank)
        start = 0
        for source, width in zip(sources, widths):
            delta = source.get(name)
            if delta is not None:
                down[start:start + delta.rank] = delta.down.float()
                up[:, start:start + delta.rank] = delta.factor * delta.up.float()
            start += width
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    targets = sorted({_within_part(name, parts) for name in shapes})
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=True, target_modules=targets)
    return state, config


def _within_part(name: str, parts: Mapping[str, str]) -> str:
    """A network module's name as within its pipeline part (Wan 2.2's ``transformer_2.blocks.0…`` → ``blocks.0…``)."""
    for prefix in sorted(parts.values(), key=len, reverse=True):
        if prefix and name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


__all__ = ["KEY", "LoraDelta", "combined_lora", "merge_teacher_loras", "parse_teacher_loras", "read_teacher_lora",
           "read_teacher_loras", "teacher_lora_file_problems",
           "teacher_lora_part_problems"]
