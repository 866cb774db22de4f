// Paged attention (attention.h): one tensor-core flash-attention kernel body in two modes; in decode with
// split-K, the last CTA of each row group to finish combines the splits.
//
// Design.
// - Rows. Every CTA works on up to 64 "rows", each a (query token, query head) pair that shares one KV head,
//   so K/V rows read from the paged cache serve every query head of the GQA group at once. The MMA is
//   mma.sync m16n8k16 (f16/bf16 in, fp32 accumulate): a warp owns 16 rows as the M dimension.
//   * Decode (max_chunk == 1): a CTA is (token t, KV head g, head chunk, split). Its rows are the group's
//     query heads (at most 16; groups of 1..8 leave rows 8..15 as zero padding, which the tensor cores do
//     for free). All 4 warps hold the same rows and take different 16-key slices of each 64-key tile; their
//     (max, sum, acc) are merged through shared memory at the end. Tensor cores rather than CUDA cores
//     because with 8 heads per KV head the CUDA-core FMAs + shuffles would eat the issue slots an SM has
//     per byte of HBM traffic; here the math costs ~10 instructions per key and the kernel stays memory
//     bound.
//   * Prefill (max_chunk > 1): a CTA is (chunk s, tile of consecutive query tokens, KV head g, head chunk);
//     rows = token-major (token, head) pairs, 16 per warp; every warp walks all keys of the tile's range and
//     skips 16-key slices that none of its rows can see (causal / window), so no merge is needed.
// - Keys stream through a cp.async pipeline (16-byte copies, L2-only, kStages tiles of 64 keys in flight):
//   the bytes in flight live in shared memory, not registers, which is what keeps HBM busy. Rows outside
//   the CTA's key range are zero-filled (cp.async src-size 0) so masked P = 0 never meets garbage V.
//   The copies carry the 256-byte L2 prefetch hint (a key row is 256 bytes at dh 128): 0.8-1.5% faster
//   at every H100 shape from B16 up (docs/benchmarks.md, 2026-12-08).
// - Issue slots, not bytes in flight, limit a decode CTA (on an H200, one CTA per SM with 3 tiles in
//   flight moved ~47% of copy bandwidth, three CTAs per SM with 1 tile each ~86%), so address arithmetic
//   is kept out of the copy loop: a key's cache address costs a multiply-shift division by the block size
//   (BlockDiv) and 32-bit offsets inside a block's [Hkv, block_size, dh] slab, not two runtime divisions
//   and 64-bit products per 16-byte copy: 2.5-12% faster decode at every `polar bench-kernels` shape; and
//   each thread copies a run of consecutive keys, looking the block table up once per block it enters.
// - Softmax: fp32, base 2 (scores prescaled by scale*log2e), online per row; a row that has seen no key
//   yet keeps m = -inf and uses 0 as its reference so that no -inf - -inf is ever evaluated.
// - Split-K (decode only): the split plan is one of attention_plans' candidates, which the backend times
//   on the step's inputs (a cost model's pick from the grid and max_ctx, and the most splits that fit 1, 2,
//   ... CTAs per SM in one wave); each split covers a multiple of lcm(64, block_size) keys. Split CTAs
//   write fp32 partials (m, l, acc) to the workspace (empty splits write m = -inf, l = 0) and take a
//   ticket from their (token, KV head, head chunk)'s arrival counter; the CTA that draws the last ticket
//   merges the splits into out and resets the counter for the next launch.
//   No combine kernel: at batch 1 a step of llama-2-7b ran 64 attention launches a step, each combine a
//   few µs of launch gap and tail for a few KB of partials.
// Shared memory rows are padded by 16 bytes so the 8 rows an ldmatrix phase touches fall in distinct banks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

