// Token choice from logits rows (sampling.h): argmax, the sampling rule of ops/sampling.h and the
// log-probabilities the server reports; one CTA per row, deterministic block reductions.
#include "ops/cuda/sampling.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

// ---- argmax: one CTA per row, (value, index) reduction with the lowest index winning ties ----

template <typename T>
__global__ void argmax_kernel(const T* logits, int64_t V, int32_t* out) {
  const T* row = logits + blockIdx.x * V;
  float best = -FLT_MAX;
  int32_t best_i = INT32_MAX;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = to_float(row[i]);
    if (v > best) best = v, best_i = static_cast<int32_t>(i);  // strided ascending: first max per thread
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (ov > best || (ov == best && oi < best_i)) best = ov, best_i = oi;
  }
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sv[warp] = best, si[warp] = best_i;
  __syncthreads();
  if (warp == 0) {
    best = lane < blockDim.x / 32 ? sv[lane] : -FLT_MAX;
    best_i = lane < blockDim.x / 32 ? si[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (ov > best || (ov == best && oi < best_i)) best = ov, best_i = oi;
    }
    // A row of NaNs never compares greater: report index 0 rather than garbage.
    if (lane == 0) out[blockIdx.x] = best_i == INT32_MAX ? 0 : best_i;
  }
}

// ---- sampling (ops/sampling.h): thresholds found by bisection over order-preserving integer keys of the
// logits, each probe one pass over the row with a deterministic block reduction, so a seed always gives the
// same token; the draw is a block scan over contiguous per-thread ranges in index order ----

constexpr int kSampleThreads = 1024;


// Deterministic block-wide sums: a fixed shuffle tree inside warps, then over the warps' totals.
template <typename V> __device__ V block_reduce_sum(V v, V* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? scratch[threadIdx.x] : V(0);
  if (threadIdx.x < 32)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) scratch[0] = v;
  __syncthreads();
  return scratch[0];
}

template <typename T>
__global__ void sample_kernel(const T* logits, int64_t V, float temperature, int64_t top_k, float top_p,
                              const float* uniforms, int32_t* out) {
  __shared__ float fscratch[32];
  __shared__ unsigned long long uscratch[32];
  __shared__ int32_t chosen;
  const T* row = logits + blockIdx.x * V;
  // Row maximum (for a stable exp) as the largest key.
  unsigned long long mx = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) mx = max(mx, (unsigned long long)order_key(to_float(row[i])));
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) uscratch[threadIdx.x / 32] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / 32; ++w) mx = max(mx, uscratch[w]);
    uscratch[0] = mx;
  }
  __syncthreads();
  const uint32_t max_key = static_cast<uint32_t>(uscratch[0]);
  const uint32_t max_bits = (max_key & 0x80000000u) ? (max_key & 0x7fffffffu) : ~max_key;
  const float row_max = __uint_as_float(max_bits);
  const float inv_t = 1.0f / temperature;
  auto prob = [&](float l) { return __expf((l - row_max) * inv_t); };

  // Largest key threshold tau with pred(tau) true; pred is monotone (true at 0).
  auto bisect = [&](auto pred) {
    uint32_t lo = 0, hi = 0xffffffffu;
    while (lo < hi) {
      const uint32_t mid = lo + static_cast<uint32_t>((static_cast<uint64_t>(hi) - lo + 1) / 2);
      if (pred(mid)) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  uint32_t keep_key = 0;  // tokens with key >= keep_key are kept
  if (top_k > 0 && top_k < V) {
    keep_key = bisect([&](uint32_t tau) {
      unsigned long long n = 0;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) n += order_key(to_float(row[i])) >= tau;
      return block_reduce_sum(n, uscratch) >= static_cast<unsigned long long>(top_k);
    });
  }
  auto kept_mass = [&](uint32_t tau) {
    float m = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float l = to_float(row[i]);
      if (order_key(l) >= tau) m += prob(l);
    }
    return block_reduce_sum(m, fscratch);
  };
  if (top_p < 1.0f) {
    const float target = top_p * kept_mass(keep_key);
    const uint32_t k0 = keep_key;
    keep_key = bisect([&](uint32_t tau) { return kept_mass(tau > k0 ? tau : k0) >= target; });
    keep_key = keep_key > k0 ? keep_key : k0;
  }
  // Draw: thread t owns the contiguous range [t*C, (t+1)*C); an exclusive scan of the range masses says
  // which thread holds the crossing of u * total, and that thread walks its range in index order.
  const int64_t C = (V + blockDim.x - 1) / blockDim.x;
  const int64_t begin = threadIdx.x * C, end = min(V, begin + C);
  float mine = 0;
  int32_t last_kept = -1;
  for (int64_t i = begin; i < end; ++i) {
    const float l = to_float(row[i]);
    if (order_key(l) >= keep_key) mine += prob(l), last_kept = static_cast<int32_t>(i);
  }
  // Inclusive scan over the block: within warps by shuffles, then over warp totals.
  float incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (threadIdx.x % 32 >= o) incl += y;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 31) fscratch[threadIdx.x / 32] = incl;
  if (threadIdx.x == 0) chosen = -1;
  __syncthreads();
  float warp_base = 0;
  for (int w = 0; w < static_cast<int>(threadIdx.x / 32); ++w) warp_base += fscratch[w];
  float total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += fscratch[w];
  // The exclusive prefix is the previous lane's inclusive one, so neighbouring ranges meet exactly and
  // exactly one thread's [excl, incl) holds the target.
  float excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (threadIdx.x % 32 == 0) excl = 0;
  incl += warp_base;
  excl += warp_base;
  const float target = uniforms[blockIdx.x] * total;
  if (mine > 0 && target >= excl && target < incl) {
    float acc = excl;
    int32_t pick = last_kept;
    for (int64_t i = begin; i < end; ++i) {
      const float l = to_float(row[i]);
      if (order_key(l) < keep_key) continue;
      acc += prob(l);
      if (acc > target) {
        pick = static_cast<int32_t>(i);
        break;
      }
    }
    chosen = pick;
  }
  __syncthreads();
  if (chosen < 0) {  // target rounded to the full mass: the last kept token
    unsigned long long last = last_kept < 0 ? 0 : static_cast<unsigned long long>(last_kept);
    for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
    if (threadIdx.x % 32 == 0) uscratch[threadIdx.x / 32] = last;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < blockDim.x / 32; ++w) last = max(last, uscratch[w]);
      chosen = static_cast<int32_t>(max(last, uscratch[0]));
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = chosen;
}

