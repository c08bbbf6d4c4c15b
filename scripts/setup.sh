#!/usr/bin/env bash
# Creates .venv in the repository root and installs dng into it (CPU torch pinned: an unpinned torch pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
