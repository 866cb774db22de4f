#!/usr/bin/env bash
# Builds polar and runs every test: the full suite in a release build (with polar serve against the openai
# Python client on stories260K and the default model, and a 2-minute load test), then the parsers
# (safetensors, GGUF, checkpoints, tokenizers, router files, task files, chat templates), the sparse ops, the
# CLI's bad-input tests and the HTTP server's tests again under AddressSanitizer + UBSan, and last a short
# coverage-guided fuzzing run of the parsers (scripts/fuzz.sh, FUZZ_SECONDS a target, 20 by default).
# About 30 minutes on 2 cores from a fresh checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=build scripts/build.sh
# The serve tests' real clients and model: the official openai Python package (in a venv, since Debian's
# Python is externally managed) and the default model.
[ -x build/venv/bin/python ] || python3 -m venv build/venv
build/venv/bin/python -c "import openai" 2>/dev/null || build/venv/bin/pip install --quiet openai==3.60.0
scripts/fetch-model.sh
# Two test processes share two cores: spinning OpenMP workers would starve each other, so they sleep instead.
OMP_WAIT_POLICY=passive ctest --test-dir build --output-on-failure -j "$(nproc)"
BUILD_DIR=build-asan scripts/build.sh -DPOLAR_SANITIZE=ON -DPOLAR_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
OMP_WAIT_POLICY=passive ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j "$(nproc)" -R 'Gguf|Safetensors|Checkpoint|Tokenizer|BadInput|HfFixture|Router|Sparse|Eval|ChatTemplate|^Serve\.'
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
