// Elementwise, normalisation, RoPE, KV-cache and reduction kernels of the CUDA backend (see kernels.h for
// shapes). All are memory-bound: they move each element once with 16-byte vectors where rows allow it,
// and compute in fp32. Templates over the element type (__half, __nv_bfloat16) give one source per kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include <cub/block/block_scan.cuh>

#include "core/error.h"
#include "core/random.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/kernels.h"

namespace polar::cuda {

namespace {

using namespace detail;

constexpr int kThreads = 256;
int grid_for(int64_t n, int per_thread = 1) {
  const int64_t blocks = (n + int64_t(kThreads) * per_thread - 1) / (int64_t(kThreads) * per_thread);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

// ---- random, conversion, elementwise: grid-stride loops over n elements ----

template <typename T>
__global__ void random_kernel(T* out, int64_t n, float lo, float hi, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(lo + (hi - lo) * uniform_hash(seed, static_cast<uint64_t>(i)));
}

template <typename In, typename Out>
__global__ void convert_kernel(const In* in, Out* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<Out>(to_float(in[i]));
}

// Elementwise op over n elements of T: out[i] = op(a[i], b[i]).
template <typename T, typename Op>
__global__ void binary_kernel(const T* a, const T* b, T* out, int64_t n, Op op) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(op(to_float(a[i]), to_float(b[i])));
}

struct AddOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op> void launch_binary(const void* a, const void* b, void* out, int64_t n, Elem e, cudaStream_t stream,
                                          Op op, const char* what) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    binary_kernel<<<grid_for(n, 4), kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                             static_cast<T*>(out), n, op);
  });
  check_launch(what);
}

// ---- embedding: one CTA per output row, a row copy; bad ids raise a flag and give zeros ----

template <typename T>
__global__ void embedding_kernel(const T* table, int64_t rows, int64_t d, const int32_t* ids, int64_t id_offset, T* out,
                                 int32_t* error_flag) {
  const int64_t t = blockIdx.x;
  const int64_t row = ids[t] + id_offset;
  T* dst = out + t * d;
  if (row < 0 || row >= rows) {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = from_float<T>(0.0f);
    if (threadIdx.x == 0) atomicOr(error_flag, kErrorIdOutOfRange);
    return;
  }
  const T* src = table + row * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// ---- norms: one CTA per row; the row is read twice (statistics, then output), the second time from L1/L2 ----

__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by an earlier call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void norm_kernel(const T* x, const T* w, const T* b, float eps, bool rms, int64_t d, T* out) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * d;
  T* orow = out + blockIdx.x * d;
  float mean = 0.0f;
  if (!rms) {
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += to_float(xr[i]);
    mean = block_sum(s, scratch) / d;
  }
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float c = to_float(xr[i]) - mean;
    ss += c * c;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
  // Every thread has its statistics before anyone overwrites x (out may alias x): block_sum ends with
  // values every thread read after the last __syncthreads, and each element is read and written by one thread.
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float y = (to_float(xr[i]) - mean) * inv * to_float(w[i]);
    if (b) y += to_float(b[i]);
    orow[i] = from_float<T>(y);
  }
}

// ---- RoPE and the KV append: one CTA per token, threads over (head, pair) ----

// Element offset of KV head h's row for cache slot `slot` (= block * block_size + offset) in a cache
// [num_blocks, Hkv, block_size, dh] (head-major blocks, see ops/backend.h).
__device__ __forceinline__ int64_t cache_row(int64_t slot, int64_t h, int64_t Hkv, int64_t block_size, int64_t dh) {
  return ((slot / block_size * Hkv + h) * block_size + slot % block_size) * dh;
}

