"""``simpletuner-dmd estimate``: will this config fit my GPU? Peak memory, passes per step and a step-time range,
from the config alone — no weights are loaded (the network is built on PyTorch's ``meta`` device to count its
parameters, from the local folder's ``transformer/config.json`` or the family's published config for a hub id).

The peak is the larger of the two phases of an optimizer step (the student's backward, then the critic's):

    frozen weights       Linear weights at 1 byte (int8-quanto) or the compute dtype's (bf16: 2; ``mixed_precision:
                         no``, fp32: 4), other parameters at the compute dtype's
    adapter states       per trainable LoRA parameter: weight 4 B (fp32) + Adam moments (8 B; bf16: 4; 8-bit: 2),
                         plus its gradient (4 B) in its own phase; a full trainable copy: weight 2 B + moments 4 B,
                         plus its gradient (2 B) in its phase
    activations          with gradient checkpointing, each block's input: tokens × hidden × blocks × batch, at the
                         compute dtype's bytes (2, or 4 in fp32)
                         (without it, every block's saved tensors: blocks × the transient below); 0 on the GPU with
                         activation_offload (one block's input in flight, twice, stays)
    transient            one block's recompute and backward: tokens × (A·hidden + B·ffn) × batch, at the compute
                         dtype's bytes

``A`` and ``B`` are the only fitted numbers: calibrated on the two plain-LoRA rows of the recorded H200 run
(``benchmarks/results/gpu_cost_nvidia_h200.json``); ``tests/test_estimate.py`` checks every recorded row against
this model, within 10%. The model covers the training step of the denoising network: a host also holds its VAE
(and briefly its text encoder), and the validation decode needs its own memory; ``--gpu-memory`` should be the
card's usable memory (about 39.5 GiB for a 40 GB A100, 44.5 for a 48 GB card, 79.6 for an 80 GB H100).

Several GPUs (``Parallel``; ``--gpus N`` with ``--fsdp`` and/or ``--context-parallel C``), per GPU:

    data parallel only   every GPU holds everything above, plus DDP's gradient buckets (a copy of the trainable
                         gradients)
    FSDP2 over N         the frozen weights ÷ N, plus the unsharded weights of the block being gathered and of the
                         one prefetched (2 × one block's share); the adapters (student, fake score) stay whole on every
                         GPU with their states and gradients, as the reference host keeps them
                         (``hosts/reference/fsdp.py``: they are small, and averaged like DDP's); a full trainable copy
                         (``model_type: full``) is not sharded there either. The base is bf16 (int8-quanto tensors are
                         not DTensors)
    context parallel C   one sample's tokens split C ways (Ulysses: each GPU holds tokens ÷ C between the attention
                         calls, all heads ÷ C inside them): activations, transient and KV cache ÷ C; C divides the
                         attention heads and the latent tokens

These rows are the same model divided as the engines divide the tensors; they are not calibrated against a
multi-GPU measurement (no GPU, no NCCL here). ``benchmarks/fsdp_memory.py`` checks them on 2 CPU processes, through
``estimate_for_shape`` for its own model and latent (docs/cost.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from .errors import UserError

GIB = 2 ** 30
# The fitted transient coefficients (see the module docstring): d-sized and ffn-sized tensors per token of one block.
TRANSIENT_HIDDEN = 27.04
TRANSIENT_FFN = 2.604
RECORDED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_cost_nvidia_h200.json"
MOMENT_BYTES = {"fp32": 8, "bf16": 4, "8bit": 2}
# The recorded runs' networks (Wan 2.1 1.3B and 14B: parameters) and sample (480×832×81: tokens).
RECORDED_PARAMETERS = {"1.3b": 1_418_996_800, "14b": 14_288_491_584}
RECORDED_TOKENS = 32760


@dataclass
class Estimate:
    parts: dict[str, float]  # GiB, in the peak phase
    peak_gib: float
    phase: str  # which phase peaks
    passes: dict[str, float] | None
    notes: list[str] = field(default_factory=list)
    shape: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    setup_gib: float = 0.0  # set-up's peak per GPU where it is not the step's (FSDP2: the whole base before sharding)

    @property
    def need_gib(self) -> float:
        """What a GPU must hold at some point of the run: the step's peak, or set-up's where that is larger."""
        return max(self.peak_gib, self.setup_gib)


@dataclass(frozen=True)
class Parallel:
    """How one training step is spread over GPUs: ``gpus`` processes, the frozen base and the adapters sharded over
    all of them (``fsdp``), one sample's tokens split over groups of ``context_parallel`` of them."""

    gpus: int = 1
    fsdp: bool = False
    context_parallel: int = 1

    def describe(self) -> str:
        if self.gpus == 1:
            return "1 GPU"
        parts = [f"{self.gpus} GPUs"]
        parts.append("FSDP2" if self.fsdp else "data parallel")
        if self.context_parallel > 1:
            parts.append(f"context parallel {self.context_parallel}")
        return ", ".join(parts)


