#!/usr/bin/env bash
# The next GPU call (refused in the seventh session for lack of device time): the tree with the L2 prefetch
# hint in the attention loader only and the backend split into files (GEMV v3 not applied). Builds, runs the
# CUDA tests, then decode attention at the anchor shapes beside SDPA in the same call and llama-2-7b steps;
# each stage saved as it ends (the call's device time is short).
set -u
R=/tmp/final; rm -rf $R; mkdir -p $R
save() { tar czf "$OUT/final.tgz" -C /tmp final; }
export BUILD_DIR=${BUILD_DIR:-/tmp/bg}
RESULTS=$R scripts/gpu-check.sh build 2>&1 | tail -1
(cd "$BUILD_DIR" && timeout 200 ctest -j1 -R 'Cuda' --output-on-failure) > $R/tests-gpu.log 2>&1
grep -E "tests passed|FAILED|Expected|differs" $R/tests-gpu.log | head -20; save
P=$BUILD_DIR/src/polar
ATT="1x4096x32x32x128 16x3968x32x32x128 64x1920x72x72x128 128x1920x32x32x128 64x1920x32x8x128 128x4096x32x8x128"
$P bench-kernels --device cuda --attention $ATT --density 1,0.5 --csv $R/att-1.csv > /dev/null 2> $R/att-1.log; save
python3 scripts/torch_reference.py --attention $ATT --csv $R/sdpa.csv 2> $R/sdpa.log
save
timeout 100 $P bench --device cuda --shape llama-2-7b --ctx 3968 --batch 1,8,16 --csv $R/dense.csv > /dev/null 2> $R/dense.log
save
for f in att-1 sdpa; do echo "== $f"; cut -d, -f1-3,7 $R/$f.csv | tail -n +2; done
for f in dense; do echo "== $f"; python3 -c "
import csv
for r in csv.DictReader(open('$R/$f.csv')): print(r['batch'], r['step_ms'], r['x_read'], r['attention_ms'])"; done