namespace {

using namespace detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 64;       // keys per pipeline stage; decode: 16 per warp
constexpr int kDecodeRows = 16;     // decode: query heads per CTA (the MMA's M; all warps share them)
constexpr int kPrefillRows = 64;    // prefill: (token, head) rows per CTA, 16 per warp
// Split-K sizing (decode, the cost model's plan, plan_splits_for): at least kMinSplitKeys keys a split; a
// CTA's fixed cost (prologue, pipeline fill, writing its partials) counted as kCtaCostKeys keys, and each
// split of a row as kSplitCostKeys more in the combine, which walks a row's splits one after another.
// Values picked from H200 timings and checked against the CTA-count rule they replaced (A/B over batch
// 1..128, contexts 512..32768, MHA and GQA, densities 1 / 0.5 / 0.3: docs/benchmarks.md).
constexpr int kMinSplitKeys = 256;
constexpr int kCtaCostKeys = 64;
constexpr int kSplitCostKeys = 32;
constexpr float kLog2e = 1.4426950408889634f;

// Compile-time sizes for head dim DH. DH = 8 is padded to 16 (the MMA's K) with zero columns.
template <int DH> struct Dims {
  static constexpr int kPadded = (DH + 15) / 16 * 16;
  static constexpr int kKSteps = kPadded / 16;  // MMA k-steps over dh (QK^T), also pairs of dh n-tiles (PV)
  static constexpr int kNTiles = kPadded / 8;   // 8-wide dh tiles of the output accumulator
  static constexpr int kPitch = kPadded + 8;    // shared-memory row pitch in elements (+16 B: no bank conflicts)
  static constexpr int kVecs = DH / 8;          // 16-byte vectors per cache row
  static constexpr int kTileBytes = 2 * kTileKeys * kPitch * 2;  // one stage: K and V tiles
  // ~72 KB of pipeline per CTA: 2 stages at dh 128 (3 CTAs per SM), deeper for small heads.
  static constexpr int kStages = std::clamp(72 * 1024 / kTileBytes, 2, 4);
  static constexpr int kMergePitch = kPadded + 8;  // fp32 merge rows; float2 stores of a half-warp hit 32 banks
  static constexpr int kMergeBytes = (2 * kWarps * kDecodeRows + kWarps * kDecodeRows * kMergePitch) * 4;
  static constexpr int kSmemBytes = std::max(kStages * kTileBytes, kMergeBytes);
};

// n / d for 0 <= n < 2^31 and a divisor d >= 1 fixed per launch, as a multiply-shift (Granlund-Montgomery):
// with l = ceil(log2 d) and m = ceil(2^(31+l) / d) < 2^32, n / d = (n * m) >> (31 + l) exactly, since
// n * (m * d - 2^(31+l)) < 2^31 * d <= 2^(31+l). d = 1 is mul = 0 (quotient n).
struct BlockDiv {
  uint32_t mul = 0;
  int shift = 0;  // l - 1
  static BlockDiv of(int d) {
    BlockDiv b;
    if (d > 1) {
      int l = 0;
      while ((int64_t(1) << l) < d) ++l;
      b.mul = static_cast<uint32_t>(((uint64_t(1) << (31 + l)) + d - 1) / d);
      b.shift = l - 1;
    }
    return b;
  }
  __device__ __forceinline__ int div(int n) const {
    return mul ? static_cast<int>(__umulhi(static_cast<uint32_t>(n), mul) >> shift) : n;
  }
};

// Two floats as a packed pair of T (first in the low half, as MMA fragments expect).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}
__device__ __forceinline__ int window_start(int pos, int window) { return window > 0 ? max(0, pos - window + 1) : 0; }

// ---- the split-K combine ----
//
// One (t, h) row: out[row] = sum_s w_s acc_s / sum_s w_s l_s with w_s = 2^(m_s - max m), by one warp: lanes
// first take one split each for the max and the weights, then stride over dh (coalesced fp32 reads) with
// the split loop unrolled so several splits' loads are in flight. Splits with l = 0 saw no key: weight 0,
// and their acc (never written) is selected away, not multiplied. ml [splits], acc [splits][DH], written by
// other CTAs of this launch: read through L2 (__ldcg), never a stale L1 line.
template <typename T, int DH>
__device__ void combine_row(const float2* ml, const float* acc_in, int splits, int lane, T* out) {
  constexpr int kPerLane = (DH + 31) / 32;
  float mx = -INFINITY;
  for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, __ldcg(&ml[s].x));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float acc[kPerLane] = {}, sum = 0.0f;
  for (int s0 = 0; s0 < splits; s0 += 32) {
    float w = 0.0f;  // lane j: weight of split s0 + j
    if (s0 + lane < splits) {
      const float2 v = __ldcg(&ml[s0 + lane]);
      w = v.y > 0.0f ? exp2f(v.x - mx) : 0.0f;
      sum += w * v.y;
    }
    const float* src = acc_in + int64_t(s0) * DH + lane;
    const int n = min(32, splits - s0);
#pragma unroll 8
    for (int j = 0; j < n; ++j) {
      const float wj = __shfl_sync(0xffffffffu, w, j);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        if (lane + 32 * k < DH) {
          const float x = __ldcg(src + j * DH + 32 * k);
          acc[k] += wj > 0.0f ? wj * x : 0.0f;
        }
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k)
    if (lane + 32 * k < DH) out[lane + 32 * k] = from_float<T>(acc[k] * inv);
}

// Called by every thread of a split CTA once its partials for rows [row0, row0 + rows) are written: the
// threadfence publishes them before the CTA's ticket is drawn (the pattern of the CUDA programming guide's
// memory-fence example), and the CTA that draws ticket splits - 1 saw every other split's partials
// published, merges the rows (a warp each) and sets the counter back to 0 for the next launch or replay.
template <typename T, int DH>
__device__ void combine_if_last(const float2* ws_ml, const float* ws_o, int splits, int64_t row0, int rows,
                                unsigned* arrival, T* out) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(arrival, 1u) == unsigned(splits - 1);
    if (last) *arrival = 0u;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int j = warp; j < rows; j += kWarps) {
    const int64_t row = row0 + j;
    combine_row<T, DH>(ws_ml + row * splits, ws_o + row * splits * DH, splits, lane, out + row * DH);
  }
}