// One thread per (head row, i < dh/2) pair of a token's H + 2·Hkv head rows: it reads qkv once and writes
// q or the cache row, rotating query and key pairs when inv_freq is given.
template <typename T>
__global__ void rope_kv_append_kernel(const T* qkv, T* q, int64_t H, const int32_t* positions, const float* inv_freq,
                                      const int32_t* slots, int64_t Hkv, int64_t dh, T* k_cache, T* v_cache,
                                      int64_t num_slots, int64_t block_size, int32_t* error_flag) {
  const int64_t t = blockIdx.x, half = dh / 2, width = H + 2 * Hkv;
  const int64_t slot = slots[t];
  const bool slot_ok = slot >= 0 && slot < num_slots;
  if (!slot_ok && threadIdx.x == 0) atomicOr(error_flag, kErrorSlotOutOfRange);
  const float pos = static_cast<float>(positions[t]);
  const T* row = qkv + t * width * dh;
  for (int64_t j = threadIdx.x; j < width * half; j += blockDim.x) {
    const int64_t r = j / half, i = j % half;
    T* dst;
    if (r < H) {
      dst = q + (t * H + r) * dh;
    } else {
      if (!slot_ok) continue;
      const int64_t kv = r - H;
      dst = (kv < Hkv ? k_cache : v_cache) + cache_row(slot, kv % Hkv, Hkv, block_size, dh);
    }
    float a = to_float(row[r * dh + i]), b = to_float(row[r * dh + i + half]);
    if (inv_freq && r < H + Hkv) {
      float s, c;
      sincosf(pos * inv_freq[i], &s, &c);  // fp32 angle, as transformers computes it
      const float ra = a * c - b * s, rb = b * c + a * s;
      a = ra, b = rb;
    }
    dst[i] = from_float<T>(a);
    dst[i + half] = from_float<T>(b);
  }
}

// out[T, F] = silu(gate_up[t, f]) * gate_up[t, F + f], grid-stride over T·F.
template <typename T>
__global__ void silu_mul_kernel(const T* gate_up, T* out, int64_t T_, int64_t F) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T_ * F; i += int64_t(gridDim.x) * blockDim.x) {
    const T* row = gate_up + i / F * 2 * F;
    const float g = to_float(row[i % F]), u = to_float(row[F + i % F]);
    out[i] = from_float<T>(g / (1.0f + __expf(-g)) * u);
  }
}

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

// Monotone map float -> uint32: a > b  <=>  key(a) > key(b).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

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

int row_threads(int64_t work) { return work >= 1024 ? 1024 : (work >= 256 ? 256 : 128); }

// ---- the sparse MLP's dense-GEMM path (CudaBackend::sparse_projection): selected columns moved between
// the full activations [M, D] and the compact ones [M, k] ----
//
// kGather: dst[m, j] = src[m, idx[j]] (src [M, D], dst [M, k]); else the scatter dst[m, idx[j]] = src[m, j]
// (src [M, k], dst [M, D], whose other columns the caller zeroed). Grid (ceil(k / kThreads), ceil(M /
// kMoveRows)): a thread reads its neuron id once and moves that column for kMoveRows rows; consecutive
// threads touch consecutive compact columns and, ids being ascending, nearby full ones. An id outside [0, D)
// moves nothing (a gathered column reads as zero) and raises kErrorNeuronOutOfRange.
constexpr int kMoveRows = 8;

template <typename T, bool kGather>
__global__ void move_columns_kernel(const T* src, T* dst, int64_t M, int64_t D, const int32_t* idx, int64_t k,
                                    int32_t* error_flag) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= k) return;
  const int32_t u = idx[j];
  const bool valid = u >= 0 && u < D;
  if (!valid && blockIdx.y == 0) atomicOr(error_flag, kErrorNeuronOutOfRange);
  const int64_t m_end = min(M, (blockIdx.y + 1) * int64_t(kMoveRows));
  for (int64_t m = blockIdx.y * int64_t(kMoveRows); m < m_end; ++m) {
    if (kGather)
      dst[m * k + j] = valid ? src[m * D + u] : T(0.0f);
    else if (valid)
      dst[m * D + u] = src[m * k + j];
  }
}

// ---- sparse selection (route_heads, route_neurons): the same order as the CPU's select_top — higher score
// first, NaN as -inf, the lower index first among equals — so both backends select the same set ----

__device__ __forceinline__ float nan_as_lowest(float v) { return isnan(v) ? -INFINITY : v; }

// One CTA per row of scores [R, H]: pooled[g] = max over the group's heads; a group is kept when fewer than
// k groups rank before it, and written at the count of kept groups below it (ascending order). O(G²) per
// row, which at G <= 1024 heads costs less than the launch.
template <typename T>
__global__ void route_heads_kernel(const T* scores, int H, int group, int k, int32_t* idx) {
  __shared__ float pooled[1024];
  __shared__ int32_t kept[1024];
  const int G = H / group;
  const T* row = scores + int64_t(blockIdx.x) * H;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float m = -INFINITY;
    for (int j = 0; j < group; ++j) m = fmaxf(m, nan_as_lowest(to_float(row[g * group + j])));
    pooled[g] = m;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    int rank = 0;
    for (int o = 0; o < G; ++o) rank += pooled[o] > pooled[g] || (pooled[o] == pooled[g] && o < g);
    kept[g] = rank < k;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    if (!kept[g]) continue;
    int at = 0;
    for (int o = 0; o < g; ++o) at += kept[o];
    idx[int64_t(blockIdx.x) * k + at] = g;
  }
}

