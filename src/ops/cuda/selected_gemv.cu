// The selective o_proj kernel (see selected_gemv.h for the operation and layouts).
//
// At m <= 4 a projection is a stream of weight bytes with 2·m flops each, so the kernel is written for the
// memory system alone:
//   * Each CTA first marks the units its rows selected in shared memory (sel is M·k entries) and compacts
//     them with ballots into the list of columns blocks to read.
//   * One warp computes kRowsPerWarp = 2 adjacent output rows for every row of x: lane l takes the 16-byte
//     chunks l, l + 32, l + 64, ... of the selected columns of both weight rows, kBatch = 8 chunks of each
//     row loaded before any is used, so every thread has 16 loads (256 bytes) in flight, a warp 8 KB, an SM
//     (16 warps) 128 KB: more than HBM's latency-bandwidth product asks for.
//   * Weights are loaded with the streaming hint (ld.global.cs: used once, evicted first); x (at most 4 rows)
//     through the read-only path, where every warp of an SM finds it in L1.
//   * Work is grid-strided: at most as many CTAs as fit on the GPU at once, warps walking row pairs; a row
//     pair covers all selected columns, so no partial sums leave the warp (a shuffle reduction, then lane 0
//     stores).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/selected_gemv.h"

namespace polar::cuda {

namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 2;
constexpr int kBatch = 8;  // chunks of each row in flight per lane

// A chunk: 8 elements (16 bytes) where the rows allow it, else 1.
template <typename T, bool kVec> struct Chunk {
  static constexpr int kElems = kVec ? 8 : 1;
  using Raw = std::conditional_t<kVec, uint4, T>;
  static __device__ __forceinline__ Raw load_streaming(const T* p) {
    if constexpr (kVec)
      return __ldcs(reinterpret_cast<const uint4*>(p));
    else
      return *p;
  }
  static __device__ __forceinline__ Raw load_cached(const T* p) {
    if constexpr (kVec)
      return __ldg(reinterpret_cast<const uint4*>(p));
    else
      return *p;
  }
  static __device__ __forceinline__ Raw zero() {
    if constexpr (kVec)
      return make_uint4(0, 0, 0, 0);
    else
      return T(0.0f);
  }
  static __device__ __forceinline__ void to_float(const Raw& r, float (&f)[kElems]) {
    if constexpr (kVec) {
      const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 p;
        if constexpr (std::is_same_v<T, __half>)
          p = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
        else
          p = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
      }
    } else {
      f[0] = detail::to_float(r);
    }
  }
};

