#!/usr/bin/env bash
# FedP3 (Yi et al., ICLR 2024) on Fashion-MNIST with the released code's CNN (model=fedp3_cnn), 100 clients, full
# participation, held-out split of 30% per client, personalised accuracy (head fine-tuned on the global shared
# layers) every EVAL_EVERY rounds:
#   - partitions: Dirichlet(0.5) and 5 classes per client (shards);
#   - FedAvg with full models (fedavg), FedP3 LowerB / OPU2 / OPU3 (lowerb, opu2, opu3) at keep ratio 0.9, and
#     OPU2 / OPU3 with the other shared layers pruned to half (opu2_k50, opu3_k50);
#   - DP-FedP3 (OPU2 with DP-SGD, C = 1, delta = 1e-5) at epsilon 1, 4 and 8 (dp1, dp4, dp8), on Dirichlet(0.5);
#   - FedP3 OPU2 planning under FedCompass's scheduler (compass_opu2, q in [Q_MIN, Q_MAX] local steps; the sync runs
#     take 2 epochs, about 18 steps), stopped at COMPASS_SECONDS virtual seconds, on Dirichlet(0.5).
# One `fedhet simulate` per (partition, variant, seed), JOBS at a time, in OUT/<partition>/<variant>/s<seed>; a run
# that finished (DONE file) is skipped, so the grid can run in waves. Then summarize.py writes the table and plot.
#   simulations/fedp3/run.sh [OUT_DIR]
#   (environment: JOBS DEVICE ROUNDS EVAL_EVERY EPOCHS SEEDS PARTITIONS VARIANTS DP_VARIANTS COMPASS_VARIANTS
#    COMPASS_SECONDS Q_MIN Q_MAX DEADLINE DATA_ROOT FEDHET;
#    DEADLINE = a Unix time at which every run still going is stopped, for a machine lent by the minute)
set -euo pipefail
out=${1:-multirun/fedp3}
jobs=${JOBS:-2}
device=${DEVICE:-cpu}
rounds=${ROUNDS:-40}
eval_every=${EVAL_EVERY:-5}
epochs=${EPOCHS:-2}
seeds=${SEEDS:-0}
partitions=${PARTITIONS:-dirichlet shards}
variants=${VARIANTS:-fedavg lowerb opu2 opu3}
dp_variants=${DP_VARIANTS:-dp1 dp4 dp8}
compass_variants=${COMPASS_VARIANTS:-compass_opu2}
compass_seconds=${COMPASS_SECONDS:-400}
deadline=${DEADLINE:-0}
fedhet=${FEDHET:-fedhet}

# the released code's settings: lr 0.01 (its 0.997 per-round decay is not modelled), batch 48, no momentum
common="dataset=fashion_mnist model=fedp3_cnn num_clients=100 client.lr=0.01 client.batch_size=48 \
dataset.partition.test_fraction=0.3 dataset.partition.alpha=0.5 dataset.partition.classes_per_client=5 \
sim.max_versions=$rounds sim.eval_every=$eval_every sim.personal_eval=true sim.finetune_epochs=5 \
sim.device=$device sim.threads=1 sim.progress=false${DATA_ROOT:+ dataset.root=$DATA_ROOT}"
full="strategy.scheduler.fraction=1.0 strategy.scheduler.min_clients=1 strategy.scheduler.round_timeout=1e9 \
strategy.scheduler.local_epochs=$epochs"

variant_overrides() {
  case $1 in
    fedavg) echo "strategy=fedavg $full" ;;
    lowerb|opu2|opu3) echo "strategy=fedp3 $full strategy.planner.variant=$1" ;;
    # the other shared layers pruned to half: opu2_k50, opu3_k50
    opu2_k50|opu3_k50) echo "strategy=fedp3 $full strategy.planner.variant=${1%_k50} strategy.planner.keep_ratio=0.5" ;;
    dp*) echo "strategy=fedp3 $full strategy.planner.variant=opu2 privacy.enabled=true \
privacy.target_epsilon=${1#dp} privacy.max_grad_norm=1.0 privacy.delta=1e-5" ;;
    compass_opu2) echo "strategy=fedcompass strategy.planner.name=fedp3 +strategy.planner.variant=opu2 \
strategy.scheduler.q_min=${Q_MIN:-5} strategy.scheduler.q_max=${Q_MAX:-18} sim.max_versions=100000000 \
sim.max_virtual_seconds=$compass_seconds sim.eval_interval=$((compass_seconds / 10))" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}

run_one() {  # partition $1, variant $2, seed $3
  local dir="$out/$1/$2/s$3" overrides t=()
  [ -e "$dir/DONE" ] && return 0
  overrides=$(variant_overrides "$2")
  mkdir -p "$dir"
  if [ "$deadline" != 0 ]; then
    local left=$((deadline - $(date +%s)))
    [ "$left" -le 5 ] && { echo "NOT STARTED (deadline): $1 $2 seed $3"; return 0; }
    t=(timeout "$left")
  fi
  # shellcheck disable=SC2086
  if "${t[@]}" $fedhet simulate $common $overrides "dataset.partition.name=$1" "seed=$3" \
    "hydra.run.dir=$dir" >"$dir/stdout.log" 2>&1; then
    touch "$dir/DONE"
  else
    echo "FAILED or timed out: $1 $2 seed $3 (see $dir/stdout.log)"
  fi
}
export -f run_one variant_overrides
export out fedhet common full epochs deadline compass_seconds

mkdir -p "$out"
{
  for s in $seeds; do for v in $dp_variants $compass_variants; do echo "dirichlet $v $s"; done; done  # slowest first
  for s in $seeds; do for p in $partitions; do for v in $variants; do echo "$p $v $s"; done; done; done
} | xargs -P "$jobs" -n 3 bash -c 'run_one "$0" "$1" "$2"'