// One CTA per token t of out [T, H, dh] (rows of a token are H·dh contiguous elements; head h's dh of
// them belong to unit h / group of the U = H / group units). The kept units heads[t, 0:k] are first marked
// in a shared-memory bitmap of U bits (6 KB for U = 49152 MLP neurons viewed as [T, D, 1]), then the
// elements of unmarked units are zeroed, consecutive threads on consecutive elements. O(H·dh + k) per
// token: looking each element's unit up in the kept list would be O(H·dh·k), with k in the thousands for
// MLP neurons. A unit id U is padding; one outside [0, U] marks nothing and raises kErrorHeadOutOfRange.
template <typename T>
__global__ void keep_heads_kernel(T* out, int H, int group, int dh, const int32_t* heads, int k, int heads_stride,
                                  const int32_t* dense_tokens, int32_t* error_flag) {
  extern __shared__ uint32_t kept_bits[];  // [(U + 31) / 32]
  const int64_t t = blockIdx.x;
  if (dense_tokens && dense_tokens[t]) return;  // the whole CTA leaves: no barrier is skipped by part of it
  const int U = H / group, words = (U + 31) / 32;
  for (int w = threadIdx.x; w < words; w += blockDim.x) kept_bits[w] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const int32_t u = heads[t * heads_stride + j];
    if (u >= 0 && u < U)
      atomicOr(&kept_bits[u >> 5], 1u << (u & 31));
    else if (u != U)  // U: padding (localize_indices)
      atomicOr(error_flag, kErrorHeadOutOfRange);
  }
  __syncthreads();
  T* row = out + t * H * dh;
  const unsigned per_unit = static_cast<unsigned>(group * dh);
  for (int i = threadIdx.x; i < H * dh; i += blockDim.x) {
    const unsigned u = static_cast<unsigned>(i) / per_unit;
    if (!((kept_bits[u >> 5] >> (u & 31)) & 1u)) row[i] = from_float<T>(0.0f);
  }
}

