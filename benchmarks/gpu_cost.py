"""GPU cost of DMD on Wan 2.1's real architectures: step time and peak memory, plain LoRA vs DMD shared base vs DMD
full copy. One prepared command, about 8 minutes on one H100:

    python -m benchmarks.gpu_cost                         # Wan 1.3B and 14B, 480x832x81 (latents 16x21x60x104)
    python -m benchmarks.gpu_cost --memory-cap-gib 79.6   # on a bigger card: allow only what an 80 GB H100 has
    python -m benchmarks.gpu_cost --run tiny:dmd --run tiny:lora --device cpu --steps 1   # the code path on a CPU
    python -m benchmarks.gpu_cost --run 1.3b:dmd+bf16 --run 1.3b:dmd+bf16+fsdp --run 1.3b:dmd+bf16+cp1 --steps 3
                                                          # FSDP2 and context parallelism on one GPU (ONE_GPU_PARALLEL)

The runs go in the order given (default: the most telling first — 14B DMD, 14B LoRA, then 1.3B, then the 14B full
copy), each in its own process; ``--budget-s`` skips the runs that would start after it is spent, and the result files
are rewritten after every run, so a run cut short still leaves what it measured.

The weights are random, built directly on the device in bf16 from the published configs (no download); the base is
int8 (optimum-quanto), the student and fake-score LoRAs have rank 128, gradient checkpointing is on. Each
(model, configuration) runs in a fresh process so that ``torch.cuda.max_memory_allocated`` is its own; running out of
memory is a result (recorded as OOM with the memory reached), not a failure of the benchmark.

Writes ``benchmarks/results/gpu_cost_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .cost_setup import TINY, WAN_1_3B, WAN_14B, build, quiet, train_step

MODELS = {
    "1.3b": (WAN_1_3B, (1, 16, 21, 60, 104), (1, 512, 4096)),
    "14b": (WAN_14B, (1, 16, 21, 60, 104), (1, 512, 4096)),
    "tiny": (TINY, (1, 16, 3, 8, 8), (1, 8, 32)),
}
KINDS = {"lora": "plain LoRA fine-tuning", "dmd": "DMD, fake score = adapter on the shared base",
         "dmd_full": "DMD, fake score = full trainable copy",
         "dmd_causal": "DMD, Self-Forcing rollout (wan-causal, blocks of 3 latent frames, KV cache), adapter on the "
                       "shared base",
         "dmd_experts": "DMD on Wan 2.2 A14B's layout (wan2.2: two experts of this size, boundary 0.875), adapters on "
                        "both"}
RESULTS = Path(__file__).parent / "results"


DEFAULT_RUNS = ("14b:dmd", "14b:lora", "1.3b:dmd", "1.3b:lora", "1.3b:dmd_causal", "14b:dmd_experts@79.6",
                "1.3b:dmd_full", "14b:dmd_full")
# A run's options (``+NAME``): the host keys each sets, on top of the run's own (``cost_setup.host_config``).
OPTIONS = {"offload": {"activation_offload": True}, "bf16": {"base_model_precision": "no_change"},
           "fsdp": {"fsdp_enable": True}, "cp1": {"context_parallel_size": 1}}
OPTION_LABELS = {"offload": "activation offload", "bf16": "bf16 base", "fsdp": "fsdp_enable on 1 process",
                 "cp1": "context_parallel_size 1"}
# Issue 29: FSDP2 and context parallelism with one process are the single-process path; these rows measure that they
# cost nothing against the plain run, side by side (a sharded base is bf16, so all three are)
ONE_GPU_PARALLEL = ("1.3b:dmd+bf16", "1.3b:dmd+bf16+fsdp", "1.3b:dmd+bf16+cp1")


def run_one(model: str, kind: str, steps: int, device: str, rank: int, memory_cap_gib: float | None = None,
            options: tuple[str, ...] = ()) -> dict:
    """In a fresh process: build, one warm-up step, then ``steps`` timed steps. ``options``: names in ``OPTIONS``."""
    config, latents, text = MODELS[model]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    offload = "offload" in options
    host_keys = {k: v for name in options if name != "offload" for k, v in OPTIONS[name].items()}
    result = {"model": model, "kind": kind, "device": device, "offload": offload, "options": list(options),
              "host_keys": host_keys}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        result["gpu"] = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        result["gpu_memory_gib"] = total
        if memory_cap_gib is not None and memory_cap_gib < total:  # the caching allocator refuses past the cap
            torch.cuda.set_per_process_memory_fraction(memory_cap_gib / total)
            result["memory_cap_gib"] = memory_cap_gib
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in bf16 directly: a fp32 14B would not fit beside its copy
    try:
        with quiet():
            setup = build(kind, config=config, latent_shape=latents, text_shape=text, quantize="bf16" not in options,
                          frames_per_block=3, checkpointing=True, rank=rank, dtype=dtype, device=device,
                          host_overrides=host_keys)
    finally:
        torch.set_default_dtype(previous)
    result["build_s"] = time.perf_counter() - start
    result["network"] = type(setup.network).__name__  # what the passes call: a wrapper when the host spreads the run
    if device == "cuda":  # building holds bf16 weights before int8 (two experts: both): apart from the steps' peak
        result["build_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    print(f"  built in {result['build_s']:.0f} s", file=sys.stderr, flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    try:
        for step in range(steps + 1):  # the first step warms up kernels and creates optimizer state
            sync()
            t0 = time.perf_counter()
            train_step(setup, step, offload=offload)
            sync()
            print(f"  step {step}{' (warm-up)' if not step else ''}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
            if step:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as exc:  # a measured outcome: this configuration does not fit this device
        result.update(oom=True, error=str(exc).splitlines()[0])
    else:
        result.update(oom=False, step_s=sorted(times)[len(times) // 2] if times else None, step_s_all=times)
    if device == "cuda":  # the steps' own peak (weights, states, activations), and the larger of it and the build's
        result["steps_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result["max_memory_allocated_gib"] = max(result["steps_max_memory_allocated_gib"],
                                                 result["build_max_memory_allocated_gib"])
    if setup.method is not None:
        result["passes"] = setup.method.last_step_passes
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", metavar="MODEL:KIND[+OPTION...][@CAP]",
                        help=f"repeatable, in order; MODEL in {sorted(MODELS)}, KIND in {sorted(KINDS)}; OPTION in "
                             f"{sorted(OPTIONS)} (offload: activation_offload; bf16: the base not quantized; fsdp: "
                             f"fsdp_enable; cp1: context_parallel_size 1); @CAP: this run's memory cap in GiB (39.5: "
                             f"a 40 GB A100); default: {' '.join(DEFAULT_RUNS)}; the single-GPU FSDP2 and context-"
                             f"parallel rows: {' '.join(ONE_GPU_PARALLEL)}")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="on a larger card, let each run allocate at most this much (79.6: an 80 GB H100)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no run after this many seconds, and stop a run that would end past it")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--options", default="", help=argparse.SUPPRESS)  # with --one: OPTION names, comma-separated
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.one:
        options = tuple(name for name in args.options.split(",") if name)
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.device, args.rank, args.memory_cap_gib,
                                 options=options)), flush=True)
        return 0
    runs = []
    for spec in args.run or DEFAULT_RUNS:
        head, _, cap = spec.partition("@")
        model, _, kind = head.partition(":")
        kind, *options = kind.split("+")
        try:
            cap_gib = float(cap) if cap else args.memory_cap_gib
        except ValueError:
            cap_gib = -1.0
        if model not in MODELS or kind not in KINDS or set(options) - set(OPTIONS) or (cap_gib or 0) < 0:
            parser.error(f"--run {spec}: want MODEL:KIND[+OPTION...][@CAP] with MODEL in {sorted(MODELS)}, KIND in "
                         f"{sorted(KINDS)} and OPTION in {sorted(OPTIONS)}")
        refused = _host_refusals(kind, tuple(options))
        if refused:
            parser.error(f"--run {spec}: " + "; ".join(refused))
        runs.append((model, kind, tuple(options), cap_gib))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --run tiny:dmd to try the code path", file=sys.stderr)
        return 2

    rows, start = [], time.monotonic()
    for model, kind, options, cap_gib in runs:
        offload = "offload" in options
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
        if left is not None and left <= 0:
            rows.append({"model": model, "kind": kind, "options": list(options), "skipped": "time budget spent"})
            print(f"{model} / {KINDS[kind]}: skipped (time budget spent)", flush=True)
            continue
        print(f"{model} / {_label(kind, options)} …", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.gpu_cost", "--one", model, kind, "--steps", str(args.steps),
               "--device", args.device, "--rank", str(args.rank), "--options", ",".join(options)]
        if cap_gib is not None:
            cmd += ["--memory-cap-gib", str(cap_gib)]
        try:  # the child's progress goes straight to our stderr; its last stdout line is its result
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1], timeout=left)
        except subprocess.TimeoutExpired:
            row = {"model": model, "kind": kind, "offload": offload, "options": list(options),
                   "skipped": "stopped: time budget spent during the run"}
        else:
            if proc.returncode != 0:  # e.g. the process was killed building a configuration that cannot fit
                row = {"model": model, "kind": kind, "offload": offload, "options": list(options), "failed": True,
                       "returncode": proc.returncode}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(args, rows)
    _write(args, rows, echo=True)
    return 0


def _host_refusals(kind: str, options: tuple[str, ...]) -> list[str]:
    """What the reference host's ``validate-config`` refuses about this run's host keys (``fsdp_enable`` with an int8
    base, …), one line each."""
    from simpletuner_dmd.hosts.reference.fsdp import fsdp_problems

    from .cost_setup import host_config

    keys = {k: v for name in options if name != "offload" for k, v in OPTIONS[name].items()}
    host = host_config(rank=16, checkpointing=True, quantize="bf16" not in options, dtype=torch.bfloat16, **keys)
    host["model_type"] = "lora"  # every kind here trains the student as a LoRA
    return fsdp_problems(host)


def _label(kind: str, options) -> str:
    return ", ".join([KINDS[kind], *(OPTION_LABELS[name] for name in options)])


def _write(args: argparse.Namespace, rows: list[dict], echo: bool = False) -> None:
    device_name = next((r["gpu"] for r in rows if r.get("gpu")), args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_cost_" + "".join(c if c.isalnum() else "_" for c in device_name).strip("_").lower()
    (args.out / f"{stem}.json").write_text(json.dumps({"device": device_name, "argv": sys.argv[1:],
                                                        "memory_cap_gib": args.memory_cap_gib, "rows": rows}, indent=2))
    cap = "" if args.memory_cap_gib is None else f", each run capped at {args.memory_cap_gib} GiB"
    dtype = "bf16" if args.device == "cuda" else "fp32"
    lines = [(f"{device_name}{cap}; {dtype}, int8-quanto base (unless a row says bf16), LoRA rank {args.rank}, "
              f"gradient checkpointing, latents {MODELS[rows[0]['model']][1]}; median of {args.steps} steps after one "
              "warm-up"), "",
             "| model | configuration | cap (GiB) | step (s) | max_memory_allocated (GiB) | of it, the steps' own |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        what = _label(r["kind"], r.get("options") or (["offload"] if r.get("offload") else []))
        cap = r.get("memory_cap_gib", "—")
        if r.get("failed"):
            lines.append(f"| {r['model']} | {what} | {cap} | failed (exit {r['returncode']}) | — | — |")
            continue
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {what} | {cap} | not run ({r['skipped']}) | — | — |")
            continue
        step = "OOM" if r["oom"] else f"{r['step_s']:.2f}"
        mem = f"{r['max_memory_allocated_gib']:.1f}" if "max_memory_allocated_gib" in r else "—"
        own = f"{r['steps_max_memory_allocated_gib']:.1f}" if "steps_max_memory_allocated_gib" in r else "—"
        lines.append(f"| {r['model']} | {what} | {cap} | {step} | {mem} | {own} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