// ---- logprobs (backend.h): one CTA per listed row. The top n come from n block-wide argmax passes, each
// over the tokens ranked after the previous pick (logit descending, id ascending), so the row is neither
// copied nor sorted for the few (n <= 20) the API asks for; the first pick is the row's maximum, the shift
// of the log-sum-exp. ----

// The best (value, id) pair over the block, on every thread: the larger value, the lower id among equals.
__device__ void block_best(float& v, int32_t& id, float* sv, int32_t* si) {
  auto better = [](float ov, int32_t oi, float v_, int32_t i_) { return ov > v_ || (ov == v_ && oi < i_); };
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (better(ov, oi, v, id)) v = ov, id = oi;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) sv[threadIdx.x / 32] = v, si[threadIdx.x / 32] = id;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? sv[threadIdx.x] : -INFINITY;
    id = threadIdx.x < blockDim.x / 32 ? si[threadIdx.x] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, id, o);
      if (better(ov, oi, v, id)) v = ov, id = oi;
    }
    if (threadIdx.x == 0) sv[0] = v, si[0] = id;
  }
  __syncthreads();
  v = sv[0];
  id = si[0];
  __syncthreads();  // sv/si are reused by the next call
}

template <typename T>
__global__ void logprobs_kernel(const T* logits, int64_t V, const int32_t* rows, const int32_t* targets, int64_t n,
                                float* target_lp, int32_t* top_ids, float* top_lp) {
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  const int64_t m = blockIdx.x;
  const T* row = logits + int64_t(rows[m]) * V;
  float prev_v = INFINITY, mx = 0;  // mx: the row's maximum, the first pick
  int32_t prev_i = -1;
  for (int64_t j = 0; j < n; ++j) {
    float best = -INFINITY;
    int32_t best_i = INT32_MAX;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = to_float(row[i]);
      const int32_t id = static_cast<int32_t>(i);
      const bool after = x < prev_v || (x == prev_v && id > prev_i);
      if (after && (x > best || (x == best && id < best_i))) best = x, best_i = id;
    }
    block_best(best, best_i, sv, si);
    if (threadIdx.x == 0) top_ids[m * n + j] = best_i, top_lp[m * n + j] = best;  // a logit until lse is known
    if (j == 0) mx = best;
    prev_v = best;
    prev_i = best_i;
  }
  float sum = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) sum += __expf(to_float(row[i]) - mx);
  const float lse = mx + __logf(block_reduce_sum(sum, sv));
  if (threadIdx.x == 0) {  // the thread that wrote the top logits
    target_lp[m] = to_float(row[targets[m]]) - lse;
    for (int64_t j = 0; j < n; ++j) top_lp[m * n + j] -= lse;
  }
}

}  // namespace

void argmax(const void* logits, int64_t R, int64_t V, int32_t* out, Elem e, cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    argmax_kernel<T><<<static_cast<unsigned>(R), 1024, 0, stream>>>(static_cast<const T*>(logits), V, out);
    check_launch("argmax");
  });
}

void logprobs(const void* logits, int64_t V, const int32_t* rows, const int32_t* targets, int64_t M, int64_t n,
              float* target_lp, int32_t* top_ids, float* top_lp, Elem e, cudaStream_t stream) {
  if (M == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    logprobs_kernel<<<static_cast<unsigned>(M), 1024, 0, stream>>>(static_cast<const T*>(logits), V, rows, targets, n,
                                                                     target_lp, top_ids, top_lp);
  });
  check_launch("logprobs");
}

void sample(const void* logits, int64_t R, int64_t V, float temperature, int64_t top_k, float top_p,
            const float* uniforms, int32_t* out, Elem e, cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sample_kernel<<<static_cast<unsigned>(R), kSampleThreads, 0, stream>>>(static_cast<const T*>(logits), V,
        temperature,
                                                                            top_k, top_p, uniforms, out);
  });
  check_launch("sample");
}

}  // namespace polar::cuda
