#!/usr/bin/env bash
# Nsight Compute view of polar's sparse decode kernels on a GPU machine: for each shape, the kernel's time,
# DRAM throughput, occupancy and where its warps stall (the average warps stalled per issued instruction,
# by reason, largest first). The numbers that say *why* a kernel is short of its byte floor.
#
#   scripts/profile-kernels.sh BUILD_DIR [GATHER_SHAPE ...]
#   e.g. scripts/profile-kernels.sh build-gpu up:16x9216x36864:0.5 up:64x9216x36864:0.5
# (shapes as `polar bench-kernels --gather` takes them; default: up and down at B16 and B64, d 9216, D 36864)
set -euo pipefail
build=${1:?usage: scripts/profile-kernels.sh BUILD_DIR [GATHER_SHAPE ...]}
shift
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=(up:16x9216x36864:0.5 up:64x9216x36864:0.5 down:16x9216x36864:0.5 down:64x9216x36864:0.5)
metrics="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active"
metrics+=",launch__registers_per_thread,launch__occupancy_limit_shared_mem,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
for shape in "${shapes[@]}"; do
  echo "== gather $shape"
  # The 4th launch of the kernel: past bench-kernels' warm-up calls.
  ncu --kernel-name regex:gather_gemm_kernel --launch-skip 3 --launch-count 1 --metrics "$metrics" --csv \
    "$build/src/polar" bench-kernels --device cuda --gather "$shape" --reps 1 2>/dev/null |
    python3 -c '
import csv, sys
rows = [r for r in csv.reader(l for l in sys.stdin if l.startswith("\""))]
head, vals = rows[0], rows[1:]
name, value = head.index("Metric Name"), head.index("Metric Value")
got = {r[name]: r[value] for r in vals}
missing = "?"
stalls = sorted(((float(v.replace(",", "")), k.split("stalled_")[1].split("_per_issue")[0]) for k, v in got.items()
                 if "issue_stalled" in k), reverse=True)
for k in ("gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
          "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
          "launch__occupancy_limit_shared_mem"):
    print(f"  {k:<55} {got.get(k, missing)}")
print("  stalls (warps per issue): " + ", ".join(f"{n} {v:.2f}" for v, n in stalls[:6] if v > 0))
'
done
