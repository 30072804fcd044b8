#!/usr/bin/env bash
# Install fedhet on a GPU machine that has Python 3.12 and torch but no network: wheels carried in .carry/wheels
# (hydra-core, omegaconf, antlr4-python3-runtime, tqdm, PyYAML; numpy from .carry/numpy_wheel only if missing).
set -euo pipefail
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .carry/numpy_wheel/*.whl
python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl
# the package itself: a clean export of the commit under test in .carry/src when there is one (other work in
# progress in the checkout stays out of the measurement), else the checkout
python3 -m pip install -q --no-deps --no-build-isolation "$(test -d .carry/src && echo .carry/src || echo .)"