// y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias) (+ y) over the selected units' columns: see the file comment. Grid: up
// to a wave of kThreads-thread CTAs.
template <typename T, bool kVec> __global__ void __launch_bounds__(kThreads) selected_gemv_kernel(SelectedGemv g) {
  using C = Chunk<T, kVec>;
  constexpr int E = C::kElems;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = static_cast<const T*>(g.x);
  const T* w = static_cast<const T*>(g.w);
  const int M = static_cast<int>(g.M);
  const int width = static_cast<int>(g.width);
  const int64_t K = g.units * g.width;

  // The selected units, ascending: unit_list[0, selected).
  __shared__ int32_t unit_list[kSelectedGemvMaxUnits];
  __shared__ uint8_t marked[kSelectedGemvMaxUnits];
  __shared__ int selected;
  for (int64_t u = threadIdx.x; u < g.units; u += kThreads) marked[u] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < g.M * g.sel_k; i += kThreads) {
    const int32_t u = g.sel[i];
    if (u >= 0 && u < g.units) marked[u] = 1;
  }
  if (g.dense_rows)
    for (int m = 0; m < M; ++m)
      if (g.dense_rows[m])
        for (int64_t u = threadIdx.x; u < g.units; u += kThreads) marked[u] = 1;
  __syncthreads();
  if (warp == 0) {
    int count = 0;
    for (int64_t u0 = 0; u0 < g.units; u0 += 32) {
      const bool on = u0 + lane < g.units && marked[u0 + lane];
      const unsigned ballot = __ballot_sync(0xffffffffu, on);
      if (on) unit_list[count + __popc(ballot & ((1u << lane) - 1))] = static_cast<int32_t>(u0 + lane);
      count += __popc(ballot);
    }
    if (lane == 0) selected = count;
  }
  __syncthreads();
  // Chunk c of the selected columns is column unit_list[c / per_unit]·width + (c % per_unit)·E (32-bit: K <
  // 2^31, and a 64-bit division is a call).
  const int per_unit = width / E, chunks = selected * per_unit;
  auto column = [&](int c) {
    const int u = c / per_unit;
    return unit_list[u] * width + (c - u * per_unit) * E;
  };

  const int64_t pairs = (g.N + kRowsPerWarp - 1) / kRowsPerWarp;
  for (int64_t pair = blockIdx.x * int64_t(kWarps) + warp; pair < pairs; pair += int64_t(gridDim.x) * kWarps) {
    const int64_t n0 = pair * kRowsPerWarp;
    const T* rows[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) rows[r] = w + min(n0 + r, g.N - 1) * K;
    float acc[kRowsPerWarp][kSelectedGemvMaxRows] = {};
    for (int c0 = lane; c0 < chunks; c0 += 32 * kBatch) {
      typename C::Raw wv[kRowsPerWarp][kBatch];
      int col[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int c = c0 + 32 * j;
        col[j] = c < chunks ? column(c) : -1;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
          wv[r][j] = col[j] >= 0 ? C::load_streaming(rows[r] + col[j]) : C::zero();
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if (col[j] < 0) break;
        float wf[kRowsPerWarp][E];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) C::to_float(wv[r][j], wf[r]);
#pragma unroll
        for (int m = 0; m < kSelectedGemvMaxRows; ++m) {
          if (m >= M) break;
          float xf[E];
          C::to_float(C::load_cached(x + m * g.ldx + col[j]), xf);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][m] = fmaf(wf[r][e], xf[e], acc[r][m]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int m = 0; m < kSelectedGemvMaxRows; ++m)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t n = n0 + r;
        if (n >= g.N) break;
        const float b = g.bias ? detail::to_float(static_cast<const T*>(g.bias)[n]) : 0.0f;
#pragma unroll
        for (int m = 0; m < kSelectedGemvMaxRows; ++m) {
          if (m >= M) break;
          T* out = static_cast<T*>(g.y) + m * g.ldy + n;
          float v = acc[r][m] + b;
          if (g.accumulate) v += detail::to_float(*out);
          *out = from_float<T>(v);
        }
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, bool kVec> void launch(const SelectedGemv& g, int num_sms, cudaStream_t stream) {
  static const int per_sm = ctas_per_sm(selected_gemv_kernel<T, kVec>, kThreads, 0, "selected_gemv");
  const int64_t pairs = (g.N + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t wave = int64_t(per_sm) * std::max(num_sms, 1);
  const int ctas = static_cast<int>(std::clamp<int64_t>((pairs + kWarps - 1) / kWarps, 1, wave));
  selected_gemv_kernel<T, kVec><<<ctas, kThreads, 0, stream>>>(g);
}

}  // namespace

void selected_gemv(const SelectedGemv& g, int num_sms, Elem e, cudaStream_t stream) {
  if (g.M == 0 || g.N == 0) return;
  const int64_t K = g.units * g.width;
  if (g.M > kSelectedGemvMaxRows || g.units < 1 || g.units > kSelectedGemvMaxUnits || g.width < 1 ||
      K >= (int64_t(1) << 31) || g.ldx < K || !g.sel)
    fail("selected_gemv: {} rows (at most {}) of {} units of {} columns (at most {} units)", g.M, kSelectedGemvMaxRows,
         g.units, g.width, kSelectedGemvMaxUnits);
  const bool vec = g.width % 8 == 0 && g.ldx % 8 == 0 && aligned16(g.x) && aligned16(g.w);
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    vec ? launch<T, true>(g, num_sms, stream) : launch<T, false>(g, num_sms, stream);
  });
  check_launch("selected_gemv");
}

}  // namespace polar::cuda
