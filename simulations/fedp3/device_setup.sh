#!/usr/bin/env bash
# Install fedhet on an offline GPU machine (see simulations/bitwidth/device_setup.sh), plus Opacus for DP-FedP3:
# wheels in .carry/wheels_dp (opacus, opt_einsum) and, when the machine lacks SciPy, .carry/scipy.
set -euo pipefail
bash "$(dirname "$0")/../bitwidth/device_setup.sh"
python3 -c 'import scipy' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .carry/scipy/*.whl
python3 -m pip install -q --no-index --no-deps .carry/wheels_dp/*.whl
