#!/usr/bin/env bash
# Install fedhet on a GPU machine that has Python 3.12 and torch but no network, from wheels carried in .carry/
# (gitignored): .carry/wheels (hydra-core, omegaconf, antlr4-python3-runtime, tqdm, PyYAML, and for the experiments'
# parallel launcher hydra-joblib-launcher, joblib and cloudpickle; opacus and opt_einsum for DP-FedP3),
# .carry/numpy_wheel and .carry/scipy only where the machine lacks numpy or SciPy. Make them here with
#   pip download --no-deps -d .carry/wheels hydra-core omegaconf antlr4-python3-runtime==4.9.3 tqdm PyYAML \
#     hydra-joblib-launcher joblib cloudpickle opacus opt_einsum
# and, to run tests there, pytest pluggy iniconfig packaging
set -euo pipefail
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .carry/numpy_wheel/*.whl
python3 -c 'import scipy' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .carry/scipy/*.whl
python3 -m pip install -q --no-index --no-deps .carry/wheels/*.whl
# the package itself: a clean export of the commit under test in .carry/src when there is one (other work in
# progress in the checkout stays out of the measurement), else the checkout
python3 -m pip install -q --no-deps --no-build-isolation "$(test -d .carry/src && echo .carry/src || echo .)"
