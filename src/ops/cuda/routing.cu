// Sparse selection (routing.h): the attention router's per-row top-k heads, the MLP router's batch top-k
// neurons (column sums + radix select), keep_heads, and the per-rank localisation of selections.
#include "ops/cuda/routing.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_scan.cuh>

#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

// ---- sparse selection (route_heads, route_neurons): the same order as the CPU's select_top — higher score
// first, NaN as -inf, the lower index first among equals — so both backends select the same set ----

__device__ __forceinline__ float nan_as_lowest(float v) { return isnan(v) ? -INFINITY : v; }

// One CTA per row of scores [R, H]: pooled[g] = max over the group's heads; a group is kept when fewer than
// k groups rank before it (and, with a cutoff, fewer than kmin do or its score clears the row's threshold:
// the units above a threshold are a prefix of the rank order), and written at the count of kept groups
// below it (ascending order); the row's other k - n entries get G (padding). O(G²) per row, which at
// G <= 1024 heads costs less than the launch. Statistical top-k's mean and std are summed by one thread in
// index order in fp64 with explicit FMAs where the CPU has them (and no other contraction): the same
// threshold on both backends, O(G) per row.
template <typename T>
__global__ void route_heads_kernel(const T* scores, int H, int group, int k, RowCutoff cut, int32_t* idx) {
  __shared__ float pooled[1024];
  __shared__ int32_t kept[1024];
  __shared__ double threshold;
  __shared__ int n_kept;
  const int G = H / group;
  const T* row = scores + int64_t(blockIdx.x) * H;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float m = -INFINITY;
    for (int j = 0; j < group; ++j) m = fmaxf(m, nan_as_lowest(to_float(row[g * group + j])));
    pooled[g] = m;
  }
  if (threadIdx.x == 0) n_kept = 0;
  __syncthreads();
  if (threadIdx.x == 0 && cut.mode == RowCutoff::kRowStat) {
    double sum = 0;
    for (int g = 0; g < G; ++g) sum = __dadd_rn(sum, double(pooled[g]));
    const double mean = sum / double(G);
    double ss = 0;
    for (int g = 0; g < G; ++g) {
      const double d = __dsub_rn(double(pooled[g]), mean);
      ss = fma(d, d, ss);
    }
    threshold = fma(double(cut.value), sqrt(ss / double(G)), mean);
  } else if (threadIdx.x == 0) {
    threshold = double(cut.value);
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    int rank = 0;
    for (int o = 0; o < G; ++o) rank += pooled[o] > pooled[g] || (pooled[o] == pooled[g] && o < g);
    kept[g] = rank < k && (cut.mode == RowCutoff::kTopK || rank < cut.kmin || double(pooled[g]) >= threshold);
    if (kept[g]) atomicAdd(&n_kept, 1);
  }
  __syncthreads();
  int32_t* out = idx + int64_t(blockIdx.x) * k;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    if (!kept[g]) continue;
    int at = 0;
    for (int o = 0; o < g; ++o) at += kept[o];
    out[at] = g;
  }
  for (int j = n_kept + threadIdx.x; j < k; j += blockDim.x) out[j] = G;
  if (threadIdx.x == 0 && cut.tally) {
    const int r = blockIdx.x;
    if ((!cut.live_rows || r < cut.live_rows[0]) && (!cut.dense_rows || !cut.dense_rows[r])) {
      atomicAdd(&cut.tally[0], n_kept);
      atomicAdd(&cut.tally[1], 1);
    }
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

void route_heads(const void* scores, int64_t R, int64_t H, int64_t group, int64_t k, const RowCutoff& cutoff,
                 int32_t* idx, Elem e, cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    route_heads_kernel<Ty><<<static_cast<unsigned>(R), kGridThreads, 0, stream>>>(static_cast<const Ty*>(scores),
        static_cast<int>(H), static_cast<int>(group), static_cast<int>(k), cutoff, idx);
    check_launch("route_heads");
  });
}

void route_neurons(const void* logits, int64_t R, int64_t D, const int32_t* live_rows, int64_t k, int32_t* scratch,
                   int32_t* idx, Elem e, cudaStream_t stream) {
  if (D > (int64_t(1) << 30)) fail("route_neurons: {} neurons overflow the selection's int counters", D);
  int* top_hist = scratch;
  uint32_t* key = reinterpret_cast<uint32_t*>(scratch + kDigitBins);
  if (cudaMemsetAsync(top_hist, 0, kDigitBins * sizeof(int), stream) != cudaSuccess)
    fail("route_neurons: resetting the histogram failed");
  const int blocks = static_cast<int>(std::min<int64_t>((D + kGridThreads - 1) / kGridThreads, 1024));
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    relu_column_sum_kernel<<<blocks, kGridThreads, 0, stream>>>(static_cast<const Ty*>(logits), R, D, live_rows, key,
        top_hist);
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
    keep_heads_kernel<Ty><<<static_cast<unsigned>(T), row_threads(H * dh), static_cast<size_t>(bytes), stream>>>(static_cast<Ty*>(out),
        static_cast<int>(H), static_cast<int>(group), static_cast<int>(dh), heads, static_cast<int>(k),
        static_cast<int>(heads_stride), dense_tokens, error_flag);
    check_launch("keep_heads");
  });
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
  localize_indices_kernel<<<static_cast<unsigned>(R), kGridThreads, 0, stream>>>(idx, static_cast<int>(k),
      static_cast<int>(first),
                                                                          static_cast<int>(count), out, static_cast<int>(m));
  check_launch("localize_indices");
}

}  // namespace polar::cuda
