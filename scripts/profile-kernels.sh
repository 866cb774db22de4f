#!/usr/bin/env bash
# Nsight Compute view of polar's sparse decode kernels on a GPU machine: for each shape, each kernel's time,
# DRAM and L2 throughput, occupancy and where its warps stall (the average warps stalled per issued instruction,
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
metrics="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors.avg.pct_of_peak_sustained_elapsed"
metrics+=",sm__warps_active.avg.pct_of_peak_sustained_active"
metrics+=",launch__registers_per_thread,launch__occupancy_limit_shared_mem,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
for shape in "${shapes[@]}"; do
  echo "== gather $shape"
  # The 4th call, past bench-kernels' warm-up calls: its GEMM kernel and its epilogue kernel.
  ncu --kernel-name regex:gather_gemm --launch-skip 6 --launch-count 2 --metrics "$metrics" --csv \
    "$build/src/polar" bench-kernels --device cuda --gather "$shape" --reps 1 2>/dev/null |
    python3 -c '
import csv, sys
rows = [r for r in csv.reader(l for l in sys.stdin if l.startswith("\""))]
head, vals = rows[0], rows[1:]
kernel, name, value = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
missing = "?"
for k in dict.fromkeys(r[kernel] for r in vals):
    got = {r[name]: r[value] for r in vals if r[kernel] == k}
    print("  " + k.split("(")[0].split("<")[0].split("::")[-1])
    stalls = sorted(((float(v.replace(",", "")), m.split("stalled_")[1].split("_per_issue")[0]) for m, v in got.items()
                     if "issue_stalled" in m), reverse=True)
    for m in ("gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
              "lts__t_sectors.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active",
              "launch__registers_per_thread", "launch__occupancy_limit_shared_mem"):
        print(f"    {m:<55} {got.get(m, missing)}")
    print("    stalls (warps per issue): " + ", ".join(f"{n} {v:.2f}" for v, n in stalls[:6] if v > 0))
'
done