// ---- the attention kernel ----
//
// q, out [T, H, DH]; caches [num_blocks, Hkv, block_size, DH]; all T (f16/bf16), row-major; bdiv divides
// by block_size.
// Decode grid (T, Hkv * head_chunks, splits); prefill grid (query tiles, Hkv * head_chunks, S); 128 threads;
// Dims<DH>::kSmemBytes of dynamic shared memory: kStages x {K, V} tiles of [64 keys][kPitch].
// Decode with splits > 1 writes partials: ws_ml [T*H][splits] (max in log2 units, sum) and ws_o
// [T*H][splits][DH] (unnormalised fp32 accumulator), then counts itself in arrivals[blockIdx.x * gridDim.y +
// blockIdx.y] (zero before the launch, zero after it), and the last split merges them into out
// (combine_splits). keys_per_split and arrivals are ignored when splits == 1.
// Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4*r + c holds rows r and r+8; A pairs at k = 2c(+8);
// B pairs at k = 2c(+8), n = r; C pairs at n = 2c.
template <typename T, int DH, bool kDecode>
__global__ void __launch_bounds__(kThreads, 2)
    attention_kernel(const PagedAttention a, BlockDiv bdiv, int splits, int keys_per_split, float2* ws_ml, float* ws_o,
                     unsigned* arrivals) {
  using D = Dims<DH>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_tiles = reinterpret_cast<T*>(smem);
  T* v_tiles = k_tiles + D::kStages * kTileKeys * D::kPitch;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r4 = lane >> 2, c4 = lane & 3;

  // Which KV head and which of its query heads this CTA serves.
  const int group = a.H / a.Hkv;
  const int heads_per_cta = min(group, kDecode ? kDecodeRows : kPrefillRows);
  const int head_chunks = (group + heads_per_cta - 1) / heads_per_cta;
  const int chunk = blockIdx.y % head_chunks;
  int g = blockIdx.y / head_chunks;
  if constexpr (kDecode) {  // selective decode: blockIdx.y counts the token's selected KV heads
    if (a.kv_heads) g = a.kv_heads[int64_t(blockIdx.x) * a.kv_heads_per_token + g];
    // Padding (a tensor-parallel rank's list, localize_indices): nothing to compute, and the rows of the
    // heads it stands for stay as cleared before the launch. The whole CTA leaves before any barrier.
    if (g >= a.Hkv) return;
  }
  const int head0 = g * group + chunk * heads_per_cta;
  const int heads = min(heads_per_cta, group - chunk * heads_per_cta);

  // Query tokens [tok0, tok0 + ntok) and the key range [klo, khi) that any of them can see.
  int tok0, ntok, klo, khi;
  if constexpr (kDecode) {
    tok0 = blockIdx.x;
    ntok = 1;
    const int pos = a.positions[tok0];
    klo = window_start(pos, a.window);
    khi = pos + 1;
    if (splits > 1) {
      klo = max(klo, int(blockIdx.z) * keys_per_split);
      khi = min(khi, int(blockIdx.z + 1) * keys_per_split);
      if (klo >= khi) {  // nothing of this token's context in this split: a neutral partial
        for (int j = tid; j < heads; j += kThreads)
          ws_ml[(int64_t(tok0) * a.H + head0 + j) * splits + blockIdx.z] = make_float2(-INFINITY, 0.0f);
        combine_if_last<T, DH>(ws_ml, ws_o, splits, int64_t(tok0) * a.H + head0, heads,
                               arrivals + blockIdx.x * gridDim.y + blockIdx.y, static_cast<T*>(a.out));
        return;
      }
    }
  } else {
    const int start = a.seq_starts[blockIdx.z], end = a.seq_starts[blockIdx.z + 1];
    const int tokens_per_cta = kPrefillRows / heads_per_cta;
    tok0 = start + int(blockIdx.x) * tokens_per_cta;
    if (tok0 >= end) return;
    ntok = min(tokens_per_cta, end - tok0);
    // Positions within a chunk are consecutive, so the first token has the lowest window start.
    klo = window_start(a.positions[tok0], a.window);
    khi = a.positions[tok0 + ntok - 1] + 1;
  }
  const int32_t* table = a.block_tables + int64_t(a.token_seq[tok0]) * a.max_blocks;

  // Stage loader: keys [klo + 64*tile, +64) of KV head g into buffer buf; keys >= khi become zeros.
  // Key p is row p % bs of head g's slab in block table[p / bs]: element block * (Hkv * bs * DH) +
  // (g * bs + p % bs) * DH; the second term is below Hkv * bs * DH < 2^31 (checked on the host).
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  const int block_elems = a.Hkv * a.block_size * DH, head_elems = g * a.block_size * DH;
  // Thread tid copies 16-byte column tid % kVecs of kRunKeys consecutive keys from row (tid / kVecs) *
  // kRunKeys: one block-table lookup and division per block the run enters, not per key and column, so the
  // copy loop is little more than the copies (issue slots are what limits a decode CTA). On an H100 this
  // took 0-3% off every decode shape against per-key lookups; one cp.async.bulk per key row (the copy
  // engine, 1 instruction per row) did no better (docs/benchmarks.md, 2026-12-07).
  auto load_tile = [&](int tile, int buf) {
    T* kd = k_tiles + buf * kTileKeys * D::kPitch;
    T* vd = v_tiles + buf * kTileKeys * D::kPitch;
    constexpr int kRunGroups = kThreads / D::kVecs, kRunKeys = (kTileKeys + kRunGroups - 1) / kRunGroups;
    const int grp = tid / D::kVecs, col = (tid % D::kVecs) * 8, row0 = grp * kRunKeys;
    if (grp >= kRunGroups) return;  // DH 80 / 96: the threads past whole rows copy nothing
    int p = klo + tile * kTileKeys + row0;
    int blk = bdiv.div(p), in_blk = p - blk * a.block_size;
    int64_t off = p < khi ? int64_t(table[blk]) * block_elems + (head_elems + in_blk * DH + col) : 0;
#pragma unroll
    for (int r = 0; r < kRunKeys; ++r) {
      if (kRunGroups * kRunKeys == kTileKeys || row0 + r < kTileKeys) {
        const bool ok = p < khi;
        cp_async16<256>(kd + (row0 + r) * D::kPitch + col, k_cache + (ok ? off : 0), ok);
        cp_async16<256>(vd + (row0 + r) * D::kPitch + col, v_cache + (ok ? off : 0), ok);
      }
      ++p;
      off += DH;
      if (++in_blk == a.block_size) {
        in_blk = 0;
        ++blk;
        if (p < khi) off = int64_t(table[blk]) * block_elems + (head_elems + col);
      }
    }
  };
  const int ntiles = (khi - klo + kTileKeys - 1) / kTileKeys;
#pragma unroll
  for (int s = 0; s < D::kStages - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }
  if constexpr (D::kPadded != DH) {  // zero the padding columns of all K and V rows once; cp.async never writes them
    for (int i = tid; i < 2 * D::kStages * kTileKeys; i += kThreads)
      for (int col = DH; col < D::kPadded; ++col) k_tiles[i * D::kPitch + col] = from_float<T>(0.0f);
  }

  // This thread's two rows (r4 and r4 + 8 of its warp's 16): key bounds, output offset, Q fragments.
  // Invalid rows (padding) get an empty key range and zero queries.
  int lo[2], hi[2];
  int64_t row_off[2];
  bool valid[2];
  uint32_t qa[D::kKSteps][4];
  const T* q = static_cast<const T*>(a.q);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int R = (kDecode ? 0 : warp * 16) + r4 + 8 * i;
    const int tok = tok0 + R / heads_per_cta, j = R % heads_per_cta;
    valid[i] = R / heads_per_cta < ntok && j < heads;
    row_off[i] = (int64_t(tok) * a.H + head0 + j) * DH;
    lo[i] = INT_MAX;
    hi[i] = INT_MIN;
    if (valid[i]) {
      if constexpr (kDecode) {
        lo[i] = klo;
        hi[i] = khi;
      } else {
        const int pos = a.positions[tok];
        lo[i] = window_start(pos, a.window);
        hi[i] = pos + 1;
      }
    }
  }
