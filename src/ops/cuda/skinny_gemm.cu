// Skinny GEMM (skinny_gemm.h): y[m, n] = x[m, k] · wᵀ for m <= 16, the weight as the MMA's A operand.
//
// Design.
// - Tiles. A CTA owns RT tiles of 16 output columns (weight rows [row0, row0 + 16·RT)) and all m rows of x
//   (MT tiles of 8: m <= 8 or m <= 16). mma.sync m16n8k16 computes yᵀ[16 cols][8 rows] += w[16][16] · xᵀ:
//   A = 16 weight rows, B = 8 rows of x. Its 4 warps and the cluster's S CTAs split k into 4·S contiguous
//   ranges, one per warp; each warp walks its range 32 k at a time, kUnroll steps per iteration with all
//   their loads issued first, so ~kUnroll·(2·RT + MT) 16-byte loads per lane are in flight.
// - Loads straight into fragments, no shared memory. The order of k inside a dot product is free, so the
//   fragment's logical k positions are mapped onto physical ones that make each lane's loads 16 contiguous
//   bytes: in a 32-wide k step, lane (r4 = lane / 4, c4 = lane % 4) loads k [8·c4, 8·c4 + 8) of weight rows
//   r4 and r4 + 8 and of x row r4, and MMA half s (0, 1) takes their 32-bit words 2s, 2s + 1 as the
//   fragment's (k = 2·c4, 2·c4 + 1) and (k = 2·c4 + 8, 2·c4 + 9) pairs, for A and B alike (PTX ISA fragment
//   layouts: A pairs a0a1/a2a3 rows r4/r4+8 at k 2c4, a4a5/a6a7 at k 2c4+8; B pairs b0b1 at k 2c4, b2b3 at
//   k 2c4+8, column r4). The weight is streamed past L1 (ld.global.nc.L1::no_allocate); x, read by every
//   CTA, stays in L1/L2.
// - Programmatic dependent launch (device_util.cuh): the first weight loads are issued before waiting for
//   the kernel before, which writes x.
// - Reduction in fixed order: the 4 warps' accumulators are summed in shared memory (warp 0 first), then
//   CTA rank 0 of the cluster adds the other ranks' sums from their shared memory (distributed shared
//   memory) in rank order and applies the epilogue; a final cluster barrier keeps every CTA's shared memory
//   alive until rank 0 has read it.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/error.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/skinny_gemm.h"

namespace polar::cuda {

namespace {

using namespace detail;
namespace cg = cooperative_groups;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStepK = 32;  // k per warp step: 4 lanes x 8 elements of each row
constexpr int kUnroll = 4;  // steps whose loads are issued together

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// x [m, k], w [n, k], bias [n], y [m, n] row-major, all T; grid (ceil(n / (16·RT)) · S) CTAs of kThreads in
// clusters of S along x; no dynamic shared memory.
template <typename T, int MT, int RT> __global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const SkinnyGemm g) {
  constexpr int kValues = RT * MT * 4 * 32;  // one warp's accumulators: [RT][MT][4][lane]
  __shared__ float warp_sums[kWarps][kValues];
  __shared__ float cta_sum[kValues];
  const cg::cluster_group cluster = cg::this_cluster();
  const int S = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, r4 = lane >> 2, c4 = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x / S) * (16 * RT);

  const int64_t steps = (g.k + kStepK - 1) / kStepK;
  const int part = rank * kWarps + warp, parts = S * kWarps;
  const int64_t s_begin = steps * part / parts, s_end = steps * (part + 1) / parts;

