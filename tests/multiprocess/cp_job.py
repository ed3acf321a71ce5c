"""``fsdp_job.py``'s run (the reference host with ``job.py``'s ``Witness`` and ``fsdp_job.py``'s ``Record``) on CPU
processes that use diffusers' context parallelism: ``cpu_shims.diffusers_context_parallel_on_cpu`` first."""

from __future__ import annotations

import sys
from pathlib import Path

# the repository's root is on PYTHONPATH, as the tests launch it; the shim goes in before diffusers loads
from tests.simpletuner.cpu_shims import diffusers_context_parallel_on_cpu

diffusers_context_parallel_on_cpu()

from tests.multiprocess.fsdp_job import main

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