// out[r] = sqrt(Σ x[r, :]²) in fp32; one CTA per row.
template <typename T>
__global__ void l2_norms_kernel(const T* x, int64_t n, T* out) {
  __shared__ float scratch[32];
  const T* row = x + blockIdx.x * n;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(row[i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = from_float<T>(sqrtf(ss));
}

// ---- route_neurons: the k best of D neuron scores, exactly the CPU's choice ----
//
// Decode calls it once per layer, so latency is what counts. Keys are the scores as order-preserving
// unsigned ints; the k-th best key (the threshold) is found digit by digit, 11 + 11 + 10 bits:
//   1. relu_column_sum_kernel (one thread per neuron, many CTAs) computes the keys and adds them to a
//      global histogram of their top 11 bits (per-CTA shared histograms first);
//   2. select_top_kernel (one CTA) copies all D keys into shared memory with every copy in flight at
//      once (cp.async), finds the threshold's top digit from the global histogram meanwhile, resolves the
//      last two digits with a histogram over the keys that share the digits found so far, and compacts
//      the selection in index order. Every pass after the copy reads shared memory, so none of them waits
//      on L2 latencies one after another. D up to the opt-in shared memory beside the kernel's static
//      arrays fits (about 55k keys on Hopper: every OPT); larger D runs the same passes over global memory.
// Shared histogram atomics are aggregated per warp (__match_any_sync): the keys of one layer share
// their leading bits, and unaggregated atomics would serialise on one bin.

constexpr int kSelectThreads = 1024;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kDigitBins = 2048;  // 11-bit digits

// Adds 1 to hist[bin] for every lane with bin >= 0, one atomic per distinct bin in the warp. Every lane of
// the warp must call it. A warp without a bin skips the match: most keys miss the prefix of the later digits.
__device__ __forceinline__ void warp_histogram_add(int* hist, int bin) {
  if (!__any_sync(0xffffffffu, bin >= 0)) return;
  const uint32_t peers = __match_any_sync(0xffffffffu, bin);
  if (bin >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// key[j] = order_key(Σ_{r < live_rows[0]} max(logits[r, j], 0)) (the fp32 score, rows summed in order:
// deterministic), and top_hist[key >> 21] += 1 (top_hist zeroed before the launch).
template <typename T>
__global__ void relu_column_sum_kernel(const T* logits, int64_t R, int64_t D, const int32_t* live_rows, uint32_t* key,
                                       int* top_hist) {
  __shared__ int hist[kDigitBins];
  for (int b = threadIdx.x; b < kDigitBins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const int64_t rows = min(R, static_cast<int64_t>(*live_rows));
  // Whole warps walk the loop together (warp_histogram_add needs every lane).
  for (int64_t base = blockIdx.x * int64_t(blockDim.x); base < D; base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = base + threadIdx.x;
    int bin = -1;
    if (j < D) {
      float s = 0.0f;
      for (int64_t r = 0; r < rows; ++r) s += fmaxf(to_float(logits[r * D + j]), 0.0f);
      key[j] = order_key(nan_as_lowest(s));
      bin = static_cast<int>(key[j] >> 21);
    }
    warp_histogram_add(hist, bin);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kDigitBins; b += blockDim.x)
    if (hist[b]) atomicAdd(&top_hist[b], hist[b]);
}

// Over hist[kDigitBins] (in shared memory) counted from the highest bin down: the bin where the running
// count reaches `need` holds the k-th key. Sets *bin_out and *need_out (the keys still to take inside that
// bin). Thread t scans bins 2047 - 2t and 2046 - 2t; one block scan.
template <typename Scan>
__device__ void find_digit(const int* hist, int need, typename Scan::TempStorage& scan, int* bin_out, int* need_out) {
  const int hi = kDigitBins - 1 - 2 * static_cast<int>(threadIdx.x), lo = hi - 1;
  const int c_hi = hist[hi], c_lo = hist[lo];
  int before;
  Scan(scan).ExclusiveSum(c_hi + c_lo, before);
  if (before < need && before + c_hi >= need) {
    *bin_out = hi;
    *need_out = need - before;
  } else if (before + c_hi < need && before + c_hi + c_lo >= need) {
    *bin_out = lo;
    *need_out = need - before - c_hi;
  }
  __syncthreads();
}

// What select_top_kernel shares between its steps: the block scan, the digit histogram, the warps' counts
// for the compaction and find_digit's results.
struct SelectShared {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  typename Scan::TempStorage scan;
  int hist[kDigitBins];
  int above[kSelectWarps], equal[kSelectWarps];
  int bin, need;
};

// After digit 1 (prefix/mask: the threshold's top 11 bits, need: the keys still to take inside them):
// digits 2 and 3 and the compaction over src[D], the keys in shared memory or in global memory. Inlined
// once per memory space, so shared-memory reads compile to shared loads.
__device__ __forceinline__ void select_top_rest(const uint32_t* src, int D, uint32_t prefix, uint32_t mask, int need,
                                                SelectShared& sh, int32_t* idx) {
  using Scan = SelectShared::Scan;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Digits 2 (bits 20..10) and 3 (bits 9..0) over the keys with the digits found so far.
  for (int shift = 10; shift >= 0; shift -= 10) {
    const uint32_t digit_mask = shift ? 0x7FFu : 0x3FFu;
    sh.hist[2 * tid] = sh.hist[2 * tid + 1] = 0;
    __syncthreads();
    for (int base = 0; base < D; base += kSelectThreads) {
      const int j = base + tid;
      const uint32_t kj = j < D ? src[j] : 0;
      warp_histogram_add(sh.hist, j < D && (kj & mask) == prefix ? static_cast<int>((kj >> shift) & digit_mask) : -1);
    }
    __syncthreads();
    find_digit<Scan>(sh.hist, need, sh.scan, &sh.bin, &sh.need);
    prefix |= uint32_t(sh.bin) << shift;
    mask |= digit_mask << shift;
    need = sh.need;
  }

  // prefix is now the k-th best key; `need` of the keys equal to it are taken, lowest indices first. Warp w
  // owns keys [w·seg, (w+1)·seg) and reads them 32 consecutive at a time (no bank conflicts, coalesced):
  // it counts its keys above and equal to the threshold, learns from the other warps' counts where its
  // output starts and how many equal keys lie before it, then writes its taken keys in order.
  const int seg = (D + kSelectThreads - 1) / kSelectThreads * 32, lo = min(D, warp * seg), hi = min(D, lo + seg);
  int above = 0, equal = 0;
  for (int j = lo + lane; j < hi; j += 32) {
    const uint32_t kj = src[j];
    above += kj > prefix;
    equal += kj == prefix;
  }
  above = __reduce_add_sync(0xffffffffu, above);
  equal = __reduce_add_sync(0xffffffffu, equal);
  if (lane == 0) {
    sh.above[warp] = above;
    sh.equal[warp] = equal;
  }
  __syncthreads();
  static_assert(kSelectWarps == 32, "one lane per warp sums the warps before it");
  const int equal_before = __reduce_add_sync(0xffffffffu, lane < warp ? sh.equal[lane] : 0);
  int at = __reduce_add_sync(0xffffffffu, lane < warp ? sh.above[lane] : 0) + min(need, equal_before);
  int equal_seen = equal_before;  // equal keys at lower indices than this round's
  const uint32_t lanes_below = (1u << lane) - 1;
  for (int base = lo; base < hi; base += 32) {
    const int j = base + lane;
    const uint32_t kj = j < hi ? src[j] : 0;
    const bool is_equal = j < hi && kj == prefix;
    const uint32_t equal_lanes = __ballot_sync(0xffffffffu, is_equal);
    const bool take = (j < hi && kj > prefix) || (is_equal && equal_seen + __popc(equal_lanes & lanes_below) < need);
    const uint32_t take_lanes = __ballot_sync(0xffffffffu, take);
    if (take) idx[at + __popc(take_lanes & lanes_below)] = j;
    at += __popc(take_lanes);
    equal_seen += __popc(equal_lanes);
  }
}

// One CTA: idx[k] = the k best of key[D], ascending (ties: lower index first). top_hist: the histogram of
// key >> 21 that relu_column_sum_kernel built. staged: the dynamic shared memory holds D keys, which are
// copied there; otherwise every pass reads key from global memory.
__global__ void __launch_bounds__(kSelectThreads) select_top_kernel(const uint32_t* key, int D, int k,
                                                                    const int* top_hist, bool staged, int32_t* idx) {
  extern __shared__ __align__(16) uint32_t keys[];  // [D] when staged
  __shared__ SelectShared sh;
  const int tid = threadIdx.x;
  static_assert(2 * kSelectThreads == kDigitBins, "find_digit gives each thread two bins");

  // 16-byte copies where the keys are 16-byte aligned (cudaMalloc'd scratch always is), 4-byte ones for
  // the rest; they land while digit 1 is found.
  if (staged) {
    const int chunks = (reinterpret_cast<uintptr_t>(key) & 15) == 0 ? D / 4 : 0;
    for (int c = tid; c < chunks; c += kSelectThreads) cp_async16(keys + 4 * c, key + 4 * c, true);
    for (int j = 4 * chunks + tid; j < D; j += kSelectThreads) cp_async4(keys + j, key + j);
    cp_async_commit();
  }

  // Digit 1 (bits 31..21) from the global histogram.
  sh.hist[2 * tid] = top_hist[2 * tid];
  sh.hist[2 * tid + 1] = top_hist[2 * tid + 1];
  __syncthreads();
  find_digit<SelectShared::Scan>(sh.hist, k, sh.scan, &sh.bin, &sh.need);
  const uint32_t prefix = uint32_t(sh.bin) << 21, mask = 0xFFE00000u;
  const int need = sh.need;

  if (staged) {
    cp_async_wait<0>();
    __syncthreads();  // every thread's copies are visible
    select_top_rest(keys, D, prefix, mask, need, sh, idx);
  } else {
    select_top_rest(key, D, prefix, mask, need, sh, idx);
  }
}

}  // namespace

void random_uniform(void* out, int64_t n, bool f32, Elem e, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return;
  if (f32) {
    random_kernel<<<grid_for(n, 4), kThreads, 0, stream>>>(static_cast<float*>(out), n, lo, hi, seed);
  } else {
    dispatch(e, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      random_kernel<<<grid_for(n, 4), kThreads, 0, stream>>>(static_cast<T*>(out), n, lo, hi, seed);
    });
  }
  check_launch("random_uniform");
}

void to_f32(const void* in, float* out, int64_t n, Elem e, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    convert_kernel<<<grid_for(n, 4), kThreads, 0, stream>>>(static_cast<const T*>(in), out, n);
  });
  check_launch("to_f32");
}

void from_f32(const float* in, void* out, int64_t n, Elem e, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    convert_kernel<<<grid_for(n, 4), kThreads, 0, stream>>>(in, static_cast<T*>(out), n);
  });
  check_launch("from_f32");
}

