#!/usr/bin/env bash
# ProWD (Yoon et al., ICML 2022) against its baselines on Fashion-MNIST with the FedAvg CNN:
#   - the three bitwidth mixes (fleet=int8_fp32_50, int8_fp32_80, int6_8_12_16; normal speeds), each with
#     ProWD (strategy=prowd), grouped averaging (prowd_grouped), naive averaging (prowd_naive) and the two
#     ablations (ProWD without selective aggregation = dequantizer only, without dequantizer = selective only),
#     synchronous rounds (fraction FRACTION of NUM_CLIENTS clients, one local epoch), ROUNDS rounds;
#   - speed and bitwidth heterogeneity at once: fleet int6_8_12_16 with exponential speeds and COMPASS_CLIENTS
#     clients, FedCompass's scheduler with ProWD's aggregator (strategy=compass_prowd) against synchronous ProWD
#     (fraction COMPASS_FRACTION), both stopped at COMPASS_SECONDS virtual seconds.
# One `fedhet simulate` per (mix, variant, seed), JOBS at a time, each in OUT/<mix>/<variant>/s<seed>; a run that
# finished (DONE file) is skipped, so the grid can be run in waves. Then summarize.py writes the table and plot.
#   simulations/bitwidth/run.sh [OUT_DIR]
#   (environment: JOBS DEVICE ROUNDS SEEDS MIXES VARIANTS NUM_CLIENTS FRACTION COMPASS COMPASS_SECONDS
#    COMPASS_VARIANTS COMPASS_CLIENTS COMPASS_FRACTION COMPASS_TIMEOUT JOB_TIMEOUT DEADLINE DATA_ROOT FEDHET;
#    DEADLINE = a Unix time at which every run still going is stopped, for a machine lent by the minute)
# Jobs start in list order, the longest first: the speed x bitwidth runs, then ProWD and its ablations.
set -euo pipefail
out=${1:-multirun/bitwidth}
jobs=${JOBS:-2}
device=${DEVICE:-cpu}
rounds=${ROUNDS:-20}
seeds=${SEEDS:-0 1 2}
mixes=${MIXES:-int8_fp32_50 int8_fp32_80 int6_8_12_16}
variants=${VARIANTS:-prowd deq_only sel_only naive grouped}
compass=${COMPASS:-1}                                   # 0: skip the speed x bitwidth part
compass_seconds=${COMPASS_SECONDS:-600}
compass_variants=${COMPASS_VARIANTS:-compass_prowd sync_prowd}
compass_clients=${COMPASS_CLIENTS:-20}
job_timeout=${JOB_TIMEOUT:-0}                           # seconds per run (0 = none)
compass_timeout=${COMPASS_TIMEOUT:-$job_timeout}        # seconds per speed x bitwidth run (0 = none)
deadline=${DEADLINE:-0}
fedhet=${FEDHET:-fedhet}

# (no value contains a space, so plain strings carry them into the parallel jobs)
common="dataset=fashion_mnist model=cnn client.lr=0.05 client.batch_size=32 \
sim.device=$device sim.threads=1 sim.progress=false${DATA_ROOT:+ dataset.root=$DATA_ROOT}"

variant_overrides() {  # $1 variant, $2 fleet
  local sync="num_clients=${NUM_CLIENTS:-100} strategy.scheduler.fraction=${FRACTION:-0.1} \
sim.max_versions=$rounds sim.eval_every=1"
  local speed="num_clients=$compass_clients fleet=int6_8_12_16 fleet.speed=exponential \
sim.max_virtual_seconds=$compass_seconds"
  case $1 in
    prowd) echo "strategy=prowd fleet=$2 $sync" ;;
    grouped) echo "strategy=prowd_grouped fleet=$2 $sync" ;;
    naive) echo "strategy=prowd_naive fleet=$2 $sync" ;;
    deq_only) echo "strategy=prowd strategy.aggregator.selective=false fleet=$2 $sync" ;;
    sel_only) echo "strategy=prowd strategy.aggregator.dequantizer=false fleet=$2 $sync" ;;
    # speed x bitwidth: the same fleet with exponential speeds, both stopped at the same virtual time
    compass_prowd) echo "strategy=compass_prowd $speed sim.max_versions=100000000 sim.eval_every=1 \
sim.eval_interval=$((compass_seconds / 30))" ;;
    # FedCompass with ProWD's aggregator with both parts off: the naive mean of each group's updates
    compass_naive) echo "strategy=compass_prowd strategy.aggregator.dequantizer=false \
strategy.aggregator.selective=false $speed sim.max_versions=100000000 sim.eval_every=1 \
sim.eval_interval=$((compass_seconds / 30))" ;;
    sync_prowd) echo "strategy=prowd strategy.scheduler.fraction=${COMPASS_FRACTION:-0.5} $speed \
sim.max_versions=100000000 sim.eval_every=1" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}

run_one() {  # mix $1, variant $2, seed $3
  local dir="$out/$1/$2/s$3" overrides
  [ -e "$dir/DONE" ] && return 0
  overrides=$(variant_overrides "$2" "$1")
  mkdir -p "$dir"
  local t=() limit=$job_timeout
  case $2 in compass_*|sync_*) limit=$compass_timeout ;; esac
  if [ "$deadline" != 0 ]; then
    local left=$((deadline - $(date +%s)))
    [ "$left" -le 5 ] && { echo "NOT STARTED (deadline): $1 $2 seed $3"; return 0; }
    { [ "$limit" = 0 ] || [ "$left" -lt "$limit" ]; } && limit=$left
  fi
  [ "$limit" != 0 ] && t=(timeout "$limit")
  # shellcheck disable=SC2086
  if "${t[@]}" $fedhet simulate $overrides $common "seed=$3" "hydra.run.dir=$dir" >"$dir/stdout.log" 2>&1; then
    touch "$dir/DONE"
  else
    echo "FAILED or timed out: $1 $2 seed $3 (see $dir/stdout.log)"
  fi
}
export -f run_one variant_overrides
export out fedhet common rounds compass_seconds compass_clients job_timeout compass_timeout deadline

mkdir -p "$out"
{
  if [ "$compass" = 1 ]; then
    for v in $compass_variants; do for s in $seeds; do echo "int6_8_12_16_exp $v $s"; done; done
  fi
  for v in $variants; do for m in $mixes; do for s in $seeds; do echo "$m $v $s"; done; done; done
} | xargs -P "$jobs" -n 3 bash -c 'run_one "$0" "$1" "$2"'
