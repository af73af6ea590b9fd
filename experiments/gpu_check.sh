#!/usr/bin/env bash
# The GPU measurements of issue #6, from the repository root (MNIST verified into ./data):
#   experiments/gpu_check.sh OUT_DIR [STEP ...]      (no STEP: all of them, in this order)
#   tests         the CUDA tests (graph replay against eager steps)
#   bench         the benchmark's GPU rows, on all 50,000 training images
#   graphs        the 50 x 10 search, pruning off: the issue's "50 trials x 10 epochs" work
#   eager         its first 5 trials again without CUDA graphs (the same configs: same seed)
#   default       the default study (Hyperband) and its champion: retrain, test, export, register
#   default-eager the same without CUDA graphs: the default study before and after
#   load          the champion of `default` (this run's, or WORK's) loaded back and served here
#   workers       the 50 x 10 search with --workers 4 on the one GPU
# Each study starts in a fresh folder, so nothing is resumed. OUT_DIR gets log.txt, the GPU's
# utilization during `graphs` and one CSV of trials per study.
set -u
mkdir -p "${1:?usage: experiments/gpu_check.sh OUT_DIR [STEP ...]}" && out=$(realpath "$1") || exit 1
repo=$(pwd)
work=${WORK:-$(mktemp -d)}  # the studies' stores: big, so not in OUT_DIR; WORK=DIR keeps them
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export MNIST_SEARCH_DATA="$repo/data"  # one copy of MNIST for every step
log="$out/log.txt"
say() { echo "=== $* ($(date -u +%T))" | tee -a "$log"; }
say "studies in $work"

study() {  # study NAME TIMEOUT FLAGS...: a fresh folder, wall time, per-trial table
  local name=$1 limit=$2 dir="$work/$1"
  shift 2
  rm -rf "$dir" && mkdir -p "$dir"
  say "study $name: $*"
  local t0=$(date +%s.%N)
  (cd "$dir" && timeout "$limit" python3 -m mnist_search.study --study-name "$name" \
    --storage journal.log --tracking-uri "sqlite:///$dir/mlflow.db" \
    --device cuda "$@") >>"$log" 2>&1
  echo "exit $? after $(awk "BEGIN {print $(date +%s.%N) - $t0}") s wall" | tee -a "$log"
  (cd "$dir" && python3 - "$name" >"$out/trials-$name.csv" 2>>"$log") <<'EOF'
import sys
from mnist_search.storage import load_existing_study
study = load_existing_study(sys.argv[1], "journal.log")
df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
df["seconds"] = df.pop("duration").dt.total_seconds()
df.to_csv(sys.stdout, index=False)
print(f"{sys.argv[1]}: {len(df)} trials, {df.seconds.sum():.1f} s in trials, "
      f"best {study.best_value:.4f}", file=sys.stderr)
EOF
}

steps=${*:2}
steps=${steps:-tests bench graphs eager default default-eager load workers}
say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$log" 2>&1
python3 -c "import torch, optuna, mlflow; print('torch', torch.__version__, 'optuna',
optuna.__version__, 'mlflow', mlflow.__version__, 'cpus', __import__('os').cpu_count())" \
  >>"$log" 2>&1
say "data"
python3 -m mnist_search.data >>"$log" 2>&1
for step in $steps; do
  case $step in
  tests)
    say "CUDA tests"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train.py >>"$log" 2>&1 ;;
  bench)
    say "benchmark"
    timeout 120 python3 -m mnist_search.bench --device cuda --samples 50000 >>"$log" 2>&1 ;;
  graphs)
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 250 \
      >"$out/util.txt" &
    util=$!
    study graphs 200 --trials 50 --pruner none --no-champion
    kill $util ;;
  eager) study eager 90 --trials 5 --pruner none --no-champion --no-cuda-graphs ;;
  default) study default 150 --trials 50 ;;
  default-eager) study default-eager 240 --trials 50 --no-cuda-graphs ;;
  load)
    say "load the champion of 'default' on this GPU machine"
    (cd "$work/default" && timeout 120 python3 "$repo/experiments/gpu_load_check.py") \
      >>"$log" 2>&1
    ;;
  workers) study workers4 150 --trials 50 --pruner none --no-champion --workers 4 ;;
  *) say "unknown step $step" ;;
  esac
done
say "done"
