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
// A CTA works on kRows weight rows at once, each thread on kChunks chunks of each: 16 loads in flight per
// thread (256 bytes at 16-byte chunks), and kRows·M accumulators, fewer rows at larger M to stay within the
// 128 registers that let two CTAs share an SM.
template <int kM> struct RowGroup {
  static constexpr int kRows = kM <= 2 ? 8 : 4;
  static constexpr int kChunks = 16 / kRows;
};

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

// y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias) (+ y) over the selected units' columns: see the file comment. Grid:
// one wave of kThreads-thread CTAs, CTA b owning rows [b·N/G, (b+1)·N/G).
template <typename T, bool kVec, int kM>
__global__ void __launch_bounds__(kThreads, 2) selected_gemv_kernel(SelectedGemv g) {
  using C = Chunk<T, kVec>;
  constexpr int E = C::kElems;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* x = static_cast<const T*>(g.x);
  const T* w = static_cast<const T*>(g.w);
  const int width = static_cast<int>(g.width);
  const int64_t K = g.units * g.width;

  // The selected units, ascending: unit_list[0, selected) (every unit without a selection).
  __shared__ int32_t unit_list[kSelectedGemvMaxUnits];
  __shared__ uint8_t marked[kSelectedGemvMaxUnits];
  __shared__ int selected;
  __shared__ float partial[kWarps][RowGroup<kM>::kRows * kM];
  if (g.sel) {
    for (int64_t u = tid; u < g.units; u += kThreads) marked[u] = 0;
    __syncthreads();
    for (int64_t i = tid; i < g.M * g.sel_k; i += kThreads) {
      const int32_t u = g.sel[i];
      if (u >= 0 && u < g.units) marked[u] = 1;
    }
    if (g.dense_rows)
      for (int m = 0; m < kM; ++m)
        if (g.dense_rows[m])
          for (int64_t u = tid; u < g.units; u += kThreads) marked[u] = 1;
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
  }
  // Chunk c of the selected columns is column unit_list[c / per_unit]·width + (c % per_unit)·E (32-bit: K <
  // 2^31, and a 64-bit division is a call); without a selection, column c·E.
  const int per_unit = width / E;
  const int chunks = g.sel ? selected * per_unit : static_cast<int>(K / E);
  auto column = [&](int c) {
    if (!g.sel) return c * E;
    const int u = c / per_unit;
    return unit_list[u] * width + (c - u * per_unit) * E;
  };

  // The CTA's rows in groups of R, each group's chunks in steps of kThreads·S; the loads of step s + 1 are
  // issued as soon as step s's values are used, so they are in flight through the group's reduction.
  constexpr int R = RowGroup<kM>::kRows, S = RowGroup<kM>::kChunks;
  const int64_t r0 = blockIdx.x * g.N / gridDim.x, r1 = (blockIdx.x + 1) * g.N / gridDim.x;
  const int iters = (chunks + kThreads * S - 1) / (kThreads * S), groups = static_cast<int>((r1 - r0 + R - 1) / R);
  const int steps = iters * groups;
  typename C::Raw wv[S][R];
  int col[S];
  auto load = [&](int step) {
    const int grp = step / iters;
    const int64_t n0 = r0 + int64_t(grp) * R;
    const int c0 = tid + (step - grp * iters) * kThreads * S;
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const int c = c0 + kThreads * j;
      col[j] = c < chunks ? column(c) : -1;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[j][r] = col[j] >= 0 && n0 + r < r1 ? C::load_streaming(w + (n0 + r) * K + col[j]) : C::zero();
    }
  };
  if (steps > 0) load(0);
  float acc[R][kM] = {};
  for (int step = 0; step < steps; ++step) {
#pragma unroll
    for (int j = 0; j < S; ++j) {
      if (col[j] < 0) break;
      float xf[kM][E];
#pragma unroll
      for (int m = 0; m < kM; ++m) C::to_float(C::load_cached(x + m * g.ldx + col[j]), xf[m]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float wf[E];
        C::to_float(wv[j][r], wf);
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][m] = fmaf(wf[e], xf[m][e], acc[r][m]);
      }
    }
    if (step + 1 < steps) load(step + 1);
    if ((step + 1) % iters != 0) continue;
    // The group is done. Sum over the warp's lanes, then over the warps in a fixed order: every (row, x row)
    // sums the same partial products in the same order whatever M is (a thread takes chunks tid, tid +
    // kThreads, ... in turn for any R and S), so a token's output does not depend on the batch.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        float v = acc[r][m];
        acc[r][m] = 0.0f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) partial[warp][r * kM + m] = v;
      }
    __syncthreads();
    const int64_t n0 = r0 + int64_t(step / iters) * R;
    if (tid < R * kM && n0 + tid / kM < r1) {
      const int r = tid / kM, m = tid % kM;
      float v = 0.0f;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) v += partial[k][tid];
      const int64_t n = n0 + r;
      if (g.bias) v += detail::to_float(static_cast<const T*>(g.bias)[n]);
      T* out = static_cast<T*>(g.y) + m * g.ldy + n;
      if (g.accumulate) v += detail::to_float(*out);
      *out = from_float<T>(v);
    }
    __syncthreads();
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, bool kVec, int kM> void launch_rows(const SelectedGemv& g, int num_sms, cudaStream_t stream) {
  static const int per_sm = ctas_per_sm(selected_gemv_kernel<T, kVec, kM>, kThreads, 0, "selected_gemv");
  const int64_t wave = int64_t(per_sm) * std::max(num_sms, 1);
  constexpr int R = RowGroup<kM>::kRows;
  const int ctas = static_cast<int>(std::clamp<int64_t>((g.N + R - 1) / R, 1, wave));
  selected_gemv_kernel<T, kVec, kM><<<ctas, kThreads, 0, stream>>>(g);
}

template <typename T, bool kVec> void launch(const SelectedGemv& g, int num_sms, cudaStream_t stream) {
  static_assert(kSelectedGemvMaxRows == 4);
  switch (g.M) {
    case 1: return launch_rows<T, kVec, 1>(g, num_sms, stream);
    case 2: return launch_rows<T, kVec, 2>(g, num_sms, stream);
    case 3: return launch_rows<T, kVec, 3>(g, num_sms, stream);
    default: return launch_rows<T, kVec, 4>(g, num_sms, stream);
  }
}

}  // namespace

void selected_gemv(const SelectedGemv& g, int num_sms, Elem e, cudaStream_t stream) {
  if (g.M == 0 || g.N == 0) return;
  const int64_t K = g.units * g.width;
  if (g.M > kSelectedGemvMaxRows || g.units < 1 || g.units > kSelectedGemvMaxUnits || g.width < 1 ||
      K >= (int64_t(1) << 31) || g.ldx < K)
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