#pragma unroll
  for (int ks = 0; ks < D::kKSteps; ++ks) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // a0/a1: k = 2c, a2/a3: k = 2c + 8
      const int col = ks * 16 + half * 8 + 2 * c4;
#pragma unroll
      for (int i = 0; i < 2; ++i)
        qa[ks][2 * half + i] =
            valid[i] && col < DH ? __ldg(reinterpret_cast<const unsigned int*>(q + row_off[i] + col)) : 0u;
    }
  }

  float o[D::kNTiles][4];
#pragma unroll
  for (int n = 0; n < D::kNTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float score_scale = a.scale * kLog2e;

  // 16 keys starting at shared row `srow` of buffer `buf` (key index kb) against this warp's 16 rows.
  auto process = [&](int buf, int srow, int kb) {
    const T* kt = k_tiles + (buf * kTileKeys + srow) * D::kPitch;
    const T* vt = v_tiles + (buf * kTileKeys + srow) * D::kPitch;
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    // S = Q K^T: B fragments are K rows (n = key, k = dh), loaded straight by ldmatrix. Matrices:
    // (keys 0-7, dh +0), (keys 0-7, dh +8), (keys 8-15, dh +0), (keys 8-15, dh +8).
#pragma unroll
    for (int ks = 0; ks < D::kKSteps; ++ks) {
      uint32_t b[4];
      ldmatrix_x4(b, kt + ((lane & 7) + 8 * (lane >> 4)) * D::kPitch + ks * 16 + 8 * ((lane >> 3) & 1));
      mma16816<T>(s[0], qa[ks], b[0], b[1]);
      mma16816<T>(s[1], qa[ks], b[2], b[3]);
    }
    // Online softmax per row, in base 2. s[n][2i + e] is row i, key kb + 8n + 2c + e.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kb + 8 * n + 2 * c4 + e;
          float& x = s[n][2 * i + e];
          x = key >= lo[i] && key < hi[i] ? x * score_scale : -INFINITY;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[i], mx);
      const float ref = m_new == -INFINITY ? 0.0f : m_new;  // no key seen yet: keep everything at 0
      const float alpha = exp2f(m[i] - ref);
      m[i] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[n][2 * i + e];
          x = exp2f(x - ref);
          sum += x;
        }
      l[i] = l[i] * alpha + sum;  // this lane's share; the quad is summed at the end
