// The gather-GEMM kernel (see gather_gemm.h for the operation and layouts).
//
// A decode MLP is memory-bound: M (the batch) is small and each selected weight byte is used M times, so
// the kernel is built to stream the selected rows once at full bandwidth:
//   * CTA tile [BM rows of x, 64 columns of y] (BM 16, 32 or 64 by the batch), 4 warps; warp w owns
//     columns [16w, 16w + 16) over all BM rows, as m16n8k16 tiles with fp32 accumulators.
//   * K is walked in 64-wide tiles through a 4-stage cp.async pipeline: a stage holds x[m0:m0+BM, k:k+64]
//     and the 64-deep slice of B, copied from the selected weight rows (a neuron's row is contiguous, so
//     every copy is a full 16-byte vector). Up stores B as
//     [n][k] (its rows are neurons) and feeds the MMA with ldmatrix; down stores it as [k][n] and uses
//     ldmatrix.trans. The neuron ids of a stage are fetched one step before its copies are issued.
//   * Work is split stream-K style: the (N tile, k-tile) units of one row of M tiles are divided evenly
//     over as many CTAs as fit on the GPU at once, so no wave runs part-empty (a decode GEMM is only one
//     or two waves of tiles, and a half-empty last wave costs as much as a full one). A CTA walks its
//     units in order through one continuous pipeline; an output tile it covers whole gets the epilogue
//     from registers, a tile shared with neighbours gets fp32 partial sums (at most two per CTA: its first
//     and its last tile) that a second kernel adds in CTA order (deterministic) before the epilogue.
//     CTAs of the M tiles of one unit range are adjacent in launch order, so at batch > BM a weight tile
//     is read from HBM once and from L2 by its siblings.
// Shared rows are padded by 16 bytes so the 8 rows of one ldmatrix phase fall in distinct banks.
#include <algorithm>
#include <cstdint>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/gather_gemm.h"

