// Kernel benchmarks behind `polar bench-kernels`: decode attention over a paged cache and the GEMMs of a
// decode step, each run through the Backend interface exactly as the engine runs it, timed by the
// backend's region markers (device events on CUDA), and reported against its byte floor: the bytes the
// kernel must move once (KV read for attention; weights read + activations for a GEMM) over the measured
// memory bandwidth.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ops/backend.h"

namespace polar {

struct AttentionShape {
  int64_t batch, ctx, heads, kv_heads, head_dim;
};
struct GemmShape {
  int64_t m, n, k;  // y[m, n] = x[m, k] · w[n, k]ᵀ
};

// The default tables: the decode-attention shapes (B·N up to 128·1920 and 16·3968, MHA and GQA,
// dh 128) and llama-2-7b's decode GEMMs at batch 1 … 256.
std::vector<AttentionShape> default_attention_shapes();
std::vector<GemmShape> default_gemm_shapes();

struct KernelRow {
  std::string kernel;  // "attention" or "gemm"
  std::string shape;   // e.g. "B64 N1920 H32/32 dh128" or "m64 n4096 k4096"
  double ms = 0;       // median over the timed repetitions
  double bytes = 0;    // the byte floor's bytes
  double gbps = 0;     // bytes / ms
  double of_copy = 0;  // gbps / measured copy bandwidth
};

struct KernelBenchOptions {
  int reps = 20;    // timed repetitions per shape (after 3 warm-up runs)
  uint64_t seed = 0;
  // Attention head densities: 1 = the dense kernel; below 1 the selective kernel with
  // max(1, int(density · Hkv)) random KV heads per sequence, its floor counting only their KV.
  std::vector<double> densities = {1.0};
};

std::vector<KernelRow> bench_attention(Backend& be, const std::vector<AttentionShape>& shapes, double copy_gbps,
                                       const KernelBenchOptions& o,
                                       const std::function<void(const std::string&)>& progress = {});
std::vector<KernelRow> bench_gemm(Backend& be, const std::vector<GemmShape>& shapes, double copy_gbps,
                                  const KernelBenchOptions& o, const std::function<void(const std::string&)>& progress = {});

}  // namespace polar