#pragma unroll
      for (int n = 0; n < D::kNTiles; ++n) {
        o[n][2 * i] *= alpha;
        o[n][2 * i + 1] *= alpha;
      }
    }
    // O += P V: the S accumulators are already P's A-fragment layout (k = key); B fragments are V rows
    // transposed by ldmatrix.trans. Matrices: (keys 0-7, dh +0), (keys 8-15, dh +0), (keys 0-7, dh +8), ...
    const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                            pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int np = 0; np < D::kKSteps; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, vt + ((lane & 7) + 8 * ((lane >> 3) & 1)) * D::kPitch + np * 16 + 8 * (lane >> 4));
      mma16816<T>(o[2 * np], pa, b[0], b[1]);
      mma16816<T>(o[2 * np + 1], pa, b[2], b[3]);
    }
  };

  // Keys this warp's rows can see (prefill skips 16-key slices outside it; decode rows share [klo, khi)).
  int warp_lo = klo, warp_hi = khi;
  if constexpr (!kDecode) {
    warp_lo = __reduce_min_sync(0xffffffffu, min(lo[0], lo[1]));
    warp_hi = __reduce_max_sync(0xffffffffu, max(hi[0], hi[1]));
  }
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<D::kStages - 2>();
    __syncthreads();  // tile `it` is visible to all, and every warp is done with the buffer refilled below
    if (it + D::kStages - 1 < ntiles) load_tile(it + D::kStages - 1, (it + D::kStages - 1) % D::kStages);
    cp_async_commit();
    const int buf = it % D::kStages, base = klo + it * kTileKeys;
    if constexpr (kDecode) {
      if (base + 16 * warp < khi) process(buf, 16 * warp, base + 16 * warp);
    } else {
#pragma unroll
      for (int sl = 0; sl < kTileKeys / 16; ++sl) {
        const int kb = base + 16 * sl;
        if (kb < warp_hi && kb + 16 > warp_lo) process(buf, 16 * sl, kb);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }

  if constexpr (!kDecode) {
    // Each warp owns its rows: normalise and store pairs straight from the accumulators.
    T* out = static_cast<T*>(a.out);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!valid[i]) continue;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
      for (int n = 0; n < D::kNTiles; ++n)
        if (8 * n < DH)
          *reinterpret_cast<uint32_t*>(out + row_off[i] + 8 * n + 2 * c4) =
              pack2<T>(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
  } else {
    // Merge the 4 warps' partial softmaxes over the same rows through shared memory (tiles are free once
    // every warp has passed the barrier): red_m/red_l [warp][row], red_o [warp][row][kMergePitch].
    cp_async_wait<0>();
    __syncthreads();
    float* red_m = reinterpret_cast<float*>(smem);
    float* red_l = red_m + kWarps * kDecodeRows;
    float* red_o = red_l + kWarps * kDecodeRows;
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (c4 == 0) red_m[warp * kDecodeRows + r4 + 8 * i] = m[i];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = r4 + 8 * i;
      float mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w * kDecodeRows + row]);
      const float f = m[i] == -INFINITY ? 0.0f : exp2f(m[i] - mx);  // this warp's weight in the row
      if (c4 == 0) red_l[warp * kDecodeRows + row] = l[i] * f;
      float* dst = red_o + (warp * kDecodeRows + row) * D::kMergePitch + 2 * c4;
