#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers of outside input (tests/fuzz): builds the libFuzzer targets into
# ${FUZZ_BUILD_DIR:-build-fuzz} (clang, ASan + UBSan, CUDA off) and runs each for SECONDS (default 20) on a copy
# of its seed corpus in a scratch directory, so the repository's corpus is never written to. Exits non-zero
# when any target crashes, hangs (-timeout), runs out of memory (-rss_limit_mb) or reports a sanitizer error;
# the input that did it is kept in the build directory's fuzz-artifacts/. Prints each target's executions.
#   scripts/fuzz.sh [SECONDS]          (FUZZ_TARGETS="fuzz_gguf fuzz_tasks" runs only those)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
build=${FUZZ_BUILD_DIR:-build-fuzz}
CC=clang CXX=clang++ cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPOLAR_CUDA=OFF \
  -DPOLAR_FUZZ=ON -DPOLAR_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target fuzz_all

# Longest input per target: a few times the largest seed, small enough for many executions a second.
declare -A max_len=(
  [fuzz_safetensors]=16384 [fuzz_gguf]=16384 [fuzz_dequantize]=4096 [fuzz_model_config]=4096
  [fuzz_tokenizer_hf]=16384 [fuzz_tokenize]=4096 [fuzz_routers]=16384 [fuzz_tasks]=8192
  [fuzz_chat_template]=4096 [fuzz_openai_request]=4096
)
scratch_root=/dev/shm
[ -d "$scratch_root" ] && [ -w "$scratch_root" ] || scratch_root=${TMPDIR:-/tmp}
work=$(mktemp -d "$scratch_root/polar-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
artifacts="$PWD/$build/fuzz-artifacts"
mkdir -p "$artifacts"

read -r -a targets <<<"${FUZZ_TARGETS:-$(printf '%s\n' "${!max_len[@]}" | sort | tr '\n' ' ')}"
failed=()
for target in "${targets[@]}"; do
  [ -n "${max_len[$target]:-}" ] || { echo "no fuzz target $target" >&2; exit 2; }
  mkdir -p "$work/$target/corpus" "$work/$target/tmp"
  cp tests/fuzz/corpus/"$target"/* "$work/$target/corpus/"
  dict=()
  [ -f "tests/fuzz/$target.dict" ] && dict=(-dict="tests/fuzz/$target.dict")
  log="$work/$target/log"
  # One OpenMP thread: the parsers' parallel loops add nothing to coverage, and a fuzzer should own one core.
  if OMP_NUM_THREADS=1 TMPDIR="$work/$target/tmp" ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
      "$build/tests/fuzz/$target" "$work/$target/corpus" "${dict[@]}" -max_total_time="$seconds" -timeout=10 \
      -rss_limit_mb=2048 -max_len="${max_len[$target]}" -print_final_stats=1 -artifact_prefix="$artifacts/$target-" \
      >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "$target: ok, $execs executions in ${seconds} s, corpus $(ls "$work/$target/corpus" | wc -l) inputs"
  else
    echo "$target: FAILED" >&2
    tail -n 60 "$log" >&2
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing failed: ${failed[*]} (reproducers in $artifacts)" >&2
  exit 1
fi