def parallel_problems(parallel: Parallel, config: dict, shape: dict[str, int], host: dict) -> list[str]:
    """What the engines refuse about ``parallel`` for this network and sample, one line each."""
    problems = []
    n, c = parallel.gpus, parallel.context_parallel
    if n < 1 or c < 1:
        problems.append(f"gpus {n} and context_parallel {c} must be at least 1")
        return problems
    if n % c:
        problems.append(f"context_parallel {c} must divide the number of GPUs ({n})")
    heads = config.get("num_attention_heads")
    if c > 1 and heads is not None and int(heads) % c:
        problems.append(f"context_parallel {c} must divide the network's {heads} attention heads (Ulysses splits them)")
    if c > 1 and shape["tokens"] % c:
        problems.append(f"context_parallel {c} must divide the sample's {shape['tokens']:,} latent tokens")
    if parallel.fsdp and host.get("base_model_precision") == "int8-quanto":
        problems.append("base_model_precision int8-quanto cannot be sharded with FSDP2 (optimum-quanto's int8 "
                        "tensors are not DTensors): use no_change (bf16)")
    return problems


def transformer_config(family: Any, model: str) -> dict:
    """The network's config: ``<model>/transformer/config.json`` (or ``<model>/config.json``), else the family's
    published config for a hub id."""
    folder = Path(model)
    for candidate in (folder / "transformer" / "config.json", folder / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    published = family.published_configs or {}
    if model in published:
        return dict(published[model])
    known = ", ".join(published) or "none"
    raise UserError(f"estimate: no transformer config for {model!r}: not a local model folder, and not a published "
                    f"{family.name} model this package knows (known: {known})")


def count_parameters(family: Any, config: dict, target_modules: tuple[str, ...], rank: int) -> dict[str, int]:
    import torch

    network = family.meta_network(config)
    linear = other = lora = 0
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            other += module.bias.numel() if module.bias is not None else 0
            if any(name == t or name.endswith("." + t) for t in target_modules):
                lora += rank * (module.in_features + module.out_features)
    total = sum(p.numel() for p in network.parameters())
    return {"total": total, "linear": linear, "other": total - linear, "lora_per_rank": lora // max(rank, 1)}


def estimate(*, family: Any, config: dict, host: dict, method_plan: dict | None, width: int, height: int,
             frames: int, offload: bool | None = None, moments: str | None = None,
             parallel: Parallel = Parallel()) -> Estimate:
    """The peak memory, per GPU, of one optimizer step of ``host`` (the reference host's keys) with ``method_plan`` (a
    method's ``memory_plan``; None: plain LoRA fine-tuning) on a sample of ``width`` × ``height`` × ``frames`` pixels,
    spread over GPUs as ``parallel`` says: ``estimate_for_shape`` with the family's ``activation_shape`` of it."""
    shape = family.activation_shape(config, width=width, height=height, frames=frames)
    return estimate_for_shape(family=family, config=config, shape=shape, host=host, method_plan=method_plan,
                              offload=offload, moments=moments, parallel=parallel)


def estimate_for_shape(*, family: Any, config: dict, shape: dict[str, int], host: dict, method_plan: dict | None,
                       offload: bool | None = None, moments: str | None = None,
                       parallel: Parallel = Parallel()) -> Estimate:
    """The estimate's model itself (the module docstring), per GPU, for the network ``config`` (a transformer config
    the family's ``meta_network`` builds) and one sample of ``shape`` (``{"tokens", "hidden", "ffn", "blocks"}``, as
    a family's ``activation_shape`` gives it, or as a benchmark's latent has it). The parts are the peak phase's; the
    frozen weights are what each GPU holds between the calls (its shards under FSDP2), and the blocks FSDP2 gathers
    during a call are their own part. With ``mixed_precision: no`` the step runs in fp32 (the reference host's weight
    dtype): every frozen weight and every activation at 4 bytes."""
    batch = host["train_batch_size"]
    rank = host["lora_rank"]
    offload = host.get("activation_offload", False) if offload is None else offload
    from .optimizers import moments_of

    moments = moments or moments_of(host.get("optimizer", "adamw"))  # "bf16": a what-if (no host option)
    params = count_parameters(family, config, tuple(family.lora_target_modules), rank)
    tokens, hidden, ffn, blocks = shape["tokens"], shape["hidden"], shape["ffn"], shape["blocks"]
    notes: list[str] = []

    fp32 = host.get("mixed_precision", "bf16") == "no"
    compute = 4 if fp32 else 2  # bytes of an activation, and of a frozen weight left unquantized
    linear_bytes = 1 if host["base_model_precision"] == "int8-quanto" else compute
    full_student = host["model_type"] == "full"
    frozen = params["linear"] * linear_bytes + params["other"] * compute
    moment = MOMENT_BYTES[moments]
    transient = tokens * (TRANSIENT_HIDDEN * hidden + TRANSIENT_FFN * ffn) * compute * batch
    if host.get("gradient_checkpointing", True):
        activations = tokens * hidden * blocks * compute * batch
        if offload:
            activations = 2 * tokens * hidden * compute * batch  # one block's input in flight, double-buffered
    else:
        activations = transient * blocks
        if offload:
            notes.append("activation_offload without gradient_checkpointing still keeps each block's working set")

    if full_student:
        student_states, student_grads = params["total"] * (2 + 4), params["total"] * 2
        notes.append("model_type full: the student is a full bf16 copy with its own frozen teacher")
        frozen += params["linear"] * linear_bytes
    else:
        lora = params["lora_per_rank"] * rank
        student_states, student_grads = lora * (4 + moment), lora * 4
    fake_states = fake_grads = 0
    second = (method_plan or {}).get("second_network")
    if second:
        if second["kind"] == "lora":
            lora = params["lora_per_rank"] * int(second["rank"] or rank)
            fake_states, fake_grads = lora * (4 + moment), lora * 4
        else:
            fake_states, fake_grads = params["total"] * (2 + 4), params["total"] * 2
    shard = parallel.gpus if parallel.fsdp else 1
    split = parallel.context_parallel
    # The reference host builds the whole base on each GPU and then shards it (build_models, fsdp.shard_frozen_base):
    # at set-up a GPU holds every frozen weight and the trainable weights (fp32; no optimizer moments yet).
    setup = frozen + (student_states + fake_states) * 4 / (4 + moment) if shard > 1 and not full_student else 0.0
    gathered = 0.0
    if parallel.gpus > 1 or split > 1:
        # one block's share of the frozen weights (a call runs one expert of several: its blocks only)
        gathered = 2 * frozen * float(family.active_parameter_share) / blocks if shard > 1 else 0.0
        if not parallel.fsdp and parallel.gpus > 1:  # DDP's buckets: a copy of the trainable gradients
            student_grads, fake_grads = 2 * student_grads, 2 * fake_grads
        frozen = frozen / shard  # the adapters, their states and gradients stay whole (docstring)
        activations, transient = activations / split, transient / split
        notes.append(f"{parallel.describe()}: per GPU" + ("; the frozen weights are this GPU's shards, and FSDP2 "
                                                          "gathers 2 blocks whole during each call" if gathered else ""))
    states = student_states + fake_states
    # a method whose student loss holds several forward graphs at its backward (DMD's regression term) saves each
    graphs = (method_plan or {}).get("student_graphs", 1)
    # a block-causal rollout's KV cache: keys and values of every layer for the cached share of the clip's tokens,
    # in the compute dtype, held through the student's backward
    kv_cache = (method_plan or {}).get("kv_cache_share", 0.0) * tokens * hidden * blocks * 2 * compute * batch / split
    held = frozen + gathered
    student_phase = held + states + student_grads + activations * graphs + transient + kv_cache
    if second and second["kind"] == "full":
        # a full copy's gradients grow as the backward frees the activations: the peak is the larger of the two
        critic_phase = held + states + max(activations + transient, fake_grads + transient)
    else:
        critic_phase = held + states + fake_grads + activations + transient
    phase = "student" if student_phase >= critic_phase or not second else "critic"
    peak = max(student_phase, critic_phase) if second else student_phase
    grads = student_grads if phase == "student" else fake_grads
    saved = activations * graphs if phase == "student" else activations
    parts = {"frozen weights": frozen / GIB}
    if gathered:
        parts["FSDP2 blocks gathered in flight"] = gathered / GIB
    parts.update({"adapter and optimizer states": states / GIB, f"{phase} gradients": grads / GIB,
                  "activations": saved / GIB, "transient": transient / GIB})
    if kv_cache and phase == "student":
        parts["KV cache (block-causal rollout)"] = kv_cache / GIB
    passes = (method_plan or {}).get("passes_per_step") if method_plan is not None else {
        "student_forward": 1, "student_backward": 1}
    if setup > peak:
        notes.append(f"set-up holds {setup / GIB:.1f} GiB per GPU, more than the step: the reference host loads the "
                     f"whole base onto each GPU before FSDP2 shards it (loading each GPU's shards only is not done)")
    return Estimate(parts, peak / GIB, phase, passes, notes, shape, params, setup_gib=setup / GIB)


GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def setups(gpus: int) -> list[Parallel]:
    """The ways to spread a step over ``gpus`` GPUs that can lower each one's memory, cheapest communication first:
    one GPU; FSDP2; FSDP2 with context parallelism of 2, 4, … up to ``gpus``. (Data parallelism alone holds everything
    on every GPU.)"""
    if gpus == 1:
        return [Parallel()]
    found = [Parallel(gpus, fsdp=True)]
    c = 2
    while c <= gpus:
        if gpus % c == 0:
            found.append(Parallel(gpus, fsdp=True, context_parallel=c))
        c *= 2
    return found


def smallest_fitting(gpu_gib: float, run: Callable[[Parallel, dict], Estimate], host: dict, config: dict,
                     shape: dict[str, int], counts: tuple[int, ...] = GPU_COUNTS) -> tuple[Parallel, Estimate] | None:
    """The fewest GPUs (then the least context parallelism) whose per-GPU need (``Estimate.need_gib``: the step's
    peak, or set-up's) fits ``gpu_gib``: ``run(parallel,
    host)`` estimates one setup; a sharded base is bf16 (``no_change``), as FSDP2 needs. None when nothing up to the
    largest count fits."""
    for gpus in counts:
        for parallel in setups(gpus):
            sharded_host = {**host, "base_model_precision": "no_change"} if parallel.fsdp and host.get(
                "base_model_precision") == "int8-quanto" else host
            if parallel_problems(parallel, config, shape, sharded_host):
                continue
            est = run(parallel, sharded_host)
            if est.need_gib <= gpu_gib:
                return parallel, est
    return None


def recorded_rows(path: Path = RECORDED) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def step_time_range(est: Estimate, family: Any, method_plan: dict | None) -> str | None:
    """A range from the recorded GPU runs, scaled by tokens × parameters from the nearest recorded model."""
    rows = [r for r in recorded_rows() if not r.get("oom") and r.get("step_s")]
    if not rows:
        return None
    sizes = RECORDED_PARAMETERS
    kind = "lora" if method_plan is None else ("dmd_full" if (method_plan.get("second_network") or {}).get(
        "kind") == "full" else "dmd")
    # a network of experts runs one of them per call: its work is that share of its parameters
    work = est.parameters["total"] * float(family.active_parameter_share) * est.shape["tokens"]
    best = None
    for row in rows:
        if row["kind"] != kind or row["model"] not in sizes:
            continue
        recorded_work = sizes[row["model"]] * RECORDED_TOKENS
        ratio = work / recorded_work
        if best is None or abs(ratio - 1) < abs(best[1] - 1):
            best = (row, ratio)
    if best is None:
        return None
    row, ratio = best
    seconds = row["step_s"] * ratio
    def fmt(x: float) -> str:  # whole seconds, or two figures below 10 s (a small sample's step is a fraction)
        return f"{x:.0f}" if x >= 10 else f"{x:.2g}"

    return (f"{fmt(0.8 * seconds)}–{fmt(1.3 * seconds)} s per step on an {row['gpu']}-class GPU (recorded: "
            f"{row['step_s']:.1f} s for Wan {row['model']} {row['kind']} at 480×832×81, scaled by parameters run per call × "
            f"tokens {ratio:.2f}×)")


def one_time_line(plan: dict | None, per_step: dict[str, float] | None, host: dict) -> str | None:
    """The passes a method pays once before its first step (``memory_plan``'s ``one_time_passes``: the teacher's ODE
    pairs of DMD's regression term or ``ode_init``), with what they weigh against the run's own teacher passes."""
    once = (plan or {}).get("one_time_passes")
    if not once:
        return None
    line = ("once, before the first step (cached in cache_dir, reused by every run with the same keys): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in once.items()))
    per = (per_step or {}).get("teacher_forward_samples") or 0.0
    steps = host.get("max_train_steps")
    if per and steps:
        line += (f" — {once['teacher_forward_samples'] / (per * steps):.2g}× the teacher forward samples of the run's "
                 f"{steps} steps")
    return line


def advice(est: Estimate, gpu_gib: float, host: dict) -> list[str]:
    """What to change when it does not fit, largest saving first."""
    tips = []
    if est.parts["activations"] > 1 and not host.get("activation_offload"):
        tips.append(f"activation_offload: true (saves about {est.parts['activations']:.1f} GiB)")
    if host["base_model_precision"] != "int8-quanto":
        tips.append("base_model_precision: int8-quanto (the frozen Linear weights at 1 byte)")
    if not host.get("gradient_checkpointing", True):
        tips.append("gradient_checkpointing: true")
    tips.append("a lower resolution or fewer frames (activations scale with tokens), or a lower lora_rank")
    return tips


def layout_for(family: Any, frames: int) -> dict[str, Any]:
    """The ``layout`` a method's ``memory_plan`` takes: the sample's latent frames and whether the family is
    block-causal (a causal rollout's passes depend on both)."""
    stride = int(family.frame_stride or 1)
    return {"causal": bool(family.causal), "latent_frames": 1 + (max(1, int(frames)) - 1) // stride}


def print_estimate(args, rc: Any) -> int:
    """The ``estimate`` command: estimate ``rc`` (the host's validated config — the reference host's ``load_config``,
    paths not required, which ``cli.py`` calls), print; 0 when it fits (or no ``--gpu-memory`` was given), 1 when it
    does not. ``rc`` gives ``host`` (the host keys), ``family_cls``, ``method_cls``, ``method_name`` and
    ``method_config``."""
    host, family = rc.host, rc.family_cls(autocast_dtype=None)
    for member, value in (("meta_network", family.meta_network), ("activation_shape", family.activation_shape)):
        if value is None:
            raise UserError(f"estimate: the {family.name} family does not describe its memory ({member})")
    plan = None
    width = args.width or host["validation_resolution"][0]
    height = args.height or host["validation_resolution"][1]
    frames = args.frames or host["validation_num_video_frames"]
    if rc.method_cls is not None:
        plan = rc.method_cls.memory_plan(rc.method_config, host, layout_for(family, frames))
    config = transformer_config(family, str(host["pretrained_model_name_or_path"]))
    parallel = Parallel(args.gpus, fsdp=args.fsdp, context_parallel=args.context_parallel)
    shape = family.activation_shape(config, width=width, height=height, frames=frames)
    problems = parallel_problems(parallel, config, shape, host)
    if problems:
        raise UserError("estimate: " + "; ".join(problems))

    def run(setup: Parallel, setup_host: dict) -> Estimate:
        return estimate_for_shape(family=family, config=config, shape=shape, host=setup_host, method_plan=plan,
                                  parallel=setup)

    est = run(parallel, host)
    method = rc.method_name or "plain LoRA fine-tuning"
    print(f"{family.name} ({est.parameters['total'] / 1e9:.2f}B parameters), {method}; sample {width}×{height}×"
          f"{frames} → {est.shape['tokens']:,} tokens, batch {host['train_batch_size']}, LoRA rank "
          f"{host['lora_rank']}, base {host['base_model_precision']}, gradient checkpointing "
          f"{'on' if host['gradient_checkpointing'] else 'off'}, activation offload "
          f"{'on' if host['activation_offload'] else 'off'}")
    per = "" if parallel.gpus == 1 else f" per GPU ({parallel.describe()})"
    print(f"peak GPU memory{per} ≈ {est.peak_gib:.1f} GiB (the {est.phase}'s backward):")
    for name, gib in est.parts.items():
        print(f"  {name:<32} {gib:7.2f} GiB")
    if rc.method_cls is not None and not plan:
        print(f"  note: {rc.method_name} declares no memory plan; its own networks and passes are not counted")
    if est.passes:
        print("network passes per optimizer step: " + ", ".join(f"{k} {v:g}" for k, v in est.passes.items()))
    once = one_time_line(plan, est.passes, host)
    if once:
        print(once)
    timing = step_time_range(est, family, plan if rc.method_cls is not None else None)
    if timing:
        print(f"step time: {timing}")
    for note in est.notes:
        print(f"note: {note}")
    if args.gpu_memory is None:
        return 0
    if est.need_gib <= args.gpu_memory:
        print(f"fits in {args.gpu_memory:g} GiB ({args.gpu_memory - est.need_gib:.1f} GiB to spare)")
        return 0
    print(f"does not fit in {args.gpu_memory:g} GiB (over by {est.need_gib - args.gpu_memory:.1f} GiB); change:")
    for tip in advice(est, args.gpu_memory, host):
        print(f"  - {tip}")
    found = smallest_fitting(args.gpu_memory, run, host, config, shape)
    if found is None:
        print(f"  - no setup of up to {GPU_COUNTS[-1]} GPUs fits {args.gpu_memory:g} GiB as configured")
    else:
        print(f"  - or the smallest setup that fits: {found[0].describe()} ({found[1].need_gib:.1f} GiB per GPU"
              + (", base bf16" if found[0].fsdp and host.get("base_model_precision") == "int8-quanto" else "") + ")")
    return 1


__all__ = ["GPU_COUNTS", "Estimate", "Parallel", "advice", "estimate", "estimate_for_shape", "parallel_problems",
           "print_estimate", "recorded_rows", "setups", "smallest_fitting", "step_time_range", "transformer_config"]
