#!/usr/bin/env bash
# Installs what polar needs to build and test, from Debian's packages (run as root, as on this machine kind).
set -euo pipefail
packages=(cmake ninja-build g++ pkg-config libopenblas-dev libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev libfmt-dev
          libpcre2-dev gnuplot-nox python3 python3-pip python3-venv
          libcpp-httplib-dev prometheus-cpp-dev prometheus  # polar serve, its /metrics, and promtool for the tests
          clang libfuzzer-14-dev libomp-14-dev)  # scripts/fuzz.sh: libFuzzer, and clang's OpenMP runtime
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
