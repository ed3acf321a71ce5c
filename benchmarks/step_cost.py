"""CPU cost of one DMD iteration, side by side with plain LoRA fine-tuning of the same model.

    python -m benchmarks.step_cost                 # mid-size Wan, about 3 minutes on 2 cores
    python -m benchmarks.step_cost --model tiny    # seconds (a smoke run)

All configurations are built in one process and timed interleaved, repeat after repeat, so that the machine's noise
hits them alike; the figures are medians. Memory is measured in a fresh process per configuration: the peak resident
set (``ru_maxrss``) minus the resident set just before the model is built, so imports are excluded and weights,
adapters, optimizer states and activations are included.

Writes ``benchmarks/results/step_cost.json`` and ``step_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from .cost_setup import CPU_MID, TINY, build, quiet, timed, train_step, unavoidable_passes

MODELS = {"mid": (CPU_MID, (1, 16, 5, 16, 16), (1, 64, 256)), "tiny": (TINY, (1, 16, 3, 8, 8), (1, 8, 32))}
CONFIGS = [  # (label, kind, int8 base)
    ("plain LoRA fine-tuning", "lora", False),
    ("DMD, fake score = adapter on the shared base", "dmd", False),
    ("DMD, fake score = full trainable copy", "dmd_full", False),
    ("plain LoRA fine-tuning, int8 base", "lora", True),
    ("DMD, adapter on the shared base, int8 base", "dmd", True),
    ("DMD, full copy, int8 base", "dmd_full", True),
    ("DMD, Self-Forcing rollout (wan-causal, blocks of 2 latent frames, KV cache), adapter on the shared base",
     "dmd_causal", False),
    ("DMD, Wan 2.2 A14B layout (wan2.2: two experts of this size switched at the boundary), adapters on both",
     "dmd_experts", False),
]
RESULTS = Path(__file__).parent / "results"


def _setup(model: str, kind: str, quantize: bool, checkpointing: bool):
    config, latents, text = MODELS[model]
    with quiet():
        return build(kind, config=config, latent_shape=latents, text_shape=text, quantize=quantize,
                     checkpointing=checkpointing, rank=16, dtype=torch.float32, device="cpu")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(model: str, kind: str, quantize: bool, steps: int, checkpointing: bool) -> dict:
    """Run in a fresh process: the peak resident set while building the model and running ``steps`` steps, minus the
    resident set just before (Linux: the high-water mark is reset through /proc/self/clear_refs after the imports)."""
    import accelerate  # noqa: F401 — imports are not the model's memory: load them before the baseline
    import optimum.quanto  # noqa: F401
    import peft  # noqa: F401
    from diffusers import WanTransformer3DModel  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = _status_kb("VmRSS")
    setup = _setup(model, kind, quantize, checkpointing)
    for step in range(steps):
        train_step(setup, step)
    peak = _status_kb("VmHWM")
    return {"peak_growth_mb": (peak - base) / 1024, "baseline_mb": base / 1024}


def _memory_in_subprocess(model: str, kind: str, quantize: bool, checkpointing: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.step_cost", "--model", model, "--memory-of", kind,
           "--steps", "3"] + (["--int8"] if quantize else []) + (["--checkpointing"] if checkpointing else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mid")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (default off)")
    parser.add_argument("--memory-of", choices=("lora", "dmd", "dmd_full", "dmd_causal", "dmd_experts"), help=argparse.SUPPRESS)
    parser.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())

    if args.memory_of:  # the child process of the memory measurement
        print(json.dumps(measure_memory(args.model, args.memory_of, args.int8, args.steps, args.checkpointing)))
        return 0

    print(f"building {len(CONFIGS)} configurations of the {args.model} model …", flush=True)
    setups = {label: _setup(args.model, kind, quant, args.checkpointing) for label, kind, quant in CONFIGS}
    for setup in setups.values():  # warm-up: allocator, kernels, lazily created optimizer state
        for step in range(2):
            train_step(setup, step)

    step_times: dict[str, list[float]] = {label: [] for label in setups}
    pass_times: dict[str, dict[str, list[float]]] = {}
    for r in range(args.repeats):
        for label, setup in setups.items():
            step_times[label].append(timed(lambda s=setup: train_step(s, 2 + r), "cpu"))
            if setup.method is not None and setup.kind in ("dmd", "dmd_full"):  # the bidirectional iteration's passes
                for name, (fn, _count) in unavoidable_passes(setup).items():
                    pass_times.setdefault(label, {}).setdefault(name, []).append(timed(fn, "cpu"))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    rows = []
    for label, kind, quant in CONFIGS:
        row = {"config": label, "kind": kind, "int8": quant, "step_s": statistics.median(step_times[label]),
               "step_s_all": step_times[label]}
        if setups[label].method is not None:  # network passes of one clean step, by role (the method's counter)
            setups[label].method.passes.take()  # drop what the pass timings above counted
            train_step(setups[label], 2 + args.repeats)
            row["passes_per_step"] = dict(setups[label].method.last_step_passes)
        if label in pass_times:
            counts = {name: count for name, (_fn, count) in unavoidable_passes(setups[label]).items()}
            passes = {name: statistics.median(times) for name, times in pass_times[label].items()}
            row["passes_s"] = passes
            row["pass_counts"] = counts
            row["unavoidable_s"] = sum(passes[n] * counts[n] for n in passes)
            row["step_over_unavoidable"] = row["step_s"] / row["unavoidable_s"]
        print(f"memory of {label} …", flush=True)
        row.update(_memory_in_subprocess(args.model, kind, quant, args.checkpointing))
        rows.append(row)

    by = {r["config"]: r for r in rows}
    lora, dmd, full = (by[c[0]] for c in CONFIGS[:3])
    lora8, dmd8, full8 = (by[c[0]] for c in CONFIGS[3:6])
    summary = {
        "dmd_step_over_unavoidable_passes": dmd["step_over_unavoidable"],
        "dmd_int8_step_over_unavoidable_passes": dmd8["step_over_unavoidable"],
        "dmd_peak_over_lora_peak": dmd["peak_growth_mb"] / lora["peak_growth_mb"],
        "dmd_int8_peak_over_lora_int8_peak": dmd8["peak_growth_mb"] / lora8["peak_growth_mb"],
        "full_copy_peak_over_shared_base_peak": full["peak_growth_mb"] / dmd["peak_growth_mb"],
        "full_copy_int8_peak_over_shared_base_peak": full8["peak_growth_mb"] / dmd8["peak_growth_mb"],
        "full_copy_step_over_shared_base_step": full["step_s"] / dmd["step_s"],
    }
    causal = next((r for r in rows if r["kind"] == "dmd_causal"), None)
    if causal is not None:
        summary.update(causal_step_over_bidirectional_step=causal["step_s"] / dmd["step_s"],
                       causal_peak_over_bidirectional_peak=causal["peak_growth_mb"] / dmd["peak_growth_mb"])
    experts = next((r for r in rows if r["kind"] == "dmd_experts"), None)
    if experts is not None:
        summary.update(experts_step_over_one_network_step=experts["step_s"] / dmd["step_s"],
                       experts_peak_over_one_network_peak=experts["peak_growth_mb"] / dmd["peak_growth_mb"])
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor(), "model": args.model, "repeats": args.repeats,
           "checkpointing": args.checkpointing, "command": "python -m benchmarks.step_cost " + " ".join(argv or sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "step_cost" if args.model == "mid" else f"step_cost_{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows, "summary": summary}, indent=2))
    md = _markdown(rows, summary, env)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def _markdown(rows, summary, env) -> str:
    lines = [f"CPU, {env['threads']} threads, torch {env['torch']}, `{env['command'].strip()}` "
             f"(median of {env['repeats']}; gradient checkpointing {'on' if env['checkpointing'] else 'off'})", "",
             "| configuration | step (s) | step ÷ unavoidable passes | peak memory growth (MiB) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['step_over_unavoidable']:.2f}" if "step_over_unavoidable" in r else "—"
        lines.append(f"| {r['config']} | {r['step_s']:.3f} | {ratio} | {r['peak_growth_mb']:.0f} |")
    dmd = next(r for r in rows if r["kind"] == "dmd" and not r["int8"])
    lines += ["", "Unavoidable passes of one DMD iteration (shared base, exit at the last of 3 steps):", "",
              "| pass | count | median (s) |", "| --- | --- | --- |"]
    for name, seconds in dmd["passes_s"].items():
        lines.append(f"| {name} | {dmd['pass_counts'][name]} | {seconds:.4f} |")
    lines += ["", "| ratio | measured | target |", "| --- | --- | --- |",
              f"| DMD iteration ÷ sum of its unavoidable passes | {summary['dmd_step_over_unavoidable_passes']:.2f} "
              f"(int8: {summary['dmd_int8_step_over_unavoidable_passes']:.2f}) | ≤ 1.10 |",
              f"| peak memory, DMD (shared base) ÷ plain LoRA | {summary['dmd_peak_over_lora_peak']:.2f} "
              f"(int8: {summary['dmd_int8_peak_over_lora_int8_peak']:.2f}) | ≤ 1.25 |",
              f"| peak memory, DMD full copy ÷ shared base | {summary['full_copy_peak_over_shared_base_peak']:.2f} "
              f"(int8: {summary['full_copy_int8_peak_over_shared_base_peak']:.2f}) | — |",
              f"| step time, DMD full copy ÷ shared base | {summary['full_copy_step_over_shared_base_step']:.2f} | — |"]
    causal = next((r for r in rows if r["kind"] == "dmd_causal"), None)
    if causal is not None:
        lines += [f"| step time, Self-Forcing rollout ÷ bidirectional DMD | "
                  f"{summary['causal_step_over_bidirectional_step']:.2f} | — |",
                  f"| peak memory, Self-Forcing rollout ÷ bidirectional DMD | "
                  f"{summary['causal_peak_over_bidirectional_peak']:.2f} | — |", "",
                  "Network passes of one step, by role (the methods' own counters; the rollout exits at the last step):",
                  "", "| pass | bidirectional DMD | Self-Forcing rollout |", "| --- | --- | --- |"]
        for name in sorted(set(dmd["passes_per_step"]) | set(causal["passes_per_step"])):
            lines.append(f"| {name} | {dmd['passes_per_step'].get(name, 0)} | {causal['passes_per_step'].get(name, 0)} |")
    if "experts_step_over_one_network_step" in summary:
        lines += ["", "| Wan 2.2 A14B layout (two experts) ÷ one network, DMD with adapters | measured |",
                  "| --- | --- |",
                  f"| step time | {summary['experts_step_over_one_network_step']:.2f} |",
                  f"| peak memory growth | {summary['experts_peak_over_one_network_peak']:.2f} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
