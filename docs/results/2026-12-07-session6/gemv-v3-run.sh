#!/usr/bin/env bash
# The first GPU call for gemv-v3.patch (not run yet): from the repository root, after
# `git apply docs/results/2026-12-07-session6/gemv-v3.patch`. Builds, runs the CUDA tests (the GEMV's parity
# and batch-invariance tests among them), then A/Bs linear at m <= 4 in one machine session:
# POLAR_EXP_GEMV=n (cuBLASLt), y (the GEMV at every m <= 4), t (the timed choice, the default), twice.
# Results under $OUT/gemv-v3 (tarred: the device tool returns few files).
set -u
R=/tmp/gemv-v3; rm -rf $R; mkdir -p $R
save() { tar czf "$OUT/gemv-v3.tgz" -C /tmp gemv-v3; }
export BUILD_DIR=${BUILD_DIR:-/tmp/bg}
RESULTS=$R scripts/gpu-check.sh build 2>&1 | tail -1
(cd "$BUILD_DIR" && timeout 300 ctest -j1 -R 'Cuda' --output-on-failure) > $R/tests-gpu.log 2>&1
grep -E "tests passed|FAILED|Expected|differs" $R/tests-gpu.log | head -20; save
P=$BUILD_DIR/src/polar
G=1x4096x4096,1x12288x4096,1x22016x4096,1x4096x11008,2x4096x4096,2x22016x4096,4x4096x4096,4x12288x4096,4x22016x4096,4x4096x11008
for pass in 1 2; do for side in n y t; do
  export POLAR_EXP_GEMV=$side
  timeout 60 $P bench-kernels --device cuda --gemm $G --csv $R/gemm-$side-$pass.csv > /dev/null 2> $R/gemm-$side-$pass.log
  timeout 120 $P bench --device cuda --shape llama-2-7b --ctx 3968 --batch 1,2,4,8 --csv $R/dense-$side-$pass.csv > /dev/null 2> $R/dense-$side-$pass.log
  timeout 120 $P bench --device cuda --shape llama-2-7b --ctx 3968 --batch 1,2,4 --density 0.5 --csv $R/sparse-$side-$pass.csv > /dev/null 2> $R/sparse-$side-$pass.log
  save
done; done
for f in $R/dense-*.csv $R/sparse-*.csv; do echo "== $(basename $f)"; python3 -c "
import csv
for r in csv.DictReader(open('$f')): print(r['batch'], r['step_ms'], r['x_read'], r['qkv_o_ms'], r['mlp_ms'])"; done
for f in $R/gemm-*.csv; do echo "== $(basename $f)"; cut -d, -f2,3 $f | tail -n +2 | tr '\n' ' '; echo; done