void embedding(const void* table, int64_t rows, int64_t d, const int32_t* ids, int64_t n, int64_t id_offset, void* out,
               int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    embedding_kernel<<<static_cast<unsigned>(n), row_threads(d), 0, stream>>>(
        static_cast<const T*>(table), rows, d, ids, id_offset, static_cast<T*>(out), error_flag);
  });
  check_launch("embedding");
}

void add(const void* a, const void* b, void* out, int64_t n, Elem e, cudaStream_t stream) {
  launch_binary(a, b, out, n, e, stream, AddOp{}, "add");
}


void silu_mul(const void* gate_up, void* out, int64_t T, int64_t F, Elem e, cudaStream_t stream) {
  if (T * F == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    silu_mul_kernel<<<grid_for(T * F, 4), kThreads, 0, stream>>>(static_cast<const Ty*>(gate_up), static_cast<Ty*>(out),
                                                                 T, F);
  });
  check_launch("silu_mul");
}

void norm(const void* x, const void* w, const void* b, float eps, bool rms, int64_t rows, int64_t d, void* out, Elem e,
          cudaStream_t stream) {
  if (rows == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    norm_kernel<<<static_cast<unsigned>(rows), row_threads(d), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), eps, rms, d, static_cast<T*>(out));
  });
  check_launch(rms ? "rms_norm" : "layer_norm");
}

