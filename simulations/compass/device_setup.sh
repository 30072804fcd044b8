#!/usr/bin/env bash
# Install fedhet on a GPU machine that has torch but no network: wheels carried in .carry/wheels.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation .
