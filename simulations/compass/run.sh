#!/usr/bin/env bash
# Reproduce FedCompass's comparison (Li et al., ICLR 2024) on Fashion-MNIST with the FedAvg CNN:
# FedAvg vs FedAsync vs FedBuff vs FedCompass, on homogeneous / normal / exponential fleets, N = 10 and 50 clients,
# class partition (shards, CLASSES classes per client) and dual Dirichlet (alpha1 = N, alpha2 = 0.5), SEEDS seeds;
# then `fedhet report` writes the table and the plot.
#
# One Hydra multirun per (strategy, fleet), its runs JOBS at a time on Hydra's joblib launcher (the `sweep` extra;
# LAUNCHER=basic runs them one by one); every run stops at HORIZON virtual seconds.
#   simulations/compass/run.sh [OUT_DIR]            (environment: JOBS DEVICE HORIZON QMIN QMAX SEEDS NS ...)
set -euo pipefail
out=${1:-multirun/compass}
jobs=${JOBS:-2}
device=${DEVICE:-cpu}
horizon=${HORIZON:-1200}
qmin=${QMIN:-20}
qmax=${QMAX:-100}
seeds=${SEEDS:-0,1,2}
ns=${NS:-10,50}
classes=${CLASSES:-3}
fleets=${FLEETS:-homogeneous normal exponential}
strategies=${STRATEGIES:-fedavg fedasync fedbuff fedcompass}
fedhet=${FEDHET:-fedhet}
launcher=${LAUNCHER:-joblib}
parallel=""
[ "$launcher" = joblib ] && parallel="hydra/launcher=joblib hydra.launcher.n_jobs=$jobs"

# (no value contains a space, so plain strings carry them into the parallel jobs)
common="model=${MODEL:-cnn} num_clients=$ns seed=$seeds client.lr=0.02 client.batch_size=32 \
dataset.partition.name=shards,dual_dirichlet dataset.partition.classes_per_client=$classes \
dataset.partition.alpha=0.5 dataset.partition.alpha1=0 sim.max_versions=100000000 \
sim.max_virtual_seconds=$horizon sim.eval_interval=$((horizon / 60)) sim.device=$device sim.threads=1 \
sim.progress=false${DATA_ROOT:+ dataset.root=$DATA_ROOT}"

strategy_overrides() {
  case $1 in
    # cross-silo FedAvg: every client, every round, q_max local steps, no round deadline
    fedavg) echo "strategy=fedavg strategy.scheduler.fraction=1.0 strategy.scheduler.min_clients=1 \
strategy.scheduler.local_epochs=0 strategy.scheduler.local_steps=$qmax strategy.scheduler.round_timeout=1e9" ;;
    fedasync) echo "strategy=fedasync strategy.scheduler.local_steps=$qmax" ;;
    # K = 3 as in the reference code's examples for these cross-silo sizes
    fedbuff) echo "strategy=fedbuff strategy.scheduler.local_steps=$qmax strategy.scheduler.buffer_size=3" ;;
    fedcompass) echo "strategy=fedcompass strategy.scheduler.q_min=$qmin strategy.scheduler.q_max=$qmax \
strategy.scheduler.latest_time_factor=1.2" ;;
    *) echo "unknown strategy $1" >&2; return 1 ;;
  esac
}

run_one() {  # one Hydra multirun: strategy $1 on fleet $2, over clients x partitions x seeds
  local overrides
  overrides=$(strategy_overrides "$1")
  # shellcheck disable=SC2086
  if ! $fedhet simulate -m $overrides "fleet=$2" $common $parallel "hydra.sweep.dir=$out/$1/$2" \
      >"$out/$1-$2.log" 2>&1; then
    echo "FAILED (some or all runs): $1 on $2 (see $out/$1-$2.log)"
  fi
}

mkdir -p "$out"
for s in $strategies; do for f in $fleets; do run_one "$s" "$f"; done; done
$fedhet report "$out"