  const T* w_rows[RT][2];
  bool w_ok[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t row = row0 + 16 * rt + r4 + 8 * i;
      w_ok[rt][i] = row < g.n;
      w_rows[rt][i] = static_cast<const T*>(g.w) + (w_ok[rt][i] ? row : 0) * g.k + 8 * c4;
    }
  const T* x_rows[MT];
  bool x_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r = r4 + 8 * mt;
    x_ok[mt] = r < g.m;
    x_rows[mt] = static_cast<const T*>(g.x) + (x_ok[mt] ? r : 0) * g.k + 8 * c4;
  }

  // Loads of weight steps [s0, s0 + kUnroll) and of the same steps of x; steps past s_end read zeros.
  uint4 wv[kUnroll][RT][2], xv[kUnroll][MT];
  const uint4 zero = make_uint4(0, 0, 0, 0);
  auto step_ok = [&](int64_t s) { return s < s_end && s * kStepK + 8 * c4 < g.k; };  // k % 8 == 0: all 8 or none
  auto load_w = [&](int64_t s0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool ok = step_ok(s0 + u);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wv[u][rt][i] = ok && w_ok[rt][i] ? load_streaming(w_rows[rt][i] + (s0 + u) * kStepK) : zero;
    }
  };
  auto load_x = [&](int64_t s0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool ok = step_ok(s0 + u);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        xv[u][mt] = ok && x_ok[mt] ? __ldg(reinterpret_cast<const uint4*>(x_rows[mt] + (s0 + u) * kStepK)) : zero;
    }
  };

  // The first weight loads go out before waiting for the kernel that writes x (programmatic dependent
  // launch): no step writes weights.
  load_w(s_begin);
  pdl_enter();
  float acc[RT][MT][4] = {};
  for (int64_t s0 = s_begin; s0 < s_end;) {
    load_x(s0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          const uint4 &lo = wv[u][rt][0], &hi = wv[u][rt][1];
          const uint32_t a[4] = {h ? lo.z : lo.x, h ? hi.z : hi.x, h ? lo.w : lo.y, h ? hi.w : hi.y};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& b = xv[u][mt];
            mma16816<T>(acc[rt][mt], a, h ? b.z : b.x, h ? b.w : b.y);
          }
        }
    s0 += kUnroll;
    if (s0 < s_end) load_w(s0);
  }

  // Warps' sums, then the cluster's, each in a fixed order.
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) warp_sums[warp][((rt * MT + mt) * 4 + j) * 32 + lane] = acc[rt][mt][j];
  __syncthreads();
  for (int v = tid; v < kValues; v += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w][v];
    cta_sum[v] = s;
  }
  cluster.sync();  // every rank's cta_sum is complete
  if (rank == 0) {
    T* y = static_cast<T*>(g.y);
    const T* bias = static_cast<const T*>(g.bias);
    for (int v = tid; v < kValues; v += kThreads) {
      float s = 0.0f;
      for (int r = 0; r < S; ++r) s += cluster.map_shared_rank(cta_sum, r)[v];
      // v = ((rt·MT + mt)·4 + j)·32 + lane': accumulator j of lane' is column r4' + 8·(j / 2) of the tile,
      // row 8·mt + 2·c4' + j % 2 of x.
      const int l = v & 31, j = (v >> 5) & 3, tile = v >> 7, rt = tile / MT, mt = tile % MT;
      const int64_t col = row0 + 16 * rt + (l >> 2) + 8 * (j >> 1);
      const int64_t row = 8 * mt + 2 * (l & 3) + (j & 1);
      if (col >= g.n || row >= g.m) continue;
      if (bias) s += to_float(bias[col]);
      if (g.relu) s = fmaxf(s, 0.0f);
      T& out = y[row * g.n + col];
      if (g.accumulate) s += to_float(out);
      out = from_float<T>(s);
    }
  }
  cluster.sync();  // rank 0 has read every rank's shared memory
}

template <typename T, int MT, int RT> void launch(const SkinnyGemm& g, int cluster, cudaStream_t stream) {
  const int64_t tiles = (g.n + 16 * RT - 1) / (16 * RT);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles * cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2] = {pdl_attribute(), {}};
  attrs[1].id = cudaLaunchAttributeClusterDimension;
  attrs[1].val.clusterDim.x = cluster;
  attrs[1].val.clusterDim.y = 1;
  attrs[1].val.clusterDim.z = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = 2;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, skinny_gemm_kernel<T, MT, RT>, g);
  if (err != cudaSuccess) fail("CUDA kernel skinny GEMM failed to launch: {}", cudaGetErrorString(err));
}

}  // namespace

bool skinny_gemm_supports(const SkinnyGemm& g) {
  const auto a16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return g.m >= 1 && g.m <= kSkinnyMaxRows && g.k > 0 && g.k % 8 == 0 && g.n > 0 && g.n < (int64_t(1) << 31) &&
         a16(g.x) && a16(g.w);
}

void skinny_gemm(const SkinnyGemm& g, int variant, Elem e, cudaStream_t stream) {
  check(skinny_gemm_supports(g), "skinny GEMM: m={} n={} k={} or the operands' alignment is not supported", g.m,
        g.n, g.k);
  check(variant >= 0 && variant < kSkinnyVariants, "skinny GEMM: no variant {}", variant);
  const int cluster = 1 << (variant % 4);
  const bool two_col_tiles = variant >= 4;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (g.m <= 8) {
      two_col_tiles ? launch<T, 1, 2>(g, cluster, stream) : launch<T, 1, 1>(g, cluster, stream);
    } else {
      two_col_tiles ? launch<T, 2, 2>(g, cluster, stream) : launch<T, 2, 1>(g, cluster, stream);
    }
  });
}

}  // namespace polar::cuda