#pragma unroll
      for (int n = 0; n < D::kNTiles; ++n)
        *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[n][2 * i] * f, o[n][2 * i + 1] * f);
    }
    __syncthreads();
    T* out = static_cast<T*>(a.out);
    for (int idx = tid; idx < heads * DH; idx += kThreads) {
      const int row = idx / DH, d = idx % DH;
      float acc = 0.0f, sum = 0.0f, mx = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        acc += red_o[(w * kDecodeRows + row) * D::kMergePitch + d];
        sum += red_l[w * kDecodeRows + row];
        mx = fmaxf(mx, red_m[w * kDecodeRows + row]);
      }
      const int64_t th = int64_t(tok0) * a.H + head0 + row;  // (t, h) row of q/out
      if (splits == 1) {
        out[th * DH + d] = from_float<T>(sum > 0.0f ? acc / sum : 0.0f);
      } else {
        ws_o[(th * splits + blockIdx.z) * DH + d] = acc;
        if (d == 0) ws_ml[th * splits + blockIdx.z] = make_float2(mx, sum);
      }
    }
    if (splits > 1)
      combine_if_last<T, DH>(ws_ml, ws_o, splits, int64_t(tok0) * a.H + head0, heads,
                             arrivals + blockIdx.x * gridDim.y + blockIdx.y, out);
  }
}

// ---- host side ----

int heads_per_cta(const PagedAttention& a, bool decode) {
  return std::min(a.H / a.Hkv, decode ? kDecodeRows : kPrefillRows);
}
int head_chunks(const PagedAttention& a, bool decode) {
  const int per = heads_per_cta(a, decode);
  return (a.H / a.Hkv + per - 1) / per;
}

// KV heads a decode step launches CTAs for per token: the selected ones, or all.
int launched_kv_heads(const PagedAttention& a) { return a.kv_heads ? a.kv_heads_per_token : a.Hkv; }

// The decode split plans the context allows (each split >= kMinSplitKeys keys, whole 64-key tiles and KV
// blocks), each passed to f(plan, keys a split covers), in order of more splits: split counts up to
// max_ctx / kMinSplitKeys, rounded down (the cost model's range) or, with `round_up`, up (a last, shorter
// split allowed).
template <typename F> void for_each_split_plan(const PagedAttention& a, bool round_up, F&& f) {
  const int64_t grain = std::lcm(int64_t(kTileKeys), int64_t(a.block_size));
  const int64_t min_keys = (kMinSplitKeys + grain - 1) / grain * grain;
  const int64_t by_ctx = round_up ? (a.max_ctx + min_keys - 1) / min_keys : std::max<int64_t>(1, a.max_ctx / min_keys);
  for (int64_t s = 1; s <= by_ctx; ++s) {
    const int64_t keys = ((a.max_ctx + s - 1) / s + grain - 1) / grain * grain;
    if (s > 1 && keys < min_keys) break;
    const int64_t splits = (a.max_ctx + keys - 1) / keys;
    f(AttentionPlan{static_cast<int>(splits), splits > 1 ? static_cast<int>(keys) : 0}, keys);
  }
}

bool is_split_decode(const PagedAttention& a) {
  return a.max_chunk == 1 && a.max_ctx > 0 && a.Hkv > 0 && a.block_size > 0;
}

// Decode CTAs per split: (token, launched KV head, head chunk).
int64_t ctas_per_split(const PagedAttention& a) { return int64_t(a.T) * launched_kv_heads(a) * head_chunks(a, true); }