void rope_kv_append(const void* qkv, void* q, int64_t H, const int32_t* positions, const float* inv_freq,
                    const int32_t* slots, int64_t T, int64_t Hkv, int64_t dh, void* k_cache, void* v_cache,
                    int64_t num_slots, int64_t block_size, int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (T == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    rope_kv_append_kernel<<<static_cast<unsigned>(T), row_threads((H + 2 * Hkv) * dh / 2), 0, stream>>>(
        static_cast<const Ty*>(qkv), static_cast<Ty*>(q), H, positions, inv_freq, slots, Hkv, dh,
        static_cast<Ty*>(k_cache), static_cast<Ty*>(v_cache), num_slots, block_size, error_flag);
  });
  check_launch("rope_kv_append");
}

void route_heads(const void* scores, int64_t R, int64_t H, int64_t group, int64_t k, int32_t* idx, Elem e,
                 cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    route_heads_kernel<<<static_cast<unsigned>(R), kThreads, 0, stream>>>(static_cast<const Ty*>(scores), static_cast<int>(H),
                                                              static_cast<int>(group), static_cast<int>(k), idx);
  });
  check_launch("route_heads");
}

void route_neurons(const void* logits, int64_t R, int64_t D, const int32_t* live_rows, int64_t k, int32_t* scratch,
                   int32_t* idx, Elem e, cudaStream_t stream) {
  if (D > (int64_t(1) << 30)) fail("route_neurons: {} neurons overflow the selection's int counters", D);
  int* top_hist = scratch;
  uint32_t* key = reinterpret_cast<uint32_t*>(scratch + kDigitBins);
  if (cudaMemsetAsync(top_hist, 0, kDigitBins * sizeof(int), stream) != cudaSuccess)
    fail("route_neurons: resetting the histogram failed");
  const int blocks = static_cast<int>(std::min<int64_t>((D + kThreads - 1) / kThreads, 1024));
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    relu_column_sum_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const Ty*>(logits), R, D, live_rows, key, top_hist);
  });
  check_launch("route_neurons (scores)");
  // The keys are staged in shared memory when they fit beside the kernel's static arrays.
  int device = 0, optin = 0;
  cudaFuncAttributes attr{};
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaFuncGetAttributes(&attr, select_top_kernel) != cudaSuccess)
    fail("route_neurons: cannot query the selection's shared memory");
  const int64_t key_bytes = D * int64_t(sizeof(uint32_t));
  const bool staged = key_bytes + int64_t(attr.sharedSizeBytes) <= optin;
  const int bytes = staged ? static_cast<int>(key_bytes) : 0;
  if (cudaFuncSetAttribute(select_top_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    fail("route_neurons: cannot reserve {} bytes of shared memory", bytes);
  select_top_kernel<<<1, kSelectThreads, bytes, stream>>>(key, static_cast<int>(D), static_cast<int>(k), top_hist,
                                                          staged, idx);
  check_launch("route_neurons (selection)");
}

void keep_heads(void* out, int64_t T, int64_t H, int64_t group, int64_t dh, const int32_t* heads, int64_t k,
                int64_t heads_stride, const int32_t* dense_tokens, int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (T == 0) return;
  if (H * dh > INT32_MAX || k > INT32_MAX) fail("keep_heads: {} heads of {} overflow the kernel's int indices", H, dh);
  const int64_t bytes = (H / group + 31) / 32 * int64_t(sizeof(uint32_t));
  // 48 KB of dynamic shared memory need no opt-in and hold 393216 units, far more than any layer has.
  if (bytes > 48 * 1024) fail("keep_heads: a bitmap of {} units exceeds 48 KB of shared memory", H / group);
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    keep_heads_kernel<<<static_cast<unsigned>(T), row_threads(H * dh), static_cast<size_t>(bytes), stream>>>(
        static_cast<Ty*>(out), static_cast<int>(H), static_cast<int>(group), static_cast<int>(dh), heads,
        static_cast<int>(k), static_cast<int>(heads_stride), dense_tokens, error_flag);
  });
  check_launch("keep_heads");
}

