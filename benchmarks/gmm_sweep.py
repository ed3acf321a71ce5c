"""Case A exploration: many single-seed DMD runs on the Gaussian mixture in parallel, one process per core, with the
metrics after several points of training. Prints one JSON line per run (and writes them to ``--out``).

    python -m benchmarks.gmm_sweep benchmarks/results/quality/sweep_gan.json --jobs 16 --fit-steps 3000

A grid is a JSON list of ``{"name", "cfg" (distillation_config), "lr", "steps", "seed", "snaps", "sched"}``; every
key but ``name`` and ``cfg`` has a default (3e-4, 6000, 0, [2000, 4000], "constant"). ``--fit-steps`` is the flow-
matching fit the student and fake score start from (``gmm.fit_base``), cached per value under ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(task: tuple) -> dict:
    import torch

    from . import gmm

    spec, folder, fit_steps = task
    torch.set_num_threads(1)
    folder = gmm.fit_base(Path(folder), steps=fit_steps, log=lambda m: None)
    _, mixture = gmm.family_and_mixture()
    metrics = gmm.Metrics(mixture)
    steps = spec.get("steps", 6000)
    start = time.time()
    result = gmm.distil(folder, {"real_score_guidance_scale": 1.0, **spec["cfg"]}, seed=spec.get("seed", 0),
                        steps=steps, lr=spec.get("lr", 3e-4), lr_schedule=spec.get("sched", "constant"),
                        snapshot_steps=tuple(spec.get("snaps", [2000, 4000])))
    return {**spec, "fit_steps": fit_steps, "seconds": time.time() - start,
            "by_step": {k: metrics(x) for k, x in sorted(result.snapshots.items())}}


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from . import gmm

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gmm_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fit-steps", type=int, default=10_000)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (default: the grid's name + .jsonl)")
    args = parser.parse_args(argv)
    grid = json.loads(args.grid.read_text())
    folder = args.cache / f"gmm-fit{args.fit_steps}"
    gmm.fit_base(folder, steps=args.fit_steps)  # once, before the workers
    out = args.out or args.grid.with_suffix(".jsonl")
    with ProcessPoolExecutor(args.jobs) as pool, out.open("w") as f:
        for line in pool.map(_run, [(spec, str(folder), args.fit_steps) for spec in grid]):
            print(json.dumps(line), flush=True)
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