// Split count for a decode step on a GPU that holds `resident` decode CTAs at once. A decode step's CTAs
// carry about the same work each (equal contexts in a batch are the common case), so they run in waves of
// `resident`, and a last wave that is mostly empty costs nearly a whole one (B16 x 16 selected heads at
// 3968 keys: 5 splits = 1280 CTAs = 3.2 waves of 396 took 4% longer than 3 splits = 1.9 waves). Among the
// split counts the context allows (each split >= kMinSplitKeys keys, whole 64-key tiles and KV blocks),
// the one with the least waves x (keys per split + kCtaCostKeys) + splits x kSplitCostKeys wins, the fewer
// splits on a tie. A function of the sizes and the device only.
AttentionPlan plan_splits_for(const PagedAttention& a, int resident) {
  AttentionPlan plan;
  if (!is_split_decode(a)) return plan;
  const int64_t ctas = ctas_per_split(a);
  const int64_t waves_of = std::max(resident, 1);
  int64_t best_cost = INT64_MAX;
  for_each_split_plan(a, false, [&](const AttentionPlan& p, int64_t keys) {
    const int64_t cost = (ctas * p.splits + waves_of - 1) / waves_of * (keys + kCtaCostKeys) +
                         (p.splits > 1 ? p.splits * kSplitCostKeys : 0);
    if (cost < best_cost) {
      best_cost = cost;
      plan = p;
    }
  });
  return plan;
}

template <typename T, int DH>
void launch(const PagedAttention& a, const AttentionPlan& plan, void* workspace, unsigned* arrivals, cudaStream_t stream) {
  using D = Dims<DH>;
  const bool decode = a.max_chunk == 1;
  const int y = (decode ? launched_kv_heads(a) : a.Hkv) * head_chunks(a, decode);
  if (y > 65535) fail("attention: {} KV heads x head chunks exceed the grid's y limit", y);
  if (decode) {
    // Workspace (splits > 1 only): ws_ml [T*H][splits] float2, then ws_o [T*H][splits][DH] float.
    float2* ws_ml = plan.splits > 1 ? static_cast<float2*>(workspace) : nullptr;
    float* ws_o = plan.splits > 1 ? reinterpret_cast<float*>(ws_ml + int64_t(a.T) * a.H * plan.splits) : nullptr;
    if (a.kv_heads) {  // skipped heads: zero rows; the kernel writes only the selected ones
      const cudaError_t err = cudaMemsetAsync(a.out, 0, sizeof(T) * size_t(a.T) * a.H * DH, stream);
      if (err != cudaSuccess) fail("attention: clearing skipped heads failed: {}", cudaGetErrorString(err));
    }
    const auto kernel = attention_kernel<T, DH, true>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, D::kSmemBytes) != cudaSuccess)
      fail("attention: cannot give the decode kernel {} bytes of shared memory (dh {})", D::kSmemBytes, DH);
    kernel<<<dim3(a.T, y, plan.splits), kThreads, D::kSmemBytes, stream>>>(a, BlockDiv::of(a.block_size), plan.splits,
        plan.keys_per_split, ws_ml, ws_o, arrivals);
    check_launch("attention decode");
  } else {
    if (a.S > 65535) fail("attention: {} sequences in one prefill step exceed the grid's z limit", a.S);
    const int tokens_per_cta = kPrefillRows / heads_per_cta(a, false);
    const int tiles = (a.max_chunk + tokens_per_cta - 1) / tokens_per_cta;
    const auto kernel = attention_kernel<T, DH, false>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, D::kSmemBytes) != cudaSuccess)
      fail("attention: cannot give the prefill kernel {} bytes of shared memory (dh {})", D::kSmemBytes, DH);
    kernel<<<dim3(tiles, y, a.S), kThreads, D::kSmemBytes, stream>>>(a, BlockDiv::of(a.block_size), 1, 0,
        static_cast<float2*>(nullptr), static_cast<float*>(nullptr), static_cast<unsigned*>(nullptr));
    check_launch("attention prefill");
  }
}

