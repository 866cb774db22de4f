#!/usr/bin/env bash
# Where one graph-replayed decode step goes, kernel by kernel: runs `polar bench` for one point under Nsight
# Compute (each kernel timed alone, gpu__time_duration), finds the last decode step (the longest tail of
# kernel names that repeats the one before it) and prints its kernels summed by name, largest first, with
# the step's total. Kernels run one at a time under ncu, so the total lacks the overlap of a real replay
# and holds no launch gaps: compare it with the bench's step time to see what the gaps cost. Choices the
# backend times at first use are made under ncu too, where timings are distorted: cuBLASLt's algorithm
# picks may differ from a plain run, and the sparse MLP's path is fixed by SPARSE_MLP (default kernel: the
# gather kernel; fastest let the timing under ncu pick, which chose the dense GEMM even at batch 1).
#
#   [SPARSE_MLP=kernel|dense|fastest] scripts/profile-step.sh BUILD_DIR SHAPE CTX BATCH DENSITY [OUT_CSV]
#   e.g. scripts/profile-step.sh build-gpu opt-6.7b 1920 8 0.5
set -euo pipefail
build=${1:?usage: scripts/profile-step.sh BUILD_DIR SHAPE CTX BATCH DENSITY [OUT_CSV]}
shape=${2:?shape}; ctx=${3:?ctx}; batch=${4:?batch}; density=${5:?density}
out=${6:-$(mktemp)}
ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  "$build/src/polar" bench --device cuda --shape "$shape" --ctx "$ctx" --batch "$batch" --density "$density" --steps 1 \
  --sparse-mlp "${SPARSE_MLP:-kernel}" \
  2>/dev/null | grep '^"' > "$out"
python3 - "$out" "$shape" "$ctx" "$batch" "$density" <<'EOF'
import csv, sys, collections
path, shape, ctx, batch, density = sys.argv[1:]
rows = list(csv.reader(open(path)))
head, vals = rows[0], rows[1:]
kid, kname, metric, value = (head.index(h) for h in ("ID", "Kernel Name", "Metric Name", "Metric Value"))
kernels = [(r[kname], float(r[value].replace(",", ""))) for r in vals if r[metric] == "gpu__time_duration.sum"]
unit = next(r[head.index("Metric Unit")] for r in vals if r[metric] == "gpu__time_duration.sum")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[unit]
names = [n for n, _ in kernels]
period = next((p for p in range(1, len(names) // 2 + 1) if names[-p:] == names[-2 * p:-p]), None)
if period is None:
    sys.exit(f"no repeating decode step among {len(names)} kernels")
step = kernels[-period:]
by = collections.defaultdict(lambda: [0.0, 0])
for n, t in step:
    key = n.replace("(anonymous namespace)::", "").replace("<unnamed>::", "").split("(")[0].split("<")[0].split("::")[-1].replace("void ", "")
    by[key][0] += t * scale
    by[key][1] += 1
total = sum(t for t, _ in by.values())
print(f"== {shape} ctx {ctx} batch {batch} density {density}: {period} kernels, {total / 1e3:.3f} ms summed")
for k, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0]):
    print(f"  {k[:60]:<60} {c:>5} launches {t / 1e3:8.3f} ms {100 * t / total:5.1f}%  {t / c:7.2f} us each")
EOF
