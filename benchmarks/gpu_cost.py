"""GPU cost of DMD on Wan 2.1's real architectures: step time and peak memory, plain LoRA vs DMD shared base vs DMD
full copy. One prepared command, about 8 minutes on one H100:

    python -m benchmarks.gpu_cost                         # Wan 1.3B and 14B, 480x832x81 (latents 16x21x60x104)
    python -m benchmarks.gpu_cost --model tiny --device cpu --steps 1   # the same code path on a CPU, in seconds

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
         "dmd_full": "DMD, fake score = full trainable copy"}
RESULTS = Path(__file__).parent / "results"


def run_one(model: str, kind: str, steps: int, device: str, rank: int) -> dict:
    """In a fresh process: build, one warm-up step, then ``steps`` timed steps."""
    config, latents, text = MODELS[model]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    result = {"model": model, "kind": kind, "device": device}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        result["gpu"] = torch.cuda.get_device_name()
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in bf16 directly: a fp32 14B would not fit beside its copy
    try:
        with quiet():
            setup = build(kind, config=config, latent_shape=latents, text_shape=text, quantize=True,
                          checkpointing=True, rank=rank, dtype=dtype, device=device)
    finally:
        torch.set_default_dtype(previous)
    result["build_s"] = time.perf_counter() - start
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    try:
        for step in range(steps + 1):  # the first step warms up kernels and creates optimizer state
            sync()
            t0 = time.perf_counter()
            train_step(setup, step)
            sync()
            if step:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as exc:  # a measured outcome: this configuration does not fit this device
        result.update(oom=True, error=str(exc).splitlines()[0])
    else:
        result.update(oom=False, step_s=sorted(times)[len(times) // 2] if times else None, step_s_all=times)
    if device == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if setup.method is not None:
        result["passes"] = setup.method.last_step_passes
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS),
                        help="repeatable; default: 1.3b and 14b")
    parser.add_argument("--kind", action="append", choices=sorted(KINDS), help="repeatable; default: all")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.device, args.rank)), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --model tiny to try the code path", file=sys.stderr)
        return 2

    rows = []
    for model in args.model or ["1.3b", "14b"]:
        for kind in args.kind or list(KINDS):
            print(f"{model} / {KINDS[kind]} …", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.gpu_cost", "--one", model, kind, "--steps", str(args.steps),
                   "--device", args.device, "--rank", str(args.rank)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
            if proc.returncode != 0:  # e.g. the process was killed building a configuration that cannot fit
                row = {"model": model, "kind": kind, "failed": True, "returncode": proc.returncode,
                       "stderr_tail": proc.stderr[-2000:]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
            rows.append(row)

    device_name = next((r["gpu"] for r in rows if r.get("gpu")), args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_cost_" + "".join(c if c.isalnum() else "_" for c in device_name).strip("_").lower()
    (args.out / f"{stem}.json").write_text(json.dumps({"device": device_name, "argv": argv or sys.argv[1:],
                                                        "rows": rows}, indent=2))
    lines = [f"{device_name}; bf16, int8-quanto base, LoRA rank {args.rank}, gradient checkpointing, latents "
             f"{MODELS[(args.model or ['1.3b'])[0]][1]}; median of {args.steps} steps after one warm-up", "",
             "| model | configuration | step (s) | max_memory_allocated (GiB) |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['model']} | {KINDS[r['kind']]} | failed (exit {r['returncode']}) | — |")
            continue
        step = "OOM" if r["oom"] else f"{r['step_s']:.2f}"
        mem = f"{r['max_memory_allocated_gib']:.1f}" if "max_memory_allocated_gib" in r else "—"
        lines.append(f"| {r['model']} | {KINDS[r['kind']]} | {step} | {mem} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