namespace polar::cuda {

namespace {

using namespace detail;

constexpr int kBK = 64;

// Compile-time shape of one configuration: BM rows of x, up (gather_n) or down. (Wider N tiles, 4·BM with
// 8 warps at BM 64, cut x's L2 re-reads but measured 1.3-2.7x slower on an H200 at batch 64: see
// docs/benchmarks.md.)
template <int BM, bool kGatherN> struct Cfg {
  static constexpr int kBN = 64;
  static constexpr int kWarpCols = 16;
  static constexpr int kWarps = kBN / kWarpCols;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kNT = kWarpCols / 8;  // n8 tiles per warp
  static constexpr int kStages = 4;
  static constexpr int kXPitch = kBK + 8;
  // B in shared memory: up [kBN n][kBK k], down [kBK k][kBN n].
  static constexpr int kWRows = kGatherN ? kBN : kBK, kWCols = kGatherN ? kBK : kBN, kWPitch = kWCols + 8;
  static constexpr int kXChunks = BM * kBK / 8 / kThreads;       // 16-byte copies per thread per stage
  static constexpr int kWChunks = kWRows * kWCols / 8 / kThreads;
  static constexpr int kSmemBytes = kStages * (BM * kXPitch + kWRows * kWPitch) * 2;
};

constexpr int kMinUnitsPerCta = 16;  // fewer, and the pipeline fill and the partial sums outweigh the balance

// Stream-K partition: CTA c of an M-tile row owns units [c·W/G, (c+1)·W/G) of W = n_tiles · k_tiles, unit
// u being k-tile u % k_tiles of N tile u / k_tiles.
struct Plan {
  int bm = 64;
  int m_tiles = 1, n_tiles = 1, k_tiles = 1;
  int64_t units = 1;  // W
  int ctas = 1;       // G, per M-tile row
  __host__ __device__ int64_t begin(int64_t c) const { return c * units / ctas; }
  // The CTA whose range holds unit u: the largest c with begin(c) <= u.
  __host__ __device__ int64_t owner(int64_t u) const { return ((u + 1) * ctas + units - 1) / units - 1; }
};

int bm_for(int64_t M) { return M <= 16 ? 16 : (M <= 32 ? 32 : 64); }

Plan plan_for(const GatherGemm& g, int resident_ctas) {
  Plan p;
  p.bm = bm_for(g.M);
  p.m_tiles = static_cast<int>((g.M + p.bm - 1) / p.bm);
  p.n_tiles = static_cast<int>((g.N + Cfg<16, true>::kBN - 1) / Cfg<16, true>::kBN);
  p.k_tiles = static_cast<int>(std::max<int64_t>(1, (g.K + kBK - 1) / kBK));
  p.units = int64_t(p.n_tiles) * p.k_tiles;
  p.ctas = static_cast<int>(
      std::clamp<int64_t>(std::min<int64_t>(resident_ctas / p.m_tiles, p.units / kMinUnitsPerCta), 1, p.units));
  return p;
}

// y[m, n] = epilogue(v): the one place the output is written, from registers or from the partial sums.
template <typename T>
__device__ __forceinline__ void finish(const GatherGemm& g, int64_t m, int64_t n, float v) {
  const T* bias = static_cast<const T*>(g.bias);
  T* y = static_cast<T*>(g.y) + m * g.ldy + n;
  if (bias) {
    const int64_t j = g.gather_n ? g.idx[n] : n;
    if (j >= 0 && j < (g.gather_n ? g.D : g.N)) v += to_float(bias[j]);
  }
  if (g.relu) v = fmaxf(v, 0.0f);
  if (g.accumulate) v += to_float(*y);
  *y = from_float<T>(v);
}

// Partial sums of CTA c (blockIdx.x / m_tiles) for its first (which 0) or last (which 1) tile: BM x BN fp32.
__host__ __device__ inline int64_t partial_offset(int64_t cta, int which, int tile_elems) {
  return (cta * 2 + which) * tile_elems;
}

template <typename T, int BM, bool kGatherN>
__global__ void __launch_bounds__(Cfg<BM, kGatherN>::kThreads)
    gather_gemm_kernel(const GatherGemm g, const Plan p, bool vec_x, bool vec_w, float* partial) {
  using C = Cfg<BM, kGatherN>;
  constexpr int kBN = C::kBN;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);         // [kStages][BM][kXPitch]
  T* ws = xs + C::kStages * BM * C::kXPitch;  // [kStages][kWRows][kWPitch]
  const T* x = static_cast<const T*>(g.x);
  const T* w = static_cast<const T*>(g.w);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m_tile = blockIdx.x % p.m_tiles;
  const int64_t c = blockIdx.x / p.m_tiles, m0 = int64_t(m_tile) * BM;
  const int64_t begin = p.begin(c);
  const int count = static_cast<int>(p.begin(c + 1) - begin);
  // A unit (k-tile kt of N tile `tile`) as a cursor: the loop advances cursors instead of dividing.
  struct Unit {
    int tile, kt;
  };
  auto advance = [&](Unit& u) {
    if (++u.kt == p.k_tiles) {
      u.kt = 0;
      ++u.tile;
    }
  };
  const Unit first{static_cast<int>(begin / p.k_tiles), static_cast<int>(begin % p.k_tiles)};

