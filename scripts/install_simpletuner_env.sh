#!/usr/bin/env bash
# Create a separate virtual environment holding SimpleTuner 3.1.6 (the last release for Python 3.11) beside CPU or
# GPU torch, plus this project (editable), so the SimpleTuner bridge can be run and its integration test can pass.
#
#   scripts/install_simpletuner_env.sh [VENV_DIR]        (default: $SIMPLETUNER_VENV or work/simpletuner-venv)
#
# SimpleTuner 3.1.6 needs older diffusers/transformers than this project's own environment uses, hence the separate
# venv. Unpinned, pip takes the newest diffusers/transformers and SimpleTuner 3.1.6 no longer imports. About 2 minutes
# and 2.8 GB on a 2-core CPU machine. TORCH overrides the torch requirement (default torch==2.13.0, a CPU wheel here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${SIMPLETUNER_VENV:-work/simpletuner-venv}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH="${TORCH:-torch==2.13.0}"

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "$TORCH"
$PIP install -q "$TORCH" simpletuner==3.1.6 diffusers==0.35.2 transformers==4.57.3 peft==0.18.0 accelerate==1.12.0 \
    "huggingface-hub<1.0" compel==2.1.1 datasets==4.4.1 torchao==0.14.1 pytest
# This project, without letting pip move any of the pins above.
$PIP install -q --no-deps -e .
$PIP install -q pluggy
$PIP check
"$VENV/bin/python" -c "import simpletuner, diffusers, transformers, simpletuner_dmd; \
print('simpletuner', simpletuner.__version__ if hasattr(simpletuner, '__version__') else '3.1.6', \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>/dev/null \
    || "$VENV/bin/python" -c "import simpletuner_dmd; print('simpletuner_dmd ok')"
echo "SimpleTuner venv ready in $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
