#!/usr/bin/env bash
# The GPU round, on a machine with an NVIDIA Hopper GPU and the CUDA toolkit: builds polar with CUDA for
# sm_90a, runs every test (the CUDA parity and end-to-end tests included), runs the benchmarks, and writes
# logs, CSVs and plots to a results folder; a short summary table comes last.
#
#   scripts/gpu-check.sh [STAGE ...]   stages: build test kernels bench sparse serve serve-http tp (default: all,
#                                      in that order), tp-multi (several GPUs), adaptive (issue 19's accuracy
#                                      sweep, long), adaptive-speed (its decode speed points) and profile
#                                      (Nsight Compute: the kernels of a decode step, decode attention beside
#                                      SDPA): only when named
#
# Environment:
#   RESULTS         results folder (default: $OUT if set, else out/gpu-check)
#   BUILD_DIR       build folder (default: build-gpu)
#   POLAR_SHARED    the shared fixtures/models (default ../shared beside the repo)
#   POLAR_DEPS_DIR  a folder with Debian packages unpacked into it (dpkg -x), for machines that lack
#                   headers polar needs (PCRE2); its pkg-config files are used with their prefix moved there
#   BENCH_SHAPES    shapes for the decode sweep (default "llama-2-7b opt-6.7b")
#   BENCH_BATCHES   default 1,8,32,64,128,256;  BENCH_CTX  default 512,1024,2048,4096
#   SPARSE_POINTS   sparse-vs-dense sweeps as shape:ctx:density (default: the issue's three; random routers)
#   SPARSE_BATCHES  default 1,8,16,32,64,128,256
#   SERVE_RUNS      bench-serve workloads, by name from the table in the serve stage (default: all of them)
#   SERVE_SCALE     divides every workload's request count (default 1; e.g. 8 for a quick smoke run)
#   HTTP_RATES      request rates of the serve-http stage (default 4,8,16,inf)
#   TP_SHAPES       shapes of the tp stage: decode at --tp 1 plainly and through a one-rank NCCL communicator
#                   (--tp-comm), what the collectives cost (default "llama-2-7b opt-6.7b")
#   TP_SIZES        tensor-parallel sizes of the tp-multi stage, on a machine with that many GPUs (default
#                   "2 4 8"; sizes above the GPU count are skipped)
#   ADAPTIVE_MODEL  the adaptive stage's model (default models/SmolLM2-135M-Instruct.Q4_1.gguf: carry it, the
#                   GPU machine cannot fetch it); stories260K from POLAR_SHARED runs too
#   ADAPTIVE_ROUTERS  its router file with selection statistics (default: calibrated in the stage, on the GPU,
#                   ADAPTIVE_CALIB_TOKENS tokens, default 100000); stories260K's is always calibrated there
#   ADAPTIVE_LIMIT  items per task (default 150: the GPU's 123 gave a paired standard error of 0.8 points for the
#                   8-task mean), ADAPTIVE_DENSITIES target densities (default 0.5,0.67,0.8), ADAPTIVE_PPL_TOKENS
#                   WikiText-2 tokens (default 65536), ADAPTIVE_RULES and ADAPTIVE_GRANULARITIES (default: all
#                   of scripts/adaptive-sweep.sh's: 9 rules x 2 granularities, each an eval run of 1 + densities
#                   passes; the stage's GPU time is not known yet: cut these first)
#   PROFILE_POINTS  the profile stage's decode steps as shape:ctx:batch:density (default "llama-2-7b:3968:1:1
#                   llama-2-7b:3968:1:0.5 llama-2-7b:3968:16:1 llama-2-7b:3968:16:0.5"): per kernel, its
#                   device time in the profiled step, beside the graph-replayed step's time
#   PROFILE_ATTENTION  the decode attention shape profiled in full, polar's and SDPA's (default 16x3968x32x32x128;
#                   empty: none)
#   ADAPTIVE_BENCH  speed points as shape:ctx:density (default "llama-2-7b:3968:0.5 llama-3-8b:8192:0.625"):
#                   dense, top-k and stat-topk on random routers (c from synthetic normal scores)
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS=${RESULTS:-${OUT:-out/gpu-check}}
BUILD_DIR=${BUILD_DIR:-build-gpu}
BENCH_SHAPES=${BENCH_SHAPES:-"llama-2-7b opt-6.7b"}
BENCH_BATCHES=${BENCH_BATCHES:-1,8,32,64,128,256}
BENCH_CTX=${BENCH_CTX:-512,1024,2048,4096}
SPARSE_POINTS=${SPARSE_POINTS:-"opt-6.7b:1920:0.5 llama-2-7b:3968:0.5 llama-3-8b:8192:0.625"}
SPARSE_BATCHES=${SPARSE_BATCHES:-1,8,16,32,64,128,256}
TP_SHAPES=${TP_SHAPES:-"llama-2-7b opt-6.7b"}
mkdir -p "$RESULTS"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test kernels bench sparse serve serve-http tp)  # tp-multi: by name
has_stage() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
log() { echo "[gpu-check] $*" >&2; }

