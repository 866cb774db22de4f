#!/usr/bin/env python3
"""PyTorch's own numbers on the shapes of `polar bench-kernels`, measured the same way (CUDA events
around graph replays of 16 calls, 3 warm-up runs, median of --reps), for the comparison the GPU round prints:

  * decode attention: torch.nn.functional.scaled_dot_product_attention with one query per sequence over
    a dense [B, Hkv, N, dh] K/V (GQA through enable_gqa), the best PyTorch offers for this step;
  * decode GEMMs: torch.nn.functional.linear (cuBLAS/cuBLASLt with PyTorch's heuristics), weights rotated
    over enough copies that every run reads them from HBM.

  * a whole dense decode step, gpt-fast style (--step SHAPE:CTX:B,B,...; the anchors page's PyTorch row):
    random weights of a Llama shape (fused q/k/v and gate/up), a static KV cache [B, Hkv, CTX, dh] per
    layer, RMSNorm, rotate-half RoPE, SDPA over the cache, SiLU MLP, the LM head and argmax, the whole step
    captured in one CUDA graph; each sequence's new token at position CTX - 1, so it attends to CTX keys,
    as `polar bench --ctx CTX` does. Median of --reps replays, reported as ms per step and tokens/s.

Usage: torch_reference.py --csv OUT.csv [--dtype f16|bf16] [--attention BxNxHxHkvxDH ...] [--gemm MxNxK ...]
                          [--step SHAPE:CTX:B,B,... ...]
With no shapes it uses the same default tables as polar (kept in sync by hand: see src/bench/kernel_bench.cpp);
--step alone runs only the steps.
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
DEFAULT_GEMM = [f"{m}x{n}x{k}" for m in (1, 8, 16, 32, 64, 128, 256)
                for n, k in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (16384, 4096), (4096, 16384))]


CALLS_PER_RUN = 16

# Llama shapes of `polar bench --shape` (src/bench/shapes.cpp): d, layers, heads, KV heads, ffn, vocab, rope theta.
STEP_SHAPES = {
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000, 10000.0),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0),
}


def time_ms(fn, reps, calls=CALLS_PER_RUN):
    """Median ms per call. Each timed run replays a CUDA graph of `calls` back-to-back calls fn(0), fn(1), ...,
    as polar's bench-kernels does, so the host's launch cost stays out of the time."""
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
        for i in range(calls):
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
        times.append(start.elapsed_time(stop) / calls)
    return statistics.median(times)


def step_ms(shape, ctx, batch, dt, reps):
    """ms per dense decode step of `shape` at context ctx and this batch (module docstring)."""
    d, layers, H, Hkv, ffn, vocab, theta = STEP_SHAPES[shape]
    dh = d // H
    g = torch.Generator(device="cuda").manual_seed(1)

    def rand(*size, scale=0.02):
        return (torch.rand(*size, device="cuda", dtype=dt, generator=g) * 2 - 1) * scale

    emb, head, norm = rand(vocab, d), rand(vocab, d), torch.ones(d, device="cuda", dtype=dt)
    ws = [dict(n1=torch.ones(d, device="cuda", dtype=dt), qkv=rand((H + 2 * Hkv) * dh, d), o=rand(d, H * dh),
               n2=torch.ones(d, device="cuda", dtype=dt), gu=rand(2 * ffn, d), down=rand(d, ffn),
               k=rand(batch, Hkv, ctx, dh, scale=1.0), v=rand(batch, Hkv, ctx, dh, scale=1.0)) for _ in range(layers)]
    pos = ctx - 1
    inv = 1.0 / (theta ** (torch.arange(0, dh, 2, device="cuda", dtype=torch.float32) / dh))
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]).to(dt), torch.cat([ang.sin(), ang.sin()]).to(dt)
    tokens = torch.randint(0, vocab, (batch,), device="cuda", generator=g)

    def rms(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * w

    def rope(x):  # [B, heads, 1, dh], rotate-half
        x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def step(_):
        x = emb[tokens]
        for w in ws:
            q, k, v = F.linear(rms(x, w["n1"]), w["qkv"]).split([H * dh, Hkv * dh, Hkv * dh], dim=-1)
            q = rope(q.view(batch, H, 1, dh))
            w["k"][:, :, pos] = rope(k.view(batch, Hkv, 1, dh))[:, :, 0]
            w["v"][:, :, pos] = v.view(batch, Hkv, dh)
            o = F.scaled_dot_product_attention(q, w["k"], w["v"], enable_gqa=(H != Hkv))
            x = x + F.linear(o.reshape(batch, H * dh), w["o"])
            gate, up = F.linear(rms(x, w["n2"]), w["gu"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return F.linear(rms(x, norm), head).argmax(-1)

    # One step per replay (CALLS_PER_RUN steps of a 7B model would only repeat the same traffic).
    ms = time_ms(step, reps, calls=1)
    del ws
    torch.cuda.empty_cache()
    return ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--dtype", default="f16", choices=["f16", "bf16"])
    ap.add_argument("--attention", nargs="*", default=None)
    ap.add_argument("--gemm", nargs="*", default=None)
    ap.add_argument("--step", nargs="*", default=None, help="SHAPE:CTX:B,B,... (" + ", ".join(STEP_SHAPES) + ")")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dt = torch.float16 if a.dtype == "f16" else torch.bfloat16
    only_steps = a.step is not None and a.attention is None and a.gemm is None
    att = a.attention if a.attention is not None else ([] if only_steps else DEFAULT_ATTENTION)
    gemm = a.gemm if a.gemm is not None else ([] if only_steps else DEFAULT_GEMM)
    rows = []
    for s in a.step or []:
        shape, ctx, batches = s.split(":")
        if shape not in STEP_SHAPES:
            sys.exit(f"--step: unknown shape {shape!r} (choose from {', '.join(STEP_SHAPES)})")
        for b in map(int, batches.split(",")):
            try:
                ms = step_ms(shape, int(ctx), b, dt, a.reps)
            except torch.OutOfMemoryError:
                print(f"step {shape} ctx {ctx} B{b}: does not fit", file=sys.stderr)
                torch.cuda.empty_cache()
                continue
            rows.append(("step", f"{shape} ctx{ctx} B{b}", ms))
            print(f"step {rows[-1][1]}: {ms:.3f} ms, {b * 1000 / ms:.1f} tok/s", file=sys.stderr)
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
