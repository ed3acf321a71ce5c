"""Start-up cost of the import hook (``simpletuner_dmd_autoload.pth``) that serves the plugin in ``simpletuner train``.

    python -m benchmarks.autoload_cost --venv work/simpletuner-4.10.1 [--runs 40]

Every Python of an environment with ``simpletuner-dmd`` installed runs the ``.pth`` line at start. The benchmark times
``python -c pass`` in that environment with the hook on and off (``SIMPLETUNER_DMD_DISABLE=1`` makes it return at once),
alternating run by run so the machine's noise hits both alike, and reports the medians and their difference. It also
reads the hook's own import time from ``python -X importtime`` and checks that neither torch, SimpleTuner nor the plugin
package is imported at start.

Writes ``benchmarks/results/autoload_cost.json`` and ``autoload_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROBE = "import sys; print(sorted(m for m in ('torch', 'simpletuner', 'simpletuner_dmd') if m in sys.modules))"


def _time(python: Path, disabled: bool) -> float:
    env = {**os.environ, "SIMPLETUNER_DMD_DISABLE": "1" if disabled else ""}
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def _hook_import_us(python: Path) -> int:
    """The hook module's cumulative import time (µs) as ``-X importtime`` reports it."""
    proc = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True)
    for line in proc.stderr.splitlines():
        if line.rstrip().endswith("simpletuner_dmd_autoload"):
            return int(line.split("|")[1])
    raise SystemExit("simpletuner_dmd_autoload was not imported at start: is simpletuner-dmd installed (not editable) "
                     f"in {python.parent.parent}?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True, help="an environment with simpletuner-dmd installed")
    parser.add_argument("--runs", type=int, default=40, help="interpreter starts per setting (default 40)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    python = args.venv / "bin" / "python"

    loaded = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, check=True).stdout.strip()
    on, off = [], []
    for _ in range(args.runs):
        on.append(_time(python, disabled=False))
        off.append(_time(python, disabled=True))
    imports = sorted(_hook_import_us(python) for _ in range(5))
    result = {
        "python": subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                                 text=True, check=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": args.runs,
        "median_start_ms_hook_on": round(statistics.median(on) * 1e3, 2),
        "median_start_ms_hook_off": round(statistics.median(off) * 1e3, 2),
        "median_difference_ms": round((statistics.median(on) - statistics.median(off)) * 1e3, 2),
        "hook_import_us_median_of_5": imports[2],
        "modules_imported_at_start": loaded,
        "command": f"python -m benchmarks.autoload_cost --venv {args.venv} --runs {args.runs}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoload_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "autoload_cost.md").write_text(
        "# Start-up cost of the simpletuner train import hook\n\n"
        f"`{result['command']}` — Python {result['python']}, {result['machine']}.\n\n"
        "| | median interpreter start |\n| --- | --- |\n"
        f"| hook on | {result['median_start_ms_hook_on']} ms |\n"
        f"| hook off (`SIMPLETUNER_DMD_DISABLE=1`) | {result['median_start_ms_hook_off']} ms |\n"
        f"| difference | {result['median_difference_ms']} ms |\n\n"
        f"The hook module's own import (`-X importtime`, median of 5): {result['hook_import_us_median_of_5']} µs. "
        f"Heavy modules imported at start: {loaded} (none expected).\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
