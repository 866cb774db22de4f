// The gather-GEMM kernel (see gather_gemm.h for the operation and layouts).
//
// A decode MLP is memory-bound: M (the batch) is small and each selected weight byte is used M times, so
// the kernel is built to stream the selected rows once at full bandwidth with as few instructions per
// byte as the tensor cores allow:
//   * The product is computed transposed, yᵀ = B·xᵀ, as warpgroup MMAs (wgmma m64nBMk16): the selected
//     weights are the 64-row A operand (each warp of a warpgroup loads its 16 rows from shared memory
//     with ldmatrix), x's BM rows the N operand, read by the tensor cores straight from shared memory. One
//     instruction covers a warpgroup's 64 outputs for all BM rows of x, where mma.sync needed BM/8 of them
//     per warp plus a load of x's fragments per warp.
//   * CTA tile [BM rows of x, kBN = 64·WG outputs], WG warpgroups (BM 16/32/64 by the batch with one
//     warpgroup; 128/256 with two, sharing each x stage between twice the weight rows, which halves x's
//     L2 traffic per weight byte where it rivals the weights').
//   * K is walked in kBK-wide tiles (128 at BM <= 64, else 64) through a 3- or 4-stage cp.async pipeline:
//     a stage holds x[m0:m0+BM, k:k+kBK] in wgmma's 128-byte swizzle layout and the kBK-deep slice of B,
//     copied from the selected weight rows (a neuron's row is contiguous, so every copy is a full 16-byte
//     vector). Up stores B as [n][k] (its rows are neurons) and loads A fragments with ldmatrix; down
//     stores it as [k][n] and uses ldmatrix.trans. The neuron ids of a stage are fetched one step before
//     its copies are issued.
//   * Work is split stream-K style: the (N tile, k-tile) units of one row of M tiles are divided evenly
//     over as many CTAs as fit on the GPU at once, so no wave runs part-empty (a decode GEMM is only one
//     or two waves of tiles, and a half-empty last wave costs as much as a full one). A CTA walks its
//     units in order through one continuous pipeline and stores each finished tile in fp32 to the
//     workspace: a tile it covered whole to the tile's slot, a tile shared with neighbours as a partial sum
//     (at most two per CTA: its first and its last tile). A second kernel adds the partial sums in CTA
//     order (deterministic) and applies the epilogue (bias, ReLU, residual) to every tile, with y's rows
//     written coalesced. (An epilogue in the GEMM kernel itself, unrolled over the accumulators, cost up
//     to 120 registers a thread and spilled at BM 256; the fp32 round trip costs M·N·8 bytes per slot
//     written and read, under 1% of the weights' bytes at batch 16 and 11% at 256 — twice that where
//     most tiles are split — mostly in L2.) CTAs of the M tiles of one unit range are adjacent in launch
//     order, so at batch > BM a weight tile is read from HBM once and from L2 by its siblings.
// Weight rows in shared memory are padded by 16 bytes so the 8 rows of one ldmatrix phase fall in
// distinct banks; x's stages are swizzled instead (wgmma reads them whole).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/gather_gemm.h"

