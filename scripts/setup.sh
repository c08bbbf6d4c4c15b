#!/usr/bin/env bash
# Creates .venv in the repository root and installs dng into it (CPU torch pinned: an unpinned torch pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST for the class-removal benchmark and the demo comes from Debian's package.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -z "${DNG_DATA_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' or set DNG_DATA_DIR" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
