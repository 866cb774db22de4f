#!/usr/bin/env python3
"""PyTorch's own numbers on the shapes of `polar bench-kernels`, measured the same way (CUDA events
around graph replays of 16 calls, 3 warm-up runs, median of --reps), for the comparison the GPU round prints:

  * decode attention: torch.nn.functional.scaled_dot_product_attention with one query per sequence over
    a dense [B, Hkv, N, dh] K/V (GQA through enable_gqa), the best PyTorch offers for this step;
  * decode GEMMs: torch.nn.functional.linear (cuBLAS/cuBLASLt with PyTorch's heuristics), weights rotated
    over enough copies that every run reads them from HBM.

Usage: torch_reference.py --csv OUT.csv [--dtype f16|bf16] [--attention BxNxHxHkvxDH ...] [--gemm MxNxK ...]
With no shapes it uses the same default tables as polar (kept in sync by hand: see src/bench/kernel_bench.cpp).
"""
import argparse
import csv
import statistics
import sys

import torch
import torch.nn.functional as F

DEFAULT_ATTENTION = ["1x4096x32x32x128", "8x4096x32x32x128", "16x3968x32x32x128", "64x1920x32x32x128",
                     "64x1920x72x72x128", "128x1920x32x32x128", "256x1024x32x32x128", "64x1920x32x8x128",
                     "128x4096x32x8x128", "256x2048x28x4x128"]
DEFAULT_GEMM = [f"{m}x{n}x{k}" for m in (1, 8, 32, 64, 128, 256)
                for n, k in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (16384, 4096), (4096, 16384))]


CALLS_PER_RUN = 16


def time_ms(fn, reps):
    """Median ms per call. Each timed run replays a CUDA graph of CALLS_PER_RUN back-to-back calls fn(0),
    fn(1), ..., as polar's bench-kernels does, so the host's launch cost stays out of the time."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_RUN):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / CALLS_PER_RUN)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--dtype", default="f16", choices=["f16", "bf16"])
    ap.add_argument("--attention", nargs="*", default=None)
    ap.add_argument("--gemm", nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dt = torch.float16 if a.dtype == "f16" else torch.bfloat16
    att = a.attention if a.attention is not None else DEFAULT_ATTENTION
    gemm = a.gemm if a.gemm is not None else DEFAULT_GEMM
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for s in att:
        B, N, H, Hkv, dh = map(int, s.split("x"))
        q = torch.rand(B, H, 1, dh, device="cuda", dtype=dt, generator=g) * 2 - 1
        copies = int(min(max(256e6 / (2 * B * Hkv * N * dh * 2), 1), 8))  # as polar: past the L2
        kv = [(torch.rand(B, Hkv, N, dh, device="cuda", dtype=dt, generator=g) * 2 - 1,
               torch.rand(B, Hkv, N, dh, device="cuda", dtype=dt, generator=g) * 2 - 1) for _ in range(copies)]
        ms = time_ms(lambda i: F.scaled_dot_product_attention(q, *kv[i % copies], enable_gqa=(H != Hkv)), a.reps)
        rows.append(("attention", f"B{B} N{N} H{H}/{Hkv} dh{dh}", ms))
        print(f"sdpa {rows[-1][1]}: {ms:.4f} ms", file=sys.stderr)
        del q, kv
    for s in gemm:
        m, n, k = map(int, s.split("x"))
        w_bytes = n * k * 2
        copies = int(min(max(256e6 / w_bytes, 2), 16))
        ws = [torch.rand(n, k, device="cuda", dtype=dt, generator=g) * 0.1 - 0.05 for _ in range(copies)]
        x = torch.rand(m, k, device="cuda", dtype=dt, generator=g) * 2 - 1
        ms = time_ms(lambda i: F.linear(x, ws[i % copies]), a.reps)
        rows.append(("gemm", f"m{m} n{n} k{k}", ms))
        print(f"linear {rows[-1][1]}: {ms:.4f} ms", file=sys.stderr)
        del ws, x
    with open(a.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel", "shape", "torch_ms"])
        for r in rows:
            w.writerow([r[0], r[1], f"{r[2]:.5f}"])


if __name__ == "__main__":
    main()