if [ -n "${POLAR_DEPS_DIR:-}" ]; then
  pc_dir="$RESULTS/.pkgconfig"
  mkdir -p "$pc_dir"
  deps=$(cd "$POLAR_DEPS_DIR" && pwd)
  for pc in "$deps"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
    sed "s|^prefix=.*|prefix=$deps/usr|" "$pc" > "$pc_dir/$(basename "$pc")"
  done
  export PKG_CONFIG_PATH="$(cd "$pc_dir" && pwd)${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$RESULTS/gpu.csv"
log "GPU: $(tail -1 "$RESULTS/gpu.csv")"

if has_stage build; then
  log "configuring and building in $BUILD_DIR"
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPOLAR_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES=90a > "$RESULTS/configure.log" 2>&1 || { tail -30 "$RESULTS/configure.log"; exit 1; }
  cmake --build "$BUILD_DIR" -j"$(nproc)" > "$RESULTS/build.log" 2>&1 || { grep -E "error" -A5 "$RESULTS/build.log" | head -60; exit 1; }
  log "build ok"
fi

test_summary="not run"
if has_stage test; then
  log "running the tests"
  # CPU tests in parallel, GPU tests one at a time so they do not share the device.
  export OMP_WAIT_POLICY=passive OPENBLAS_NUM_THREADS=2
  set +e
  (cd "$BUILD_DIR" && ctest -j8 -E 'Cuda' --output-on-failure) > "$RESULTS/tests-cpu.log" 2>&1
  cpu_rc=$?
  (cd "$BUILD_DIR" && ctest -j1 -R 'Cuda' --output-on-failure) > "$RESULTS/tests-gpu.log" 2>&1
  gpu_rc=$?
  set -e
  cpu_line=$(grep -E "tests passed" "$RESULTS/tests-cpu.log" || echo "cpu tests: no summary")
  gpu_line=$(grep -E "tests passed" "$RESULTS/tests-gpu.log" || echo "gpu tests: no summary")
  test_summary="cpu: $cpu_line | gpu: $gpu_line"
  if [ $cpu_rc -ne 0 ]; then
    grep -E "Failed|FAILED|Failure|Expected|Which is|rel_err|error" "$RESULTS/tests-cpu.log" | head -40 || true
  fi
  if [ $gpu_rc -ne 0 ]; then
    grep -E "FAILED|Failure|Expected|Which is|Value of|actual|error|Trace|step|row" "$RESULTS/tests-gpu.log" | head -80 || true
  fi
fi

if has_stage kernels; then
  log "kernel benchmarks (polar) and the same shapes in PyTorch"
  "$BUILD_DIR/src/polar" bench-kernels --device cuda --density 1,0.5,0.3 --csv "$RESULTS/kernels.csv" > "$RESULTS/kernels.txt" \
    2> "$RESULTS/kernels.log" || tail -20 "$RESULTS/kernels.log"
  python3 scripts/torch_reference.py --csv "$RESULTS/kernels-torch.csv" 2> "$RESULTS/kernels-torch.log" ||
    tail -20 "$RESULTS/kernels-torch.log"
fi

if has_stage bench; then
  log "decode benchmarks: $BENCH_SHAPES, batch $BENCH_BATCHES, ctx $BENCH_CTX"
  for shape in $BENCH_SHAPES; do
    "$BUILD_DIR/src/polar" bench --device cuda --shape "$shape" --batch "$BENCH_BATCHES" --ctx "$BENCH_CTX" \
      --csv "$RESULTS/bench-$shape.csv" > "$RESULTS/bench-$shape.txt" 2> "$RESULTS/bench-$shape.log" ||
      { tail -20 "$RESULTS/bench-$shape.log"; }
  done
fi

if has_stage sparse; then
  log "sparse vs dense decode: $SPARSE_POINTS, batch $SPARSE_BATCHES"
  for point in $SPARSE_POINTS; do
    IFS=: read -r shape ctx density <<< "$point"
    for d in 1 "$density"; do
      "$BUILD_DIR/src/polar" bench --device cuda --shape "$shape" --batch "$SPARSE_BATCHES" --ctx "$ctx" --density "$d" \
        --csv "$RESULTS/sparse-$shape-d$d.csv" > "$RESULTS/sparse-$shape-d$d.txt" 2> "$RESULTS/sparse-$shape-d$d.log" ||
        { tail -20 "$RESULTS/sparse-$shape-d$d.log"; }
    done
  done
  # The anchors page's gpt-fast-style PyTorch step at the same points (Llama shapes only), for polar beside it
  # on the same card.
  steps=()
  for point in $SPARSE_POINTS; do
    IFS=: read -r shape ctx density <<< "$point"
    case "$shape" in llama-*) steps+=("$shape:$ctx:$SPARSE_BATCHES") ;; esac
  done
  if [ ${#steps[@]} -gt 0 ]; then
    python3 scripts/torch_reference.py --csv "$RESULTS/sparse-torch-step.csv" --step "${steps[@]}" \
      2> "$RESULTS/sparse-torch-step.log" || tail -20 "$RESULTS/sparse-torch-step.log"
  fi
fi

# Serving (issue 14): bench-serve dense vs sparse in one process per workload, random routers. (a) decode-heavy,
# (b) long context (prompts end at 3840, not 3968, so that prompt + 256 outputs fit llama-2's 4096 positions),
# (c) online: Poisson arrivals from light load to past saturation.
declare -A serve_workloads=(
  [a-llama-2-7b]="--shape llama-2-7b --density 0.5 --requests 256 --prompt-len 512-1024 --output-len 1024 --max-seqs 64"
  [b-llama-2-7b]="--shape llama-2-7b --density 0.5 --requests 128 --prompt-len 3000-3840 --output-len 256 --max-seqs 64"
  [probe]="--shape llama-2-7b --density 0.5 --requests 40 --prompt-len 256-512 --output-len 256 --max-seqs 64 --request-rate 4"
  [c-llama-2-7b]="--shape llama-2-7b --density 0.5 --requests 80 --prompt-len 256-512 --output-len 512 --max-seqs 64 --request-rate 2,4,8,16"
  [a-opt-6.7b]="--shape opt-6.7b --density 0.5 --requests 256 --prompt-len 512-1024 --output-len 1024 --max-seqs 64"
  [a-llama-3-8b]="--shape llama-3-8b --density 0.625 --requests 256 --prompt-len 512-1024 --output-len 1024 --max-seqs 64"
)
SERVE_RUNS=${SERVE_RUNS:-"a-llama-2-7b b-llama-2-7b c-llama-2-7b a-opt-6.7b a-llama-3-8b"}
SERVE_SCALE=${SERVE_SCALE:-1}
if has_stage serve; then
  for run in $SERVE_RUNS; do
    args=${serve_workloads[$run]:?"unknown serve workload $run"}
    read -r -a argv <<< "$args"
    for i in "${!argv[@]}"; do  # --requests N / SERVE_SCALE
      [ "${argv[$i]}" = --requests ] && argv[$((i + 1))]=$(( (argv[$((i + 1))] + SERVE_SCALE - 1) / SERVE_SCALE ))
    done
    log "bench-serve $run: ${argv[*]}"
    plot=()  # without gnuplot here: bench-serve --from-csv CSV --plot PNG draws it elsewhere
    command -v gnuplot >/dev/null && plot=(--plot "$RESULTS/serve-$run.png")
    "$BUILD_DIR/src/polar" bench-serve --device cuda "${argv[@]}" --json --csv "$RESULTS/serve-$run.csv" "${plot[@]}" \
      > "$RESULTS/serve-$run.json" 2> "$RESULTS/serve-$run.log" ||
      { tail -20 "$RESULTS/serve-$run.log"; continue; }
    # The dense run against decode-only steps at its mean running batch and mean decode context.
    if [[ $run == a-* ]]; then
      read -r shape batch ctx < <(python3 - "$RESULTS/serve-$run.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
d = next(r for r in j["runs"] if r["mode"] == "dense")
lo, hi = (int(x) for x in j["workload"]["prompt_len"].split("-"))
out = int(j["workload"]["output_len"])
print(j["shape"], round(d["mean_batch"]), (lo + hi) // 2 + out // 2)
PY
      )
      "$BUILD_DIR/src/polar" bench --device cuda --shape "$shape" --batch "$batch" --ctx "$ctx" --json \
        > "$RESULTS/serve-$run-decode-only.json" 2> "$RESULTS/serve-$run-decode-only.log" ||
        tail -20 "$RESULTS/serve-$run-decode-only.log"
    fi
  done
fi

# Serving over HTTP (issue 15): `polar serve` on the llama-2-7b shape, dense (--density 1) and then sparse
# (--density 0.5), each loaded by `bench-serve --url` with the online workload at HTTP_RATES (inf: all at once,
# saturation); then the same workload in process (dense and sparse), for the HTTP layer's share. Same KV cache
# size everywhere (64 requests of 1024 tokens).
HTTP_RATES=${HTTP_RATES:-4,8,16,inf}
http_workload=(--shape llama-2-7b --requests 80 --prompt-len 256-512 --output-len 512 --request-rate "$HTTP_RATES")
http_batching=(--max-seqs 64 --kv-tokens 65536)
if has_stage serve-http; then
  port=18080
  for mode in dense sparse; do
    density=1; [ $mode = sparse ] && density=0.5
    log "polar serve ($mode, density $density) and bench-serve --url at rates $HTTP_RATES"
    "$BUILD_DIR/src/polar" serve --device cuda --shape llama-2-7b --density $density "${http_batching[@]}" \
      --host 127.0.0.1 --port $port > "$RESULTS/serve-http-$mode-server.log" 2>&1 &
    server=$!
    for _ in $(seq 600); do  # up to 5 minutes to load
      curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
      kill -0 $server 2>/dev/null || break
      sleep 0.5
    done
    "$BUILD_DIR/src/polar" bench-serve --url "http://127.0.0.1:$port" "${http_workload[@]}" --json \
      --csv "$RESULTS/serve-http-$mode.csv" > "$RESULTS/serve-http-$mode.json" 2> "$RESULTS/serve-http-$mode.log" ||
      tail -20 "$RESULTS/serve-http-$mode.log" "$RESULTS/serve-http-$mode-server.log"
    curl -s "http://127.0.0.1:$port/metrics" > "$RESULTS/serve-http-$mode-metrics.txt" || true
    kill -TERM $server 2>/dev/null || true
    wait $server || log "polar serve ($mode) exited with $?"
  done
  log "the same workload in process"
  "$BUILD_DIR/src/polar" bench-serve --device cuda "${http_workload[@]}" --density 0.5 "${http_batching[@]}" --json \
    --csv "$RESULTS/serve-http-inprocess.csv" > "$RESULTS/serve-http-inprocess.json" \
    2> "$RESULTS/serve-http-inprocess.log" || tail -20 "$RESULTS/serve-http-inprocess.log"
fi

if has_stage tp; then
  log "tensor-parallel communicator at --tp 1: $TP_SHAPES"
  for shape in $TP_SHAPES; do
    for mode in plain comm; do
      flag=(); [ "$mode" = comm ] && flag=(--tp-comm)
      "$BUILD_DIR/src/polar" bench --device cuda --shape "$shape" --batch 1,8,32,128 --ctx 1024 "${flag[@]}" \
        --csv "$RESULTS/tp-$shape-$mode.csv" > "$RESULTS/tp-$shape-$mode.txt" 2> "$RESULTS/tp-$shape-$mode.log" ||
        { tail -20 "$RESULTS/tp-$shape-$mode.log"; }
    done
  done
fi

# Tensor parallelism over several GPUs (issue 17; needs a machine with TP_SIZES GPUs, NCCL, NVLS off):
# parity of --tp N with --tp 1 on stories260K (greedy text and perplexity, dense and with random routers in
# both --tp-heads modes), then decode steps dense and sparse at each size: opt-66b (head density 0.3) and
# llama-3.1-70b (group density 0.625) at the sizes that hold them, llama-2-7b (density 0.5) at every size
# with the same total batch, global and balanced head selection side by side.
TP_SIZES=${TP_SIZES:-"2 4 8"}
if has_stage tp-multi; then
  gpus=$(nvidia-smi -L | wc -l)
  export NCCL_NVLS_ENABLE=0
  stories="${POLAR_SHARED:-../shared}/models/stories260K/stories260K.gguf"
  text="${POLAR_SHARED:-../shared}/data/text/wikitext2_test.txt"
  polar="$BUILD_DIR/src/polar"
  "$polar" routers --random --model "$stories" --out "$RESULTS/stories260K.routers.safetensors" >> "$RESULTS/tp-multi.log" 2>&1
  for n in 1 $TP_SIZES; do  # stories260K splits over 1, 2 and 4 ranks (its MLP has 172 neurons); 8 says so
    [ "$n" -gt "$gpus" ] && { log "skipping --tp $n: $gpus GPUs"; continue; }
    log "parity at --tp $n (stories260K)"
    "$polar" generate --device cuda --tp "$n" --model "$stories" --prompt "Once upon a time" --max-tokens 48 \
      > "$RESULTS/tp$n-generate.txt" 2>> "$RESULTS/tp-multi.log" || echo "generate --tp $n failed" >> "$RESULTS/tp-multi.log"
    for heads in global balanced; do
      "$polar" perplexity --device cuda --tp "$n" --model "$stories" --text "$text" --ctx 256 --max-tokens 20000 \
        --routers "$RESULTS/stories260K.routers.safetensors" --density 0.5 --tp-heads "$heads" --json > "$RESULTS/tp$n-ppl-$heads.json" 2>> "$RESULTS/tp-multi.log" ||
        echo "perplexity --tp $n --tp-heads $heads failed" >> "$RESULTS/tp-multi.log"
    done
    for point in opt-66b:1920:0.3:2,4 llama-3.1-70b:8192:0.625:4,8 llama-2-7b:3968:0.5:1,2,4,8; do
      IFS=: read -r shape ctx density sizes <<< "$point"
      [[ ",$sizes," == *",$n,"* ]] || continue
      for mode in dense global balanced; do
        [ "$mode" = balanced ] && [ "$n" = 1 ] && continue
        args=(--density 1); [ "$mode" != dense ] && args=(--density "$density" --tp-heads "$mode")
        log "bench $shape --tp $n $mode"
        "$polar" bench --device cuda --tp "$n" --shape "$shape" --ctx "$ctx" --batch 1,8,32,64,128,192 "${args[@]}" \
          --csv "$RESULTS/tp$n-$shape-$mode.csv" > "$RESULTS/tp$n-$shape-$mode.txt" 2>> "$RESULTS/tp-multi.log" ||
          log "bench $shape --tp $n $mode failed"
      done
    done
  done
fi

# Adaptive selection (issue 19): the accuracy sweep (scripts/adaptive-sweep.sh: every rule and baseline at each
# target density, group and head granularity, the eight tasks and WikiText-2, the density each run reached)
# for the default model and stories260K, then decode speed at the issue's two points for top-k and stat-topk.
ADAPTIVE_BENCH=${ADAPTIVE_BENCH:-"llama-2-7b:3968:0.5 llama-3-8b:8192:0.625"}
if has_stage adaptive; then
  shared=${POLAR_SHARED:-../shared}
  smol=${ADAPTIVE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
  # The sweep's own defaults (every rule, both granularities) unless these narrow them.
  [ -n "${ADAPTIVE_RULES:-}" ] && export RULES="$ADAPTIVE_RULES"
  [ -n "${ADAPTIVE_GRANULARITIES:-}" ] && export GRANULARITIES="$ADAPTIVE_GRANULARITIES"
  for spec in "$smol:smollm2:${ADAPTIVE_ROUTERS:-}" "$shared/models/stories260K/stories260K.gguf:stories260K:"; do
    IFS=: read -r model name routers <<< "$spec"
    [ -f "$model" ] || { log "adaptive: no model at $model, skipped"; continue; }
    log "adaptive accuracy sweep: $name"
    POLAR="$BUILD_DIR/src/polar" DEVICE=cuda ROUTERS="$routers" CALIB_TOKENS="${ADAPTIVE_CALIB_TOKENS:-100000}" \
      EVAL_LIMIT="${ADAPTIVE_LIMIT:-150}" DENSITIES="${ADAPTIVE_DENSITIES:-0.5,0.67,0.8}" \
      PPL_TOKENS="${ADAPTIVE_PPL_TOKENS:-65536}" scripts/adaptive-sweep.sh "$model" "$RESULTS/adaptive-$name" \
      > "$RESULTS/adaptive-$name.txt" 2> "$RESULTS/adaptive-$name.log" || tail -20 "$RESULTS/adaptive-$name.log"
  done
fi
if has_stage adaptive-speed; then
  for point in $ADAPTIVE_BENCH; do
    IFS=: read -r shape ctx density <<< "$point"
    for run in dense topk stat-topk; do
      args=(--density "$density"); [ $run = dense ] && args=(--density 1)
      [ $run = stat-topk ] && args+=(--selection stat-topk)
      log "adaptive speed: $shape ctx $ctx $run"
      "$BUILD_DIR/src/polar" bench --device cuda --shape "$shape" --ctx "$ctx" --batch "$SPARSE_BATCHES" "${args[@]}" \
        --json --csv "$RESULTS/adaptive-bench-$shape-$run.csv" > "$RESULTS/adaptive-bench-$shape-$run.json" \
        2> "$RESULTS/adaptive-bench-$shape-$run.log" || tail -20 "$RESULTS/adaptive-bench-$shape-$run.log"
    done
  done
fi

# Where a step's time goes (issue 18's small batches), with Nsight Compute (Nsight Systems cannot make
# reports on these machines: the device tool's KINDS.md): the profiled decode step of `polar bench` (op by
# op, the span the backend opens with cudaProfilerStart) under `ncu --profile-from-start off`, one duration
# per kernel, set beside the graph-replayed step time of the same run: the difference is what launch gaps
# and host work cost. Then the full Nsight Compute sections of one decode attention launch, polar's and
# PyTorch SDPA's on the same shape (PROFILE_ATTENTION), for issue 18's attention target.
PROFILE_POINTS=${PROFILE_POINTS:-"llama-2-7b:3968:1:1 llama-2-7b:3968:1:0.5 llama-2-7b:3968:16:1 llama-2-7b:3968:16:0.5"}
PROFILE_ATTENTION=${PROFILE_ATTENTION-16x3968x32x32x128}  # empty: no attention profiles
if has_stage profile; then
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
  if [ -z "$ncu" ]; then
    log "profile: no ncu on this machine, skipped"
  else
    ncu_flags=(--profile-from-start off --clock-control none)
    for point in $PROFILE_POINTS; do
      IFS=: read -r shape ctx batch density <<< "$point"
      name="profile-$shape-c$ctx-b$batch-d$density"
      log "profile: $shape ctx $ctx batch $batch density $density"
      bench=("$BUILD_DIR/src/polar" bench --device cuda --shape "$shape" --ctx "$ctx" --batch "$batch" --density "$density")
      "${bench[@]}" --steps 20 --csv "$RESULTS/$name-bench.csv" > "$RESULTS/$name.log" 2>&1 || { tail -5 "$RESULTS/$name.log"; continue; }
      # Caches left as the kernel before left them (--cache-control none), as in a step: ncu's default flush
      # made B1's kernels add up to 7.48 ms against a 6.46 ms graph step (H100, 2026-12-07).
      "$ncu" "${ncu_flags[@]}" --cache-control none --metrics gpu__time_duration.sum --csv --page raw --print-units base \
        "${bench[@]}" --steps 1 \
        > "$RESULTS/$name-ncu.csv" 2>> "$RESULTS/$name.log" || tail -5 "$RESULTS/$name.log"
    done
    shape=$PROFILE_ATTENTION
    if [ -n "$shape" ]; then
      "$ncu" "${ncu_flags[@]}" --set full -k regex:attention_kernel -c 1 "$BUILD_DIR/src/polar" bench-kernels --device cuda \
        --attention "$shape" --density 1 > "$RESULTS/profile-attention-polar.txt" 2>&1 || tail -5 "$RESULTS/profile-attention-polar.txt"
      "$ncu" --clock-control none --set full -k regex:'flash|fmha|attention' -c 1 python3 scripts/torch_reference.py \
        --csv "$RESULTS/profile-attention-sdpa.csv" --gemm --attention "$shape" > "$RESULTS/profile-attention-sdpa.txt" 2>&1 ||
        tail -5 "$RESULTS/profile-attention-sdpa.txt"
    fi
  fi
fi

echo
echo "== gpu-check summary ($(date -u +%Y-%m-%d), $(tail -1 "$RESULTS/gpu.csv" | cut -d, -f1)) =="
echo "tests: $test_summary"
if [ -f "$RESULTS/kernels.csv" ] && [ -f "$RESULTS/kernels-torch.csv" ]; then
  echo "-- kernels: polar vs PyTorch (same shapes, same run) or, for the sparse kernels, the published"
  echo "   Polar Sparsity reference kernels (Triton, H100 80GB; issue 4's table)"
  python3 - "$RESULTS/kernels.csv" "$RESULTS/kernels-torch.csv" <<'PY'
import csv, sys
ours = {(r["kernel"], r["shape"]): r for r in csv.DictReader(open(sys.argv[1]))}
ref = {(r["kernel"], r["shape"]): float(r["torch_ms"]) for r in csv.DictReader(open(sys.argv[2]))}
published = {("attention", f"{s} d{d}"): ms for s, d, ms in [
    ("B64 N1920 H72/72 dh128", 0.5, 0.935), ("B64 N1920 H72/72 dh128", 0.3, 0.587),
    ("B16 N3968 H32/32 dh128", 0.5, 0.561), ("B16 N3968 H32/32 dh128", 0.3, 0.249),
    ("B128 N1920 H32/32 dh128", 0.5, 0.813), ("B128 N1920 H32/32 dh128", 0.3, 0.519)]}
for b, up, down in [(16, 0.133, 0.147), (64, 0.136, 0.251), (256, 0.219, 0.322)]:
    published[("gather_up", f"B{b} d9216 D36864 d0.5")] = up
    published[("gather_down", f"B{b} d9216 D36864 d0.5")] = down
published[("gather_down", "B64 d4096 D16384 d0.1")] = 0.019
published[("gather_down", "B256 d4096 D16384 d0.1")] = 0.151
print(f"{'kernel':<11} {'shape':<28} {'polar ms':>9} {'ref ms':>9} {'ref/polar':>9} {'GB/s':>6} {'of read':>8} {'of copy':>8}")
for key, r in ours.items():
    t = ref.get(key, published.get(key))
    ms = float(r["ms"])
    src = "" if key in ref else (" (published)" if t else "")
    print(f"{key[0]:<11} {key[1]:<28} {ms:>9.4f} {t if t else float('nan'):>9.4f} {(t / ms) if t else float('nan'):>9.2f} "
          f"{float(r['gb_per_s']):>6.0f} {100 * float(r['of_read']):>7.0f}% {100 * float(r['of_copy']):>7.0f}%{src}")
PY
fi
if has_stage bench; then
  for shape in $BENCH_SHAPES; do
    [ -f "$RESULTS/bench-$shape.txt" ] && { echo "-- $shape"; cat "$RESULTS/bench-$shape.txt"; }
  done
fi
if has_stage sparse; then
  echo "-- sparse vs dense (tokens/s; speedup = sparse / dense; ideal = dense step_ms / sparse floor_ms)"
  for point in $SPARSE_POINTS; do
    IFS=: read -r shape ctx density <<< "$point"
    sparse="$RESULTS/sparse-$shape-d$density.csv" dense="$RESULTS/sparse-$shape-d1.csv"
    if [ -f "$sparse" ] && [ -f "$dense" ]; then
      "$BUILD_DIR/src/polar" bench --from-csv "$sparse" --baseline "$dense" || echo "($shape: comparison failed)"
    fi
  done
fi
if has_stage serve; then
  echo "-- serving (bench-serve; ratio = sparse / dense at the same rate)"
  python3 - "$RESULTS" $SERVE_RUNS <<'PY'
import json, os, sys
res = sys.argv[1]
print(f"{'workload':<14} {'mode':<6} {'rate':>5} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>8} "
      f"{'TPOT p99':>8} {'batch':>6} {'preempt':>7} {'sched%':>6}")
for run in sys.argv[2:]:
    path = f"{res}/serve-{run}.json"
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        print(f"{run:<14} (no result)")
        continue
    j = json.load(open(path))
    for r in j["runs"]:
        print(f"{run:<14} {r['mode']:<6} {r['rate']:>5} {r['output_tok_per_s']:>9.0f} {r['ttft_ms']['p50']:>9.1f} "
              f"{r['ttft_ms']['p99']:>9.1f} {r['tpot_ms']['p50']:>8.2f} {r['tpot_ms']['p99']:>8.2f} "
              f"{r['mean_batch']:>6.1f} {r['preemptions']:>7.0f} {r['sched_pct']:>6.2f}")
    for c in j["sparse_vs_dense"]:
        print(f"{run:<14} ratio  {c['rate']:>5} {c['output_throughput_ratio']:>9.3f} {'':>9} {c['ttft_p99_ratio']:>9.3f} "
              f"{c['tpot_p50_ratio']:>8.3f}")
    d = f"{res}/serve-{run}-decode-only.json"
    if os.path.exists(d) and os.path.getsize(d) > 0:
        p = json.load(open(d))["rows"][0]
        dense = next(r for r in j["runs"] if r["mode"] == "dense")
        print(f"{run:<14} decode-only bench at batch {p['batch']} ctx {p['ctx']}: {p['tokens_per_s']:.0f} tok/s; "
              f"served dense = {dense['output_tok_per_s'] / p['tokens_per_s']:.3f} of it")
PY
fi
if has_stage serve-http; then
  echo "-- serving over HTTP (polar serve + bench-serve --url) against in process, llama-2-7b (http/in-proc = ratio)"
  python3 - "$RESULTS" <<'PY'
import json, os, sys
res = sys.argv[1]
def runs(path, mode=None):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return {}
    return {r["rate"]: r for r in json.load(open(path))["runs"] if mode is None or r["mode"] == mode}
print(f"{'mode':<6} {'rate':>5} {'http tok/s':>10} {'inproc':>8} {'ratio':>6} {'TTFT p50 h/i (ms)':>18} "
      f"{'TTFT p99 h/i (ms)':>18} {'TPOT p50 h/i':>13} {'TPOT p99 h/i':>13}")
for mode in ("dense", "sparse"):
    http, inproc = runs(f"{res}/serve-http-{mode}.json"), runs(f"{res}/serve-http-inprocess.json", mode)
    for rate, h in http.items():
        i = inproc.get(rate)
        if not i:
            continue
        print(f"{mode:<6} {rate:>5} {h['output_tok_per_s']:>10.0f} {i['output_tok_per_s']:>8.0f} "
              f"{h['output_tok_per_s'] / i['output_tok_per_s']:>6.3f} "
              f"{h['ttft_ms']['p50']:>8.1f}/{i['ttft_ms']['p50']:<9.1f} {h['ttft_ms']['p99']:>8.1f}/{i['ttft_ms']['p99']:<9.1f} "
              f"{h['tpot_ms']['p50']:>6.2f}/{i['tpot_ms']['p50']:<6.2f} {h['tpot_ms']['p99']:>6.2f}/{i['tpot_ms']['p99']:<6.2f}")
PY
fi
if has_stage tp; then
  for shape in $TP_SHAPES; do
    for mode in plain comm; do
      [ -f "$RESULTS/tp-$shape-$mode.txt" ] && { echo "-- $shape --tp 1, $mode"; cat "$RESULTS/tp-$shape-$mode.txt"; }
    done
  done
fi
if has_stage profile; then
  for point in $PROFILE_POINTS; do
    IFS=: read -r shape ctx batch density <<< "$point"
    name="profile-$shape-c$ctx-b$batch-d$density"
    [ -s "$RESULTS/$name-ncu.csv" ] || continue
    echo "-- where a step goes: $shape ctx $ctx batch $batch density $density (the profiled step's kernels, top 8)"
    python3 - "$RESULTS/$name-ncu.csv" "$RESULTS/$name-bench.csv" <<'PY'
import csv, sys
lines = open(sys.argv[1]).read().splitlines()
head = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
rows = list(csv.DictReader(lines[head:]))[1:]  # the row after the header holds the units
per = {}
for r in rows:
    name = r["Kernel Name"].split("(")[0]
    n, t = per.get(name, (0, 0.0))
    per[name] = (n + 1, t + float(r["gpu__time_duration.sum"].replace(",", "")))  # ncu writes 5,312
total = sum(t for _, t in per.values())
for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:8]:
    print(f"{100 * t / total:5.1f}%  {n:5d} x {t / n / 1e3:8.2f} us  {name[:90]}")
step = float(next(csv.DictReader(open(sys.argv[2])))["step_ms"])
print(f"kernels {total / 1e6:.3f} ms in {len(rows)} launches, one at a time (ncu); "
      f"the graph-replayed step {step:.3f} ms")
PY
  done
  for who in polar sdpa; do
    f="$RESULTS/profile-attention-$who.txt"
    [ -f "$f" ] || continue
    echo "-- Nsight Compute, decode attention $PROFILE_ATTENTION, $who"
    grep -E "^ +(Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Theoretical Occupancy|Block Size|Grid Size|L2 Hit Rate|Issue Slots Busy|Eligible Warps Per Scheduler|No Eligible) " "$f" | head -14
  done
fi
if has_stage adaptive; then
  for f in "$RESULTS"/adaptive-*.txt; do [ -f "$f" ] && { echo "-- $(basename "$f" .txt) (adaptive.csv beside it)"; cat "$f"; }; done
fi
if has_stage adaptive-speed; then
  echo "-- adaptive selection, decode speed (random routers; density_reached from the sparse steps)"
  for point in $ADAPTIVE_BENCH; do
    IFS=: read -r shape ctx density <<< "$point"
    for run in topk stat-topk; do
      f="$RESULTS/adaptive-bench-$shape-$run.csv" dense="$RESULTS/adaptive-bench-$shape-dense.csv"
      [ -f "$f" ] && [ -f "$dense" ] || continue
      echo "$shape ctx $ctx $run: density reached $(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('density_reached'))" \
        "$RESULTS/adaptive-bench-$shape-$run.json" 2>/dev/null || echo '?')"
      "$BUILD_DIR/src/polar" bench --from-csv "$f" --baseline "$dense" || echo "($shape $run: comparison failed)"
    done
  done
fi
if has_stage tp-multi; then
  echo "-- tensor parallelism over several GPUs: parity with --tp 1 (stories260K) and decode speed"
  for f in "$RESULTS"/tp*-generate.txt; do
    [ -f "$f" ] || continue
    cmp -s "$f" "$RESULTS/tp1-generate.txt" && echo "$(basename "$f"): same text as --tp 1" ||
      echo "$(basename "$f"): TEXT DIFFERS from --tp 1"
  done
  python3 - "$RESULTS" <<'PY'
import glob, json, os, sys
res = sys.argv[1]
for f in sorted(glob.glob(f"{res}/tp*-ppl-*.json")):
    j = json.load(open(f))
    print(f"{os.path.basename(f)}: perplexity {j.get('perplexity')}")
PY
  for f in "$RESULTS"/tp*-*-global.csv; do
    [ -f "$f" ] || continue
    dense=${f%-global.csv}-dense.csv balanced=${f%-global.csv}-balanced.csv
    [ -f "$dense" ] && "$BUILD_DIR/src/polar" bench --from-csv "$f" --baseline "$dense"
    [ -f "$balanced" ] && [ -f "$dense" ] && "$BUILD_DIR/src/polar" bench --from-csv "$balanced" --baseline "$dense"
  done
fi