  // Thread tid copies the 8-element chunk at column x_col / w_col of rows x_row0 + i·x_step (x) and
  // w_row0 + i·w_step (B) of each stage. What does not change from unit to unit is computed here, once:
  // the x rows' addresses and the shared-memory addresses of the thread's chunks (a unit's copies are
  // then a few adds each; decode GEMMs are short enough that the copy loop's arithmetic shows).
  constexpr int x_step = C::kThreads / 8, w_step = C::kThreads / (C::kWCols / 8);
  const int x_col = (tid & 7) * 8, x_row0 = tid >> 3;
  const int w_col = tid % (C::kWCols / 8) * 8, w_row0 = tid / (C::kWCols / 8);
  const T* x_rows[C::kXChunks];  // null past M
  for (int i = 0; i < C::kXChunks; ++i) {
    const int64_t m = m0 + x_row0 + i * x_step;
    x_rows[i] = m < g.M ? x + m * g.ldx + x_col : nullptr;
  }
  constexpr uint32_t kXStageBytes = BM * C::kXPitch * 2, kXRowBytes = x_step * C::kXPitch * 2;
  constexpr uint32_t kWStageBytes = C::kWRows * C::kWPitch * 2, kWRowBytes = w_step * C::kWPitch * 2;
  const uint32_t x_dst0 = smem_u32(xs + x_row0 * C::kXPitch + x_col), w_dst0 = smem_u32(ws + w_row0 * C::kWPitch + w_col);
  const int K = static_cast<int>(g.K), N = static_cast<int>(g.N), D = static_cast<int>(g.D), ldw = static_cast<int>(g.ldw);
  // ids[i]: the neuron of B row w_row0 + i·w_step of a unit (up: an N index, down: a K index); -1 outside B.
  auto fetch_ids = [&](Unit u, int32_t ids[C::kWChunks]) {
    const int j0 = (kGatherN ? u.tile * kBN : u.kt * kBK) + w_row0;
    for (int i = 0; i < C::kWChunks; ++i) {
      const int j = j0 + i * w_step;
      ids[i] = j < (kGatherN ? N : K) ? g.idx[j] : -1;
    }
  };
  auto load_unit = [&](int stage, Unit u, const int32_t ids[C::kWChunks]) {
    const int n0 = u.tile * kBN, k0 = u.kt * kBK;
    for (int i = 0; i < C::kXChunks; ++i) {
      if (vec_x) {
        const bool ok = x_rows[i] && k0 + x_col < K;
        cp_async16(x_dst0 + stage * kXStageBytes + i * kXRowBytes, ok ? x_rows[i] + k0 : x, ok);
      } else {
        T* dst = xs + (stage * BM + x_row0 + i * x_step) * C::kXPitch + x_col;
        for (int e = 0; e < 8; ++e) dst[e] = x_rows[i] && k0 + x_col + e < K ? x_rows[i][k0 + e] : from_float<T>(0.0f);
      }
    }
    // Offset of the thread's chunk along the weight rows, and how many elements from there lie inside B.
    const int along = (kGatherN ? k0 : n0) + w_col, left = (kGatherN ? K : N) - along;
    for (int i = 0; i < C::kWChunks; ++i) {
      // Null when the row lies outside B, or its id is bad (then the error flag is raised).
      const bool valid = static_cast<uint32_t>(ids[i]) < static_cast<uint32_t>(D);
      const T* src = valid ? w + int64_t(ids[i]) * ldw + along : nullptr;
      if (!valid && (kGatherN ? n0 : k0) + w_row0 + i * w_step < (kGatherN ? N : K)) atomicOr(g.error_flag, kErrorIdOutOfRange);
      if (vec_w) {
        const bool ok = valid && left > 0;
        cp_async16(w_dst0 + stage * kWStageBytes + i * kWRowBytes, ok ? src : w, ok);
      } else {
        T* dst = ws + (stage * C::kWRows + w_row0 + i * w_step) * C::kWPitch + w_col;
        for (int e = 0; e < 8; ++e) dst[e] = src && e < left ? src[e] : from_float<T>(0.0f);
      }
    }
  };
  // Shared-window addresses of this lane's ldmatrix rows in stage 0, k-step 0 (see the loop below).
  const uint32_t a_frag0 = smem_u32(xs + (lane & 15) * C::kXPitch + (lane >> 4) * 8);
  const uint32_t b_frag0 =
      kGatherN ? smem_u32(ws + (warp * C::kWarpCols + (lane & 7) + (lane >> 4) * 8) * C::kWPitch + ((lane >> 3) & 1) * 8)
               : smem_u32(ws + ((lane & 7) + ((lane >> 3) & 1) * 8) * C::kWPitch + warp * C::kWarpCols + (lane >> 4) * 8);
  // A k-step of 16 moves the B address along a row (up) or down 16 rows (down); a pair of n8 tiles moves
  // it 16 rows (up) or 16 columns (down).
  constexpr uint32_t kBStepK = kGatherN ? 16 * 2 : 16 * C::kWPitch * 2, kBStepN = kGatherN ? 16 * C::kWPitch * 2 : 16 * 2;

