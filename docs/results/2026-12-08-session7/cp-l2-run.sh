#!/usr/bin/env bash
# A/B of an L2 prefetch-size hint on every 16-byte cp.async (device_util.cuh, POLAR_EXP_CP_L2): build A is
# $BUILD_DIR (no hint, built by an earlier call or here), build B the same tree with CUDAFLAGS
# -DPOLAR_EXP_CP_L2=256. Both alternate twice in one machine session over the kernels that copy with
# cp.async (decode attention at the anchor shapes, the gather GEMMs, the GEMV at m <= 4) and two decode
# steps. Results under $OUT/cp-l2.tgz.
set -u
R=/tmp/cp-l2; rm -rf $R; mkdir -p $R
save() { tar czf "$OUT/cp-l2.tgz" -C /tmp cp-l2; }
A=${BUILD_DIR:-/tmp/bg}; B=/tmp/bh
[ -x $A/src/polar ] || RESULTS=$R/a BUILD_DIR=$A scripts/gpu-check.sh build 2>&1 | tail -1
CUDAFLAGS=-DPOLAR_EXP_CP_L2=256 RESULTS=$R/b BUILD_DIR=$B scripts/gpu-check.sh build 2>&1 | tail -1
ATT=1x4096x32x32x128,16x3968x32x32x128,64x1920x72x72x128,128x1920x32x32x128,64x1920x32x8x128,128x4096x32x8x128
GAT=up:16x9216x36864:0.5,up:64x9216x36864:0.5,up:256x9216x36864:0.5,down:16x9216x36864:0.5,down:64x9216x36864:0.5,down:256x9216x36864:0.5,down:64x4096x16384:0.1
G=1x4096x4096,1x12288x4096,1x22016x4096,1x4096x11008,4x4096x4096,4x22016x4096
for pass in 1 2; do for side in a b; do
  [ $side = a ] && P=$A/src/polar || P=$B/src/polar
  timeout 90 $P bench-kernels --device cuda --attention $ATT --density 1,0.5 --csv $R/att-$side-$pass.csv > /dev/null 2> $R/att-$side-$pass.log
  timeout 60 $P bench-kernels --device cuda --gather $GAT --sparse-mlp kernel --csv $R/gather-$side-$pass.csv > /dev/null 2> $R/gather-$side-$pass.log
  timeout 60 $P bench-kernels --device cuda --gemm $G --csv $R/gemm-$side-$pass.csv > /dev/null 2> $R/gemm-$side-$pass.log
  timeout 120 $P bench --device cuda --shape llama-2-7b --ctx 3968 --batch 1,16 --csv $R/dense-$side-$pass.csv > /dev/null 2> $R/dense-$side-$pass.log
  save
done; done
for k in att gather gemm; do
  echo "== $k (ms: a1 b1 a2 b2)"
  paste -d, $R/$k-a-1.csv $R/$k-b-1.csv $R/$k-a-2.csv $R/$k-b-2.csv | python3 -c "
import sys, csv
rows = list(csv.reader(sys.stdin)); h = rows[0]; n = len(h) // 4
ci = h.index('ms'); si = h.index('shape'); ki = h.index('kernel')
for r in rows[1:]: print(r[ki][:14], r[si][:34], *[r[ci + j * n] for j in range(4)])"
done
for f in $R/dense-*.csv; do echo "== $(basename $f)"; python3 -c "
import csv
for r in csv.DictReader(open('$f')): print(r['batch'], r['step_ms'], r['x_read'])"; done
