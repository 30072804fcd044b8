#!/usr/bin/env bash
# Set up fedhet on a fresh Debian machine with Python 3.11: the Fashion-MNIST Debian package, a virtual
# environment at .venv with the CPU build of torch (installed first, so no CUDA build is ever pulled),
# and fedhet itself with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev,flower,sweep,tracking]'
