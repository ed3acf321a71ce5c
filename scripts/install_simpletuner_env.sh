#!/usr/bin/env bash
# Create a virtual environment holding one SimpleTuner release from PyPI with the pins it needs, plus this project,
# so the SimpleTuner bridge (and `simpletuner train` with the plugin's methods) can be run and its integration tests
# can pass.
#
#   scripts/install_simpletuner_env.sh [--version 4.10.1|3.1.6] [VENV_DIR]
#
#   4.10.1 (default; the current release): Python >= 3.12, torch==2.14.1 torchvision==0.29.1, transformers==5.22.0
#          (5.23+ break SimpleTuner 4.10.1's imports), moviepy (wandb's video logging). About 3-5 minutes and 7.6 GB
#          here.
#   3.1.6  (the last release for Python 3.11): torch==2.13.0 and older diffusers/transformers pins (unpinned, pip
#          takes versions SimpleTuner 3.1.6 cannot import). About 2-3 minutes and 2.8 GB here.
#
# VENV_DIR defaults to work/simpletuner-<version>. PYTHON picks the interpreter (default: python3.12 for 4.10.1 —
# found on PATH or under pyenv — and python3.11 for 3.1.6). TORCH overrides the torch requirement (e.g. a CUDA build
# of your choice). The project is installed as a regular (not editable) package with --no-deps, so none of the pins
# move and its import hook (simpletuner_dmd_autoload.pth) is in site-packages, as after `pip install simpletuner-dmd`.
# Run again on an existing venv of the same version: only the project is reinstalled (a few seconds).
#
# Exit status 3 with one line when the Python the version needs is not on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${SIMPLETUNER_VERSION:-4.10.1}"
if [ "${1:-}" = "--version" ]; then VERSION="$2"; shift 2; fi
VENV="${1:-work/simpletuner-$VERSION}"

find_python() {  # the first interpreter of the given minor version that really runs
    local minor="$1" candidate
    for candidate in "${PYTHON:-}" "python$minor" "$(command -v pyenv >/dev/null && pyenv root)/versions/$minor"*/bin/"python$minor"; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$minor'.split('.')))" 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

case "$VERSION" in
    4.10.1)
        MINOR=3.12
        TORCH="${TORCH:-torch==2.14.1 torchvision==0.29.1}"
        # moviepy: wandb logs validation videos with it (the DMD quickstart reports to wandb); it takes pillow 11.3,
        # which SimpleTuner 4.10.1 accepts (pillow>=11.3.0)
        PINS="simpletuner==4.10.1 transformers==5.22.0 moviepy==2.2.1"
        ;;
    3.1.6)
        MINOR=3.11
        TORCH="${TORCH:-torch==2.13.0}"
        PINS="simpletuner==3.1.6 diffusers==0.35.2 transformers==4.57.3 peft==0.18.0 accelerate==1.12.0 huggingface-hub<1.0 compel==2.1.1 datasets==4.4.1 torchao==0.14.1"
        ;;
    *)
        echo "error: --version $VERSION: this script knows 4.10.1 and 3.1.6" >&2; exit 2 ;;
esac

if ! PY="$(find_python "$MINOR")"; then
    echo "SimpleTuner $VERSION needs Python $MINOR, which is not on this machine (tried \$PYTHON, python$MINOR and pyenv's versions)" >&2
    exit 3
fi

start=$(date +%s)
PIP="$VENV/bin/python -m pip"
if [ -f "$VENV/.simpletuner-version" ] && [ "$(cat "$VENV/.simpletuner-version")" = "$VERSION" ]; then
    echo "SimpleTuner $VERSION venv exists in $VENV: reinstalling the project only"
else
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    $PIP install -q --upgrade pip
    # shellcheck disable=SC2086  # word splitting of the requirement lists is intended
    $PIP install -q $TORCH
    # shellcheck disable=SC2086
    $PIP install -q $TORCH $PINS pytest pluggy
fi
# This project, without letting pip move any of the pins above; regular install, so the .pth hook is in place.
$PIP install -q --no-deps --force-reinstall .
$PIP check
echo "$VERSION" > "$VENV/.simpletuner-version"
"$VENV/bin/python" -c "from importlib.metadata import version as v; \
print('simpletuner', v('simpletuner'), 'diffusers', v('diffusers'), 'transformers', v('transformers'), 'torch', v('torch'))"
echo "SimpleTuner $VERSION venv ready in $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
