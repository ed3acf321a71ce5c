"""Jobs run on several CPU processes (gloo) and the one way the tests launch them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def launch(job: str, config: Path, witness: Path, processes: int = 2, timeout: int = 900) -> str:
    """Run ``tests/multiprocess/<job>`` on ``processes`` CPU processes through ``accelerate launch`` (accelerate's CPU
    path: torchrun's launcher, ``--multi_gpu``, with ``ACCELERATE_USE_CPU``, which makes it gloo) with ``config`` and
    ``witness`` as its arguments; its output when it exits 0, else the test fails with the output's tails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / job), str(config), str(witness)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr
