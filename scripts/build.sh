#!/usr/bin/env bash
# Configures and builds polar into ${BUILD_DIR:-build}. The CUDA backend is compiled whenever nvcc is found
# (on PATH or in /usr/local/cuda); extra arguments go to cmake (e.g. -DPOLAR_SANITIZE=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
args=(-G Ninja -DCMAKE_BUILD_TYPE=Release)
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
cmake -S . -B "$build" "${args[@]}" "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
