#!/usr/bin/env bash
# Tokens/s of `polar generate` on the default model on an idle machine and beside a busy loop of as many
# threads as there are cores, for OpenMP settings: polar's default (OMP_WAIT_POLICY=passive unless one is
# set, README "CPU threads"), libgomp's own default (spin 300000 before sleeping), a spin of 10000, one
# thread. Reps interleaved; one line per run on stderr, the medians on stdout.
# Usage: scripts/cpu-contention.sh [REPS] [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
model=${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
configs=("polar-default" "GOMP_SPINCOUNT=300000" "GOMP_SPINCOUNT=10000" "OMP_NUM_THREADS=1")
run() {
  local c=$1 e=()
  [ "$c" != polar-default ] && e=("$c")
  env "${e[@]}" ./build/src/polar generate --model "$model" --prompt "Once upon a time" --max-tokens 64 \
    --temperature 0 2>&1 >/dev/null | sed -n 's/.*decode: .*(\([0-9.]*\) tok\/s).*/\1/p'
}
busy_pids=()
stop_busy() { [ ${#busy_pids[@]} -gt 0 ] && kill "${busy_pids[@]}" 2>/dev/null; busy_pids=(); }
trap stop_busy EXIT
results=$(mktemp)
for mode in idle busy; do
  if [ $mode = busy ]; then
    for _ in $(seq "$(nproc)"); do timeout 900 sh -c 'while :; do :; done' & busy_pids+=($!); done
    sleep 1
  fi
  for rep in $(seq "$reps"); do
    for c in "${configs[@]}"; do
      t=$(run "$c"); echo "$mode $c $t" | tee -a "$results" >&2
    done
  done
  stop_busy
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-26s %12s %12s\n' setting "idle tok/s" "busy tok/s"
for c in "${configs[@]}"; do
  med() { grep "^$1 $c " "$results" | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  printf '%-26s %12s %12s\n' "$c" "$(med idle)" "$(med busy)"
done
rm -f "$results"