  float acc[BM / 16][C::kNT][4] = {};
  int32_t ids[C::kWChunks];
  Unit next = first;  // the next unit whose ids are fetched
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < count) {
      fetch_ids(next, ids);
      load_unit(s, next, ids);
      advance(next);
    }
    cp_async_commit();
  }
  Unit pending = next;  // the unit whose ids are in `ids`, loaded next
  if (C::kStages - 1 < count) {
    fetch_ids(pending, ids);
    advance(next);
  }
  Unit cur = first;  // the unit computed in this iteration
  for (int i = 0; i < count; ++i) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();
    const int stage = i % C::kStages;
    const uint32_t a_stage = a_frag0 + stage * kXStageBytes, b_stage = b_frag0 + stage * kWStageBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      // Per pair of n8 tiles: b[0], b[1] the k halves of the first, b[2], b[3] of the second.
      uint32_t b[C::kNT / 2][4];
#pragma unroll
      for (int pr = 0; pr < C::kNT / 2; ++pr) {
        const uint32_t addr = b_stage + ks * kBStepK + pr * kBStepN;
        if constexpr (kGatherN) {
          ldmatrix_x4(b[pr], addr);
        } else {
          ldmatrix_x4_trans(b[pr], addr);
        }
      }
#pragma unroll
      for (int mt = 0; mt < BM / 16; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, a_stage + mt * 16 * C::kXPitch * 2 + ks * 16 * 2);
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt) mma16816<T>(acc[mt][nt], a, b[nt / 2][(nt & 1) * 2], b[nt / 2][(nt & 1) * 2 + 1]);
      }
    }
    if (i + C::kStages - 1 < count) {
      load_unit((i + C::kStages - 1) % C::kStages, pending, ids);
      pending = next;
      if (i + C::kStages < count) {
        fetch_ids(pending, ids);
        advance(next);
      }
    }
    cp_async_commit();

    const Unit done = cur;
    advance(cur);
    if (done.kt != p.k_tiles - 1 && i + 1 != count) continue;
    // The last unit of this CTA in N tile done.tile: the tile's result (whole) or its partial sum out.
    const int64_t n0 = int64_t(done.tile) * kBN;
    const bool whole = int64_t(done.tile) * p.k_tiles >= begin && int64_t(done.tile + 1) * p.k_tiles <= begin + count;
    float* out = whole ? nullptr : partial + partial_offset(blockIdx.x, done.tile == first.tile ? 0 : 1, BM * kBN);
    // Accumulator c[h * 2 + e] of an m16n8 tile is row (lane / 4) + 8h, column 2 (lane % 4) + e.
#pragma unroll
    for (int mt = 0; mt < BM / 16; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = mt * 16 + (lane >> 2) + 8 * h, col = warp * C::kWarpCols + nt * 8 + 2 * (lane & 3);
          float* v = acc[mt][nt] + 2 * h;
          if (out) {
            *reinterpret_cast<float2*>(out + r * kBN + col) = make_float2(v[0], v[1]);
          } else {
            for (int e = 0; e < 2; ++e)
              if (m0 + r < g.M && n0 + col + e < g.N) finish<T>(g, m0 + r, n0 + col + e, v[e]);
          }
          v[0] = v[1] = 0.0f;
        }
  }
  cp_async_wait<0>();
}

