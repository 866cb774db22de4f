// Kernel benchmarks behind `polar bench-kernels`: decode attention over a paged cache and the GEMMs of a
// decode step, each run through the Backend interface exactly as the engine runs it, timed by the
// backend's region markers (device events on CUDA), and reported against its byte floor: the bytes the
// kernel must move once (KV read for attention; weights read + activations for a GEMM) over the measured
// memory rates (bench/memory_rates.h: the copy rate, and the streaming read rate that bounds a kernel which
// only reads).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bench/memory_rates.h"
#include "ops/backend.h"

namespace polar {

struct AttentionShape {
  int64_t batch, ctx, heads, kv_heads, head_dim;
};
struct GemmShape {
  int64_t m, n, k;  // y[m, n] = x[m, k] · w[n, k]ᵀ
};
// A sparse ReLU MLP's gather GEMM at batch B: up y[B, k] = ReLU(x[B, d] · fc1[idx]ᵀ + b[idx]) or down
// y[B, d] = a[B, k] · fc2ᵀ[idx], over k = int(density · D) of D neurons, rounded up to a multiple of 8.
struct GatherShape {
  bool up;
  int64_t batch, d, D;
  double density;
};
// route_neurons: the k best of D neurons by their ReLU logits summed over R rows.
struct RouteShape {
  int64_t rows, D, k;
};

// route_heads (issue 19's rules): each of R rows keeps units of its H scores max-pooled over groups of
// `group`: exactly k (top-k), or those clearing a threshold or mean + c·std (statistical top-k), in lists
// of width k.
struct HeadRouteShape {
  int64_t rows, heads, group, k;
};

// The default tables: the decode-attention shapes (B·N up to 128·1920 and 16·3968, MHA and GQA,
// dh 128) and llama-2-7b's decode GEMMs at batch 1 … 256.
std::vector<AttentionShape> default_attention_shapes();
std::vector<GemmShape> default_gemm_shapes();
// The gather-GEMM table (OPT-66B's d 9216 / D 36864 and OPT-6.7B's 4096 / 16384) and
// route_neurons at OPT-6.7B and OPT-66B decode batches.
std::vector<GatherShape> default_gather_shapes();
std::vector<RouteShape> default_route_shapes();
// route_heads at llama-2-7b (32 heads) and llama-3-8b (8 KV groups of 4) decode batches.
std::vector<HeadRouteShape> default_head_route_shapes();

struct KernelRow {
  std::string kernel;  // "attention", "gemm", "gather_up", "gather_down", "route" or "route_heads"
  std::string shape;   // e.g. "B64 N1920 H32/32 dh128" or "m64 n4096 k4096"
  double ms = 0;       // median over the timed repetitions
  double bytes = 0;    // the byte floor's bytes
  double gbps = 0;     // bytes / ms
  double of_copy = 0;  // gbps / measured copy rate (read + write)
  double of_read = 0;  // gbps / measured streaming read rate: how close the kernel is to the hardware
};

struct KernelBenchOptions {
  int reps = 20;    // timed repetitions per shape (after 3 warm-up runs)
  uint64_t seed = 0;
  // Attention head densities: 1 = the dense kernel; below 1 the selective kernel with
  // max(1, int(density · Hkv)) random KV heads per sequence, its floor counting only their KV.
  std::vector<double> densities = {1.0};
  // The paged KV cache of the attention rows: tokens per block, and whether each sequence's blocks are
  // scattered over the pool (a long-running server's cache) or consecutive (a fresh one's, and the layout
  // closest to a contiguous [B, Hkv, N, dh] cache such as SDPA reads).
  int64_t kv_block_size = 16;
  bool kv_blocks_scattered = true;
};

std::vector<KernelRow> bench_attention(Backend& be, const std::vector<AttentionShape>& shapes, const MemoryRates& rates,
                                       const KernelBenchOptions& o,
                                       const std::function<void(const std::string&)>& progress = {});
std::vector<KernelRow> bench_gemm(Backend& be, const std::vector<GemmShape>& shapes, const MemoryRates& rates,
                                  const KernelBenchOptions& o, const std::function<void(const std::string&)>& progress = {});
// Each gather shape twice: the sparse kernel (floor: the selected rows once, plus activations) and the
// dense layer it replaces (all D neurons), so the rows read side by side.
std::vector<KernelRow> bench_gather(Backend& be, const std::vector<GatherShape>& shapes, const MemoryRates& rates,
                                    const KernelBenchOptions& o,
                                    const std::function<void(const std::string&)>& progress = {});
std::vector<KernelRow> bench_route(Backend& be, const std::vector<RouteShape>& shapes, const MemoryRates& rates,
                                   const KernelBenchOptions& o,
                                   const std::function<void(const std::string&)>& progress = {});
// Each head-route shape three times: top-k, a threshold (0: about half the units of the random scores) and
// statistical top-k (c = 0), kmin 1, on random scores; the floor counts the scores and the list once.
std::vector<KernelRow> bench_route_heads(Backend& be, const std::vector<HeadRouteShape>& shapes,
                                         const MemoryRates& rates, const KernelBenchOptions& o,
                                         const std::function<void(const std::string&)>& progress = {});

}  // namespace polar
