"""What each distillation method costs on the CPU: memory growth, step time and network passes per optimizer step.

    python -m benchmarks.methods_cost                 # mid-size Wan (35M parameters), a few minutes on 2 cores
    python -m benchmarks.methods_cost --model tiny    # seconds (a smoke run)

Every method is built the way the reference host builds it (``build_models`` with a LoRA student, then the method's
own ``distill_setup``) on the same random-weight Wan transformer from ``cost_setup.py``, and stepped as the host steps
it (``cost_setup.train_step``). Memory is measured as ``step_cost.py`` measures it: in a fresh process per method, the
peak resident set (VmHWM, reset after the imports) minus the resident set before the model is built — weights,
adapters, optimizer states, the discriminator and activations. Step times are medians of interleaved repeats. DCM
``fine`` alternates semantic and detail micro-batches; both kinds are timed and counted separately.

Writes ``benchmarks/results/methods_cost_<model>.json`` and ``.md``.
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

from .cost_setup import build, quiet, timed, train_step
from .step_cost import MODELS, _status_kb

RESULTS = Path(__file__).parent / "results"
# (label, method name or None for plain LoRA fine-tuning, method config, forced DCM expert or None)
ROWS = [
    ("plain LoRA fine-tuning", None, {}, None),
    ("DMD (fake score = adapter), 3 steps", "dmd", {"last_step_only": True}, None),
    ("LCM", "lcm", {}, None),
    ("DCM semantic", "dcm", {"mode": "semantic"}, None),
    ("DCM fine, semantic batch", "dcm", {"mode": "fine"}, True),
    ("DCM fine, detail batch", "dcm", {"mode": "fine"}, False),
]


def _setup(model: str, method: str | None, method_cfg: dict, expert: bool | None):
    from simpletuner_dmd.plugins import get_method_class, get_plugin_manager
    from simpletuner_dmd.types import RunContext

    from .cost_setup import T

    config, latents, text = MODELS[model]
    with quiet():
        setup = build("lora", config=config, latent_shape=latents, text_shape=text, quantize=False,
                      checkpointing=False, rank=16, dtype=torch.float32, device="cpu")
        if method is None:
            return setup
        cls = get_method_class(get_plugin_manager(entry_points=False), method)
        cfg, problems, _ = cls.schema.validate(method_cfg, prefix="distillation_config")
        assert not problems, problems
        m = cls(cfg)
        from simpletuner_dmd.hosts.reference.host_schema import HOST_SCHEMA

        host = {**HOST_SCHEMA.defaults(), "lora_rank": 16, "lora_alpha": 16}
        cond = torch.zeros(1, *text[1:])
        m.distill_setup(run=RunContext(
            host_config=host, method_config=cfg, family=setup.family, student=setup.models.network,
            accelerator=setup.accelerator, encode_prompts=lambda texts: cond, negative_prompt="", output_dir=None,
            model_type="lora", student_adapter=T.STUDENT_ADAPTER, load_base=None, teacher=None, seed=0))
        if expert is not None:  # pin DCM's micro-batch to one expert so each kind is measured on its own
            edges, n = m.edges, m.cfg["euler_timesteps"]
            m._draw = lambda b, step, e=expert: (e, torch.randint(0, edges[1], (b,)) if e
                                                 else torch.randint(edges[1], n, (b,)))
        setup.method = m
    return setup


def _step(setup, step: int) -> None:
    """``cost_setup.train_step`` for any method (DCM's detail batches return no student loss), keeping the step's
    pass counts."""
    from simpletuner_dmd.types import StepInfo

    info = StepInfo(step, 0, 1, True, torch.Generator().manual_seed(step))
    if setup.method is None:
        return train_step(setup, step)
    result = setup.method.distill_loss(batch=setup.batch, step=info, host_loss=lambda: setup.loss_fn(setup.batch))
    if result.loss is not None:
        result.loss.backward()
        setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    setup.method.distill_after_optimizer_step(step=info)
    setup.last_metrics = setup.method.distill_metrics(step=info)


def measure_memory(model: str, index: int, steps: int) -> dict:
    import accelerate  # noqa: F401 — imports are not the model's memory
    import peft  # noqa: F401
    from diffusers import WanTransformer3DModel  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    _label, method, cfg, expert = ROWS[index]
    setup = _setup(model, method, cfg, expert)
    for step in range(steps):
        _step(setup, step)
    return {"peak_growth_mb": (_status_kb("VmHWM") - base) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.memory_of is not None:
        print(json.dumps(measure_memory(args.model, args.memory_of, 3)))
        return 0

    setups = {row[0]: _setup(args.model, *row[1:]) for row in ROWS}
    for setup in setups.values():
        for step in range(2):
            _step(setup, step)
    times: dict[str, list[float]] = {label: [] for label in setups}
    passes: dict[str, dict] = {}
    for r in range(args.repeats):
        for label, setup in setups.items():
            times[label].append(timed(lambda s=setup: _step(s, 2 + r), "cpu"))
            passes[label] = {k: v for k, v in getattr(setup, "last_metrics", {}).items() if k.startswith("passes/")}
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    rows = []
    for i, (label, *_rest) in enumerate(ROWS):
        cmd = [sys.executable, "-m", "benchmarks.methods_cost", "--model", args.model, "--memory-of", str(i)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        memory = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"config": label, "step_s": statistics.median(times[label]), "step_s_all": times[label],
                     "passes": passes[label], **memory})
        print(f"{label}: {rows[-1]['step_s']:.3f} s/step, +{memory['peak_growth_mb']:.0f} MB", flush=True)

    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "model": args.model, "repeats": args.repeats,
           "command": "python -m benchmarks.methods_cost " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"methods_cost_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lora = rows[0]["peak_growth_mb"]
    lines = [f"Methods' cost, {args.model} Wan on CPU ({env['threads']} threads, torch {env['torch']}); "
             f"`{env['command']}`", "",
             "| method | peak memory growth (MB) | vs plain LoRA | step (s, median) | passes per step |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        p = row["passes"]
        fw = ", ".join(f"{k[7:-8]} {int(v)}" for k, v in sorted(p.items()) if k.endswith("_forward"))
        bw = ", ".join(f"{k[7:-9]} {int(v)}" for k, v in sorted(p.items()) if k.endswith("_backward"))
        desc = f"fwd: {fw}; bwd: {bw}" if p else "1 fwd + 1 bwd (student)"
        lines.append(f"| {row['config']} | {row['peak_growth_mb']:.0f} | {row['peak_growth_mb'] / lora:.2f}× | "
                     f"{row['step_s']:.3f} | {desc} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