// Calls f(T*, std::integral_constant<int, DH>) for the element type and head dim of `a`.
template <typename F> void dispatch(const PagedAttention& a, F&& f) {
  auto with_dh = [&](auto* tag) {
    switch (a.dh) {
      case 8: return f(tag, std::integral_constant<int, 8>{});
      case 16: return f(tag, std::integral_constant<int, 16>{});
      case 32: return f(tag, std::integral_constant<int, 32>{});
      case 64: return f(tag, std::integral_constant<int, 64>{});
      case 80: return f(tag, std::integral_constant<int, 80>{});
      case 96: return f(tag, std::integral_constant<int, 96>{});
      case 128: return f(tag, std::integral_constant<int, 128>{});
      case 256: return f(tag, std::integral_constant<int, 256>{});
      default: fail("attention: head_dim {} is not supported", a.dh);
    }
  };
  if (a.bf16) {
    with_dh(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    with_dh(static_cast<__half*>(nullptr));
  }
}

// Decode CTAs the GPU holds at once: num_sms x as many as one SM fits (shared memory, registers).
int resident_decode_ctas(const PagedAttention& a, int num_sms) {
  int per_sm = 1;
  dispatch(a, [&](auto* tag, auto dh) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int DH = decltype(dh)::value;
    per_sm = ctas_per_sm(attention_kernel<T, DH, true>, kThreads, Dims<DH>::kSmemBytes, "attention decode");
  });
  return per_sm * std::max(num_sms, 1);
}

}  // namespace

bool attention_supports_head_dim(int dh) {
  switch (dh) {
    case 8: case 16: case 32: case 64: case 80: case 96: case 128: case 256: return true;
    default: return false;
  }
}

std::vector<AttentionPlan> attention_plans(const PagedAttention& a, int num_sms) {
  if (!is_split_decode(a)) return {AttentionPlan{}};
  const int resident = resident_decode_ctas(a, num_sms), sms = std::max(num_sms, 1), per_sm = resident / sms;
  std::vector<AttentionPlan> plans = {plan_splits_for(a, resident)};
  const int64_t ctas = ctas_per_split(a);
  for (int per = 1; per <= per_sm; ++per) {
    AttentionPlan fill;
    for_each_split_plan(a, true, [&](const AttentionPlan& p, int64_t) {
      if (ctas * p.splits <= int64_t(per) * sms) fill = p;
    });
    plans.push_back(fill);
  }
  return plans;
}

size_t attention_workspace_bytes(const PagedAttention& a, const AttentionPlan& plan) {
  if (plan.splits <= 1) return 0;
  return size_t(a.T) * a.H * plan.splits * (sizeof(float2) + sizeof(float) * a.dh);
}

size_t attention_arrival_counters(const PagedAttention& a, const AttentionPlan& plan) {
  if (plan.splits <= 1) return 0;
  return size_t(a.T) * launched_kv_heads(a) * head_chunks(a, true);
}

void paged_attention(const PagedAttention& a, const AttentionPlan& plan, void* workspace, size_t workspace_bytes,
                     unsigned* arrivals, size_t num_arrivals, cudaStream_t stream) {
  if (a.T == 0) return;
  if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0)
    fail("attention: {} query heads cannot share {} KV heads", a.H, a.Hkv);
  if (!attention_supports_head_dim(a.dh)) fail("attention: head_dim {} is not supported", a.dh);
  if (a.block_size <= 0 || a.max_blocks <= 0) fail("attention: block size {} / {} blocks per sequence", a.block_size, a.max_blocks);
  if (int64_t(a.Hkv) * a.block_size * a.dh >= (int64_t(1) << 31))
    fail("attention: a KV block of {} heads x {} tokens x {} exceeds 2^31 elements", a.Hkv, a.block_size, a.dh);
  if (a.max_ctx <= 0 || a.max_chunk <= 0) fail("attention: max_ctx {} and max_chunk {} must be positive", a.max_ctx, a.max_chunk);
  if (a.max_chunk > 1 && a.S <= 0) fail("attention: prefill step with {} sequences", a.S);
  if (plan.splits < 1 || (plan.splits > 1 && (a.max_chunk > 1 || plan.keys_per_split <= 0 ||
                                              plan.keys_per_split % std::lcm(kTileKeys, a.block_size) != 0 ||
                                              int64_t(plan.splits) * plan.keys_per_split < a.max_ctx)))
    fail("attention: a plan of {} splits of {} keys does not cover a context of {} (chunks of up to {})", plan.splits,
         plan.keys_per_split, a.max_ctx, a.max_chunk);
  const size_t need = attention_workspace_bytes(a, plan);
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    fail("attention: workspace of {} bytes, {} needed for {} splits", workspace_bytes, need, plan.splits);
  const size_t need_arrivals = attention_arrival_counters(a, plan);
  if (num_arrivals < need_arrivals || (need_arrivals > 0 && arrivals == nullptr))
    fail("attention: {} arrival counters, {} needed for {} splits", num_arrivals, need_arrivals, plan.splits);
  dispatch(a, [&](auto* tag, auto dh) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch<T, decltype(dh)::value>(a, plan, workspace, arrivals, stream);
  });
}

}  // namespace polar::cuda