// The output tiles split between CTAs: y = epilogue(Σ partial sums), added in CTA order. Grid (n_tiles,
// m_tiles); tiles a single CTA covered were written by it and are skipped.
template <typename T, int BM>
__global__ void gather_gemm_reduce_kernel(const GatherGemm g, const Plan p, const float* partial) {
  constexpr int kBN = Cfg<BM, true>::kBN;
  const int64_t tile = blockIdx.x, m_tile = blockIdx.y;
  const int64_t c0 = p.owner(tile * p.k_tiles), c1 = p.owner((tile + 1) * p.k_tiles - 1);
  if (c0 == c1) return;
  for (int e = threadIdx.x; e < BM * kBN; e += blockDim.x) {
    const int64_t m = m_tile * BM + e / kBN, n = tile * kBN + e % kBN;
    if (m >= g.M || n >= g.N) continue;
    float v = 0.0f;
    for (int64_t c = c0; c <= c1; ++c) {
      const int which = p.begin(c) / p.k_tiles == tile ? 0 : 1;
      v += partial[partial_offset(c * p.m_tiles + m_tile, which, BM * kBN) + e];
    }
    finish<T>(g, m, n, v);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(tag, bm, gather_n) with the kernel's compile-time configuration for g.
template <typename F> void dispatch_config(const GatherGemm& g, Elem e, F&& f) {
  dispatch(e, [&](auto* tag) {
    auto with_bm = [&](auto gather_n) {
      const int bm = bm_for(g.M);
      if (bm == 16) {
        f(tag, std::integral_constant<int, 16>{}, gather_n);
      } else if (bm == 32) {
        f(tag, std::integral_constant<int, 32>{}, gather_n);
      } else {
        f(tag, std::integral_constant<int, 64>{}, gather_n);
      }
    };
    if (g.gather_n) {
      with_bm(std::true_type{});
    } else {
      with_bm(std::false_type{});
    }
  });
}

// The configuration's kernel with its shared memory reserved, and how many CTAs of it the GPU holds at once.
template <typename T, int BM, bool kGatherN> int resident_ctas(int num_sms) {
  using C = Cfg<BM, kGatherN>;
  auto kernel = gather_gemm_kernel<T, BM, kGatherN>;
  constexpr int bytes = C::kSmemBytes;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    fail("gather GEMM: cannot reserve {} bytes of shared memory per block", bytes);
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, C::kThreads, bytes) != cudaSuccess || per_sm < 1)
    fail("gather GEMM: the kernel does not fit on an SM");
  return per_sm * num_sms;
}

}  // namespace

size_t gather_gemm_workspace_bytes(const GatherGemm& g, int num_sms, Elem e) {
  size_t bytes = 0;
  dispatch_config(g, e, [&](auto* tag, auto bm, auto gather_n) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const Plan p = plan_for(g, resident_ctas<T, bm(), gather_n()>(num_sms));
    bytes = static_cast<size_t>(partial_offset(int64_t(p.ctas) * p.m_tiles, 0, bm() * Cfg<bm(), gather_n()>::kBN)) * sizeof(float);
  });
  return bytes;
}

void gather_gemm(const GatherGemm& g, void* workspace, size_t workspace_bytes, int num_sms, Elem e,
                 cudaStream_t stream) {
  if (g.M == 0 || g.N == 0) return;
  if (workspace_bytes < gather_gemm_workspace_bytes(g, num_sms, e))
    fail("gather GEMM: workspace of {} bytes is too small", workspace_bytes);
  dispatch_config(g, e, [&](auto* tag, auto bm, auto gather_n) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int BM = bm();
    constexpr bool kGatherN = gather_n();
    const Plan p = plan_for(g, resident_ctas<T, BM, kGatherN>(num_sms));
    // cp.async needs every 8-element chunk it copies to start 16-byte aligned.
    const bool vec_x = aligned16(g.x) && g.ldx % 8 == 0 && g.K % 8 == 0;
    const bool vec_w = aligned16(g.w) && g.ldw % 8 == 0 && (kGatherN ? g.K : g.N) % 8 == 0;
    float* partial = static_cast<float*>(workspace);
    using C = Cfg<BM, kGatherN>;
    gather_gemm_kernel<T, BM, kGatherN><<<p.ctas * p.m_tiles, C::kThreads, C::kSmemBytes, stream>>>(g, p, vec_x, vec_w,
                                                                                                   partial);
    check_launch("gather GEMM");
    if (p.ctas > 1) {
      gather_gemm_reduce_kernel<T, BM><<<dim3(p.n_tiles, p.m_tiles), 256, 0, stream>>>(g, p, partial);
      check_launch("gather GEMM split reduce");
    }
  });
}

}  // namespace polar::cuda