namespace polar::cuda {

namespace {

using namespace detail;

// Compile-time shape of one configuration: BM rows of x, up (gather_n) or down, WG warpgroups (64 weight rows
// each: kBN = 64·WG outputs a tile), K stages kBK deep, kStages of them in the cp.async pipeline.
template <int BM_, bool kGatherN_, int WG, int BK, int Stages> struct Cfg {
  static constexpr int BM = BM_;
  static constexpr bool kGatherN = kGatherN_;
  static constexpr int kWG = WG;
  static constexpr int kBN = 64 * kWG;
  static constexpr int kThreads = 128 * kWG;
  static constexpr int kBK = BK;
  static constexpr int kStages = Stages;
  // x's stage: kBK / 64 column blocks [BM][64], each in the 128-byte swizzle layout.
  static constexpr int kXStageBytes = BM * kBK * 2;
  // B in shared memory: up [kBN n][kBK k], down [kBK k][kBN n].
  static constexpr int kWRows = kGatherN ? kBN : kBK, kWCols = kGatherN ? kBK : kBN, kWPitch = kWCols + 8;
  static constexpr int kXChunks = BM * kBK / 8 / kThreads;  // 16-byte copies per thread per stage
  static constexpr int kWChunks = kWRows * kWCols / 8 / kThreads;
  // + 1 KB to align the swizzled x stages to 1024 bytes.
  static constexpr int kSmemBytes = kStages * (kXStageBytes + kWRows * kWPitch * 2) + 1024;
  static_assert(kXChunks >= 1 && BM * kBK % (8 * kThreads) == 0 && kXStageBytes % 1024 == 0);
};

// The configuration per BM: one warpgroup and 128-deep K stages (3 in flight) up to BM 32, where shared memory
// then holds 2-3 CTAs an SM, each selected row is read 256 bytes at a time and a unit's fixed costs are spread
// over twice the bytes; at BM 64 two warpgroups with the same stages, which halves x's L2 traffic per weight
// byte (the B64 gather rows ran 2-8% faster on an H100 than with one warpgroup, docs/benchmarks.md); two
// warpgroups and 64-deep stages (4 in flight, one CTA an SM) at BM 128 and 256, sharing each x stage between
// twice the weight rows.
template <int BM, bool G>
using ConfigFor = std::conditional_t<(BM <= 32), Cfg<BM, G, 1, 128, 3>,
                                     std::conditional_t<(BM == 64), Cfg<BM, G, 2, 128, 3>, Cfg<BM, G, 2, 64, 4>>>;

// Units per CTA at least: fewer, and a CTA spends more time filling its pipeline than computing.
constexpr int kMinUnitsPerCta = 4;

// Stream-K partition: CTA c of an M-tile row owns units [c·W/G, (c+1)·W/G) of W = n_tiles · k_tiles, unit
// u being k-tile u % k_tiles of N tile u / k_tiles.
struct Plan {
  int bm = 64, bn = 64;
  int m_tiles = 1, n_tiles = 1, k_tiles = 1;
  int64_t units = 1;  // W
  int ctas = 1;       // G, per M-tile row
  __host__ __device__ int64_t begin(int64_t c) const { return c * units / ctas; }
  // The CTA whose range holds unit u: the largest c with begin(c) <= u.
  __host__ __device__ int64_t owner(int64_t u) const { return ((u + 1) * ctas + units - 1) / units - 1; }
};

int bm_for(int64_t M) {
  int bm = 16;
  while (bm < M && bm < 256) bm *= 2;
  return bm;
}

Plan plan_for(const GatherGemm& g, int bn, int bk, int resident_ctas) {
  Plan p;
  p.bm = bm_for(g.M);
  p.bn = bn;
  p.m_tiles = static_cast<int>((g.M + p.bm - 1) / p.bm);
  p.n_tiles = static_cast<int>((g.N + bn - 1) / bn);
  p.k_tiles = static_cast<int>(std::max<int64_t>(1, (g.K + bk - 1) / bk));
  p.units = int64_t(p.n_tiles) * p.k_tiles;
  p.ctas = static_cast<int>(
      std::clamp<int64_t>(std::min<int64_t>(resident_ctas / p.m_tiles, p.units / kMinUnitsPerCta), 1, p.units));
  return p;
}

// y[m, n] = epilogue(v): + bias (up: bias[idx[n]], down: bias[n]; optional), ReLU (optional), + y
// (accumulate). The one place the output is written.
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

// The workspace: fp32 tiles [bm][bn], row-major like y (a warp's store covers 32 contiguous bytes in each of
// 4 rows, whole sectors; the epilogue kernel then reads and writes rows coalesced). First the
// tiles covered whole by one CTA, [m_tiles][n_tiles], then the partial sums of each CTA (blockIdx.x) for its
// first (which 0) and last (which 1) tile.
__host__ __device__ inline int64_t whole_offset(const Plan& p, int64_t m_tile, int64_t tile) {
  return (m_tile * p.n_tiles + tile) * p.bm * p.bn;
}
__host__ __device__ inline int64_t partial_offset(const Plan& p, int64_t cta, int which) {
  return (int64_t(p.m_tiles) * p.n_tiles + cta * 2 + which) * p.bm * p.bn;
}
__host__ __device__ inline int64_t workspace_floats(const Plan& p) {
  return partial_offset(p, int64_t(p.ctas) * p.m_tiles, 0);
}

template <typename T, typename C>
__global__ void __launch_bounds__(C::kThreads)
    gather_gemm_kernel(const GatherGemm g, const Plan p, bool vec_x, bool vec_w, float* workspace) {
  constexpr int BM = C::BM;
  constexpr bool kGatherN = C::kGatherN;
  constexpr int kBN = C::kBN, kBK = C::kBK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  T* xs = reinterpret_cast<T*>(smem);  // [kStages][kBK / 64][BM][64], 128-byte swizzle
  T* ws = reinterpret_cast<T*>(smem + C::kStages * C::kXStageBytes);  // [kStages][kWRows][kWPitch]
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

  // Thread tid copies the 8-element chunk x_chunk / w_col of rows x_row0 + i·x_step (x) and w_row0 +
  // i·w_step (B) of each stage. What does not change from unit to unit is computed here, once: the x rows'
  // addresses and the shared-memory addresses of the thread's chunks (a unit's copies are then a few adds
  // each; decode GEMMs are short enough that the copy loop's arithmetic shows). x_step is a multiple of 8,
  // so all of a thread's x rows share one swizzle (row % 8); x_at is the chunk's offset in the stage.
  constexpr int kXRowChunks = kBK / 8, x_step = C::kThreads / kXRowChunks, w_step = C::kThreads / (C::kWCols / 8);
  static_assert(x_step % 8 == 0);
  const int x_chunk = tid % kXRowChunks, x_row0 = tid / kXRowChunks, x_col = x_chunk * 8;
  const int x_at = x_chunk / 8 * BM * 64 + x_row0 * 64 + ((x_chunk % 8) ^ (x_row0 & 7)) * 8;
  const int w_col = tid % (C::kWCols / 8) * 8, w_row0 = tid / (C::kWCols / 8);
  const T* x_rows[C::kXChunks];  // null past M
  for (int i = 0; i < C::kXChunks; ++i) {
    const int64_t m = m0 + x_row0 + i * x_step;
    x_rows[i] = m < g.M ? x + m * g.ldx + x_col : nullptr;
  }
  constexpr uint32_t kXRowBytes = x_step * 64 * 2;
  constexpr uint32_t kWStageBytes = C::kWRows * C::kWPitch * 2, kWRowBytes = w_step * C::kWPitch * 2;
  const uint32_t x_dst0 = smem_u32(xs + x_at), w_dst0 = smem_u32(ws + w_row0 * C::kWPitch + w_col);
  const int K = static_cast<int>(g.K), N = static_cast<int>(g.N), D = static_cast<int>(g.D);
  const int ldw = static_cast<int>(g.ldw);
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
        cp_async16(x_dst0 + stage * C::kXStageBytes + i * kXRowBytes, ok ? x_rows[i] + k0 : x, ok);
      } else {
        T* dst = xs + stage * BM * kBK + x_at + i * x_step * 64;
        for (int e = 0; e < 8; ++e) dst[e] = x_rows[i] && k0 + x_col + e < K ? x_rows[i][k0 + e] : from_float<T>(0.0f);
      }
    }
    // Offset of the thread's chunk along the weight rows, and how many elements from there lie inside B.
    const int along = (kGatherN ? k0 : n0) + w_col, left = (kGatherN ? K : N) - along;
    for (int i = 0; i < C::kWChunks; ++i) {
      // Null when the row lies outside B, or its id is bad (then the error flag is raised).
      const bool valid = static_cast<uint32_t>(ids[i]) < static_cast<uint32_t>(D);
      const T* src = valid ? w + int64_t(ids[i]) * ldw + along : nullptr;
      if (!valid && (kGatherN ? n0 : k0) + w_row0 + i * w_step < (kGatherN ? N : K)) atomicOr(g.error_flag, kErrorNeuronOutOfRange);
      if (vec_w) {
        const bool ok = valid && left > 0;
        cp_async16(w_dst0 + stage * kWStageBytes + i * kWRowBytes, ok ? src : w, ok);
      } else {
        T* dst = ws + (stage * C::kWRows + w_row0 + i * w_step) * C::kWPitch + w_col;
        for (int e = 0; e < 8; ++e) dst[e] = src && e < left ? src[e] : from_float<T>(0.0f);
      }
    }
  };
  // Shared-window address of this lane's ldmatrix row of the warp's A fragment (B rows [16·warp, +16) as
  // the MMA's M) in stage 0, k-step 0. Up: B is [n][k], fragment matrices (n 0-7 | 8-15) x (k 0-7 | 8-15);
  // down: B is [k][n], the same matrices read transposed.
  const uint32_t a_frag0 =
      kGatherN ? smem_u32(ws + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * C::kWPitch + (lane >> 4) * 8)
               : smem_u32(ws + ((lane & 7) + (lane >> 4) * 8) * C::kWPitch + warp * 16 + ((lane >> 3) & 1) * 8);
  constexpr uint32_t kAStepK = kGatherN ? 16 * 2 : 16 * C::kWPitch * 2;  // a k-step of 16
  const uint64_t x_desc0 = smem_desc_k128(smem_u32(xs));

  // yᵀ rows [16·warp, +16) x the BM rows of x (see wgmma_rs). Never assigned in the loop: a tile's first
  // MMA overwrites instead of adding (`fresh`), so the accumulators stay where the wgmmas keep them.
  float acc[BM / 2];
  uint32_t fresh = 1;
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
    fence_proxy_async();  // the stage's x, written through cp.async, is read by wgmma
    __syncthreads();
    const int stage = i % C::kStages;
    const uint32_t a_stage = a_frag0 + stage * kWStageBytes;
    uint32_t a[kBK / 16][4];
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      if constexpr (kGatherN) {
        ldmatrix_x4(a[ks], a_stage + ks * kAStepK);
      } else {
        ldmatrix_x4_trans(a[ks], a_stage + ks * kAStepK);
      }
    }
    wgmma_fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      // k-step ks: 32-byte slice ks % 4 of column block ks / 4.
      const uint32_t at = stage * C::kXStageBytes + ks / 4 * BM * 128 + ks % 4 * 32;
      wgmma_rs<T, BM>(acc, a[ks], x_desc0 + (at >> 4), ks > 0 || !fresh);
    }
    wgmma_commit();
    // The stage refilled here was read by the previous iteration's MMAs, complete before this barrier.
    if (i + C::kStages - 1 < count) {
      load_unit((i + C::kStages - 1) % C::kStages, pending, ids);
      pending = next;
      if (i + C::kStages < count) {
        fetch_ids(pending, ids);
        advance(next);
      }
    }
    cp_async_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc);

    const Unit done = cur;
    advance(cur);
    fresh = done.kt == p.k_tiles - 1;
    if (!fresh && i + 1 != count) continue;
    // The last unit of this CTA in N tile done.tile: the tile (whole) or its partial sum out, in fp32.
    const bool whole = int64_t(done.tile) * p.k_tiles >= begin && int64_t(done.tile + 1) * p.k_tiles <= begin + count;
    float* out = workspace + (whole ? whole_offset(p, m_tile, done.tile)
                                    : partial_offset(p, blockIdx.x, done.tile == first.tile ? 0 : 1));
    // acc[4j + 2h + e] is output n = 16·warp + lane / 4 + 8h of x row m = 8j + 2 (lane % 4) + e.
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = warp * 16 + (lane >> 2) + 8 * h, m = j * 8 + 2 * (lane & 3);
        out[m * kBN + n] = acc[4 * j + 2 * h];
        out[(m + 1) * kBN + n] = acc[4 * j + 2 * h + 1];
      }
  }
  cp_async_wait<0>();
}