// One CTA per row: the rank's entries of an ascending row are one run [lo, hi), found by two binary
// searches, then copied renumbered and padded with `count` in parallel.
__global__ void localize_indices_kernel(const int32_t* idx, int k, int first, int count, int32_t* out, int m) {
  __shared__ int run[2];
  const int32_t* row = idx + int64_t(blockIdx.x) * k;
  if (threadIdx.x < 2) {
    const int bound = threadIdx.x == 0 ? first : first + count;
    int lo = 0, hi = k;  // first position whose entry is >= bound
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (row[mid] < bound) lo = mid + 1;
      else hi = mid;
    }
    run[threadIdx.x] = lo;
  }
  __syncthreads();
  const int n = run[1] - run[0];
  for (int j = threadIdx.x; j < m; j += blockDim.x)
    out[int64_t(blockIdx.x) * m + j] = j < n ? row[run[0] + j] - first : count;
}

void localize_indices(const int32_t* idx, int64_t R, int64_t k, int64_t first, int64_t count, int32_t* out, int64_t m,
                      cudaStream_t stream) {
  if (R == 0) return;
  localize_indices_kernel<<<static_cast<unsigned>(R), kThreads, 0, stream>>>(idx, static_cast<int>(k), static_cast<int>(first),
                                                                          static_cast<int>(count), out, static_cast<int>(m));
  check_launch("localize_indices");
}

void move_columns(const void* src, void* dst, int64_t M, int64_t D, const int32_t* idx, int64_t k, bool gather,
                  int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (M == 0 || k == 0) return;
  const dim3 grid(static_cast<unsigned>((k + kThreads - 1) / kThreads),
                  static_cast<unsigned>((M + kMoveRows - 1) / kMoveRows));
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    if (gather)
      move_columns_kernel<Ty, true><<<grid, kThreads, 0, stream>>>(static_cast<const Ty*>(src), static_cast<Ty*>(dst),
                                                                    M, D, idx, k, error_flag);
    else
      move_columns_kernel<Ty, false><<<grid, kThreads, 0, stream>>>(static_cast<const Ty*>(src), static_cast<Ty*>(dst),
                                                                     M, D, idx, k, error_flag);
  });
  check_launch("move_columns");
}

void l2_norms(const void* x, int64_t R, int64_t n, void* out, Elem e, cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    l2_norms_kernel<<<static_cast<unsigned>(R), row_threads(n), 0, stream>>>(static_cast<const Ty*>(x), n,
                                                                             static_cast<Ty*>(out));
  });
  check_launch("l2_norms");
}

void argmax(const void* logits, int64_t R, int64_t V, int32_t* out, Elem e, cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    argmax_kernel<<<static_cast<unsigned>(R), 1024, 0, stream>>>(static_cast<const T*>(logits), V, out);
  });
  check_launch("argmax");
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
    sample_kernel<<<static_cast<unsigned>(R), kSampleThreads, 0, stream>>>(static_cast<const T*>(logits), V, temperature,
                                                                            top_k, top_p, uniforms, out);
  });
  check_launch("sample");
}

}  // namespace polar::cuda
