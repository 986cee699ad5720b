#!/usr/bin/env bash
# TorchServe 0.12 for bench/torchserve_compare.py, in its own virtual environment (.venv-torchserve),
# so its dependencies never touch the project's .venv. Idempotent: a second run only checks.
#
#   bash bench/torchserve/setup.sh            # or: make torchserve-bench (setup + the comparison)
#
# Installs:
#   - Debian's openjdk-17-jre-headless (TorchServe's frontend is Java), only when `java` is missing;
#   - .venv-torchserve: torchserve 0.12, torch-model-archiver 0.12, torch (TORCH_SPEC, default
#     torch==2.14.1, the project's version; it brings NVIDIA's CUDA wheels, 5.5 GB in all, although
#     everything runs on the CPU: TORCH_SPEC='torch==2.13.0+cpu' takes a CPU-only wheel where pip
#     finds one, 1.1 GB in all, and TORCHSERVE_VENV=DIR installs into another folder),
#     Pillow and numpy (the handler's preprocessing), PyYAML (TorchServe's worker imports it without
#     declaring it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${TORCHSERVE_VENV:-$ROOT/.venv-torchserve}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
STAMP="$VENV/.installed-$(echo "$TORCH_SPEC" | tr -c 'A-Za-z0-9.=+\n' _)"

if ! command -v java >/dev/null 2>&1; then
    echo "torchserve setup: java not found; installing Debian's openjdk-17-jre-headless (TorchServe's Java frontend)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y openjdk-17-jre-headless
fi
java -version 2>&1 | head -1

if [ ! -f "$STAMP" ]; then
    echo "torchserve setup: a virtual environment in $VENV with torchserve 0.12, torch-model-archiver 0.12,"
    echo "  $TORCH_SPEC, Pillow, numpy, PyYAML (separate from the project's .venv; a few minutes, once)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --progress-bar off 'torchserve==0.12.*' 'torch-model-archiver==0.12.*' \
        "$TORCH_SPEC" Pillow numpy PyYAML
    touch "$STAMP"
fi
"$VENV/bin/python" -c "import torch, ts.version; print(f'torchserve {ts.version.__version__}, torch {torch.__version__}')"