// y = epilogue(tile), a tile's sum being its whole slot or its partial sums added in CTA order. Grid
// (n_tiles, m_tiles, bm / kFinishRows): each CTA finishes kFinishRows rows of a tile, BN·kFinishRows /
// kFinishThreads elements a thread, reading the workspace and writing y along rows (coalesced). BN is the
// tile width at compile time, so the per-element index arithmetic is shifts and masks, not divisions.
constexpr int kFinishRows = 16, kFinishThreads = 256;

template <typename T, int BN>
__global__ void __launch_bounds__(kFinishThreads) gather_gemm_finish_kernel(const GatherGemm g, const Plan p,
                                                                            const float* workspace) {
  constexpr int kPerThread = kFinishRows * BN / kFinishThreads;
  const int64_t tile = blockIdx.x, m_tile = blockIdx.y;
  const int64_t c0 = p.owner(tile * p.k_tiles), c1 = p.owner((tile + 1) * p.k_tiles - 1);
  const int rows_at = blockIdx.z * kFinishRows * BN;  // this CTA's rows within a tile slot
  float v[kPerThread] = {};
  // Slot by slot (a few 64-bit divisions per CTA, not per element), in CTA order.
  for (int64_t c = c0; c <= c1; ++c) {
    const float* slot = workspace + rows_at +
                        (c0 == c1 ? whole_offset(p, m_tile, tile)
                                  : partial_offset(p, c * p.m_tiles + m_tile, p.begin(c) / p.k_tiles == tile ? 0 : 1));
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) v[r] += slot[threadIdx.x + r * kFinishThreads];
  }
  const int64_t m0 = m_tile * p.bm + blockIdx.z * kFinishRows, n0 = tile * BN;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int e = threadIdx.x + r * kFinishThreads;
    const int64_t m = m0 + e / BN, n = n0 + e % BN;
    if (m < g.M && n < g.N) finish<T>(g, m, n, v[r]);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(tag, cfg) with the kernel's compile-time configuration for g (cfg: a null Cfg pointer).
template <typename F> void dispatch_config(const GatherGemm& g, Elem e, F&& f) {
  dispatch(e, [&](auto* tag) {
    auto pick = [&](auto bm, auto gather_n) {
      f(tag, static_cast<ConfigFor<bm(), gather_n()>*>(nullptr));
    };
    auto with_bm = [&](auto gather_n) {
      switch (bm_for(g.M)) {
        case 16: return pick(std::integral_constant<int, 16>{}, gather_n);
        case 32: return pick(std::integral_constant<int, 32>{}, gather_n);
        case 64: return pick(std::integral_constant<int, 64>{}, gather_n);
        case 128: return pick(std::integral_constant<int, 128>{}, gather_n);
        default: return pick(std::integral_constant<int, 256>{}, gather_n);
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
template <typename T, typename C> int resident_ctas(int num_sms) {
  return ctas_per_sm(gather_gemm_kernel<T, C>, C::kThreads, C::kSmemBytes, "gather GEMM") * num_sms;
}

template <typename T, typename C> Plan plan_of(const GatherGemm& g, int num_sms) {
  return plan_for(g, C::kBN, C::kBK, resident_ctas<T, C>(num_sms));
}

}  // namespace

size_t gather_gemm_workspace_bytes(const GatherGemm& g, int num_sms, Elem e) {
  size_t bytes = 0;
  dispatch_config(g, e, [&](auto* tag, auto* cfg) {
    const Plan p = plan_of<std::remove_pointer_t<decltype(tag)>, std::remove_pointer_t<decltype(cfg)>>(g, num_sms);
    bytes = static_cast<size_t>(workspace_floats(p)) * sizeof(float);
  });
  return bytes;
}

void gather_gemm(const GatherGemm& g, void* workspace, size_t workspace_bytes, int num_sms, Elem e,
                 cudaStream_t stream) {
  if (g.M == 0 || g.N == 0) return;
  if (workspace_bytes < gather_gemm_workspace_bytes(g, num_sms, e))
    fail("gather GEMM: workspace of {} bytes is too small", workspace_bytes);
  dispatch_config(g, e, [&](auto* tag, auto* cfg) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using C = std::remove_pointer_t<decltype(cfg)>;
    const Plan p = plan_of<T, C>(g, num_sms);
    // cp.async needs every 8-element chunk it copies to start 16-byte aligned.
    const bool vec_x = aligned16(g.x) && g.ldx % 8 == 0 && g.K % 8 == 0;
    const bool vec_w = aligned16(g.w) && g.ldw % 8 == 0 && (C::kGatherN ? g.K : g.N) % 8 == 0;
    float* tiles = static_cast<float*>(workspace);
    gather_gemm_kernel<T, C><<<p.ctas * p.m_tiles, C::kThreads, C::kSmemBytes, stream>>>(g, p, vec_x, vec_w, tiles);
    check_launch("gather GEMM");
    gather_gemm_finish_kernel<T, C::kBN>
        <<<dim3(p.n_tiles, p.m_tiles, C::BM / kFinishRows), kFinishThreads, 0, stream>>>(g, p, tiles);
    check_launch("gather GEMM epilogue");
  });
}

}  // namespace polar::cuda
