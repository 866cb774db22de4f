// RoPE fused with the KV-cache append (rope.h): one pass over the fused q/k/v projection's output.
#include "ops/cuda/rope.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

// ---- RoPE and the KV append: a CTA per (token, group of head rows), threads over (row, pair) ----

// Element offset of KV head h's row for cache slot `slot` (= block * block_size + offset) in a cache
// [num_blocks, Hkv, block_size, dh] (head-major blocks, see ops/backend.h).
__device__ __forceinline__ int64_t cache_row(int64_t slot, int64_t h, int64_t Hkv, int64_t block_size, int64_t dh) {
  return ((slot / block_size * Hkv + h) * block_size + slot % block_size) * dh;
}

// qkv [T, H + 2·Hkv, dh] -> q [T, H, dh] and the cache rows of each token's slot. Grid (T, ceil((H + 2·Hkv) /
// blockDim.y)): threadIdx.y picks one of a token's head rows, threadIdx.x walks its (i, i + dh/2) pairs; each
// thread reads qkv once and writes q or the cache row, rotating query and key pairs when inv_freq is given.
// Spreading a token's rows over CTAs matters at small T: one CTA per token left a decode step of batch 1 on one
// SM for ~10 µs a layer.
template <typename T>
__global__ void rope_kv_append_kernel(const T* qkv, T* q, int64_t H, const int32_t* positions, const float* inv_freq,
                                      const int32_t* slots, int64_t Hkv, int64_t dh, T* k_cache, T* v_cache,
                                      int64_t num_slots, int64_t block_size, int32_t* error_flag) {
  const int64_t t = blockIdx.x, half = dh / 2, width = H + 2 * Hkv;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t slot = slots[t];
  const bool slot_ok = slot >= 0 && slot < num_slots;
  if (!slot_ok && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) atomicOr(error_flag, kErrorSlotOutOfRange);
  if (r >= width || (r >= H && !slot_ok)) return;
  T* dst;
  if (r < H) {
    dst = q + (t * H + r) * dh;
  } else {
    const int64_t kv = r - H;
    dst = (kv < Hkv ? k_cache : v_cache) + cache_row(slot, kv % Hkv, Hkv, block_size, dh);
  }
  const T* src = qkv + (t * width + r) * dh;
  const bool rotate = inv_freq && r < H + Hkv;
  const float pos = static_cast<float>(positions[t]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    float a = to_float(src[i]), b = to_float(src[i + half]);
    if (rotate) {
      float s, c;
      sincosf(pos * inv_freq[i], &s, &c);  // fp32 angle, as transformers computes it
      const float ra = a * c - b * s, rb = b * c + a * s;
      a = ra, b = rb;
    }
    dst[i] = from_float<T>(a);
    dst[i + half] = from_float<T>(b);
  }
}

}  // namespace

void rope_kv_append(const void* qkv, void* q, int64_t H, const int32_t* positions, const float* inv_freq,
                    const int32_t* slots, int64_t T, int64_t Hkv, int64_t dh, void* k_cache, void* v_cache,
                    int64_t num_slots, int64_t block_size, int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (T == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    // 256 threads a CTA: dh/2 (at most 256) pairs across, as many head rows as fit down.
    const unsigned pairs = static_cast<unsigned>(std::min<int64_t>(dh / 2, 256)), rows_per_cta = 256 / pairs;
    const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((H + 2 * Hkv + rows_per_cta - 1) / rows_per_cta));
    rope_kv_append_kernel<Ty><<<grid, dim3(pairs, rows_per_cta), 0, stream>>>(static_cast<const Ty*>(qkv),
        static_cast<Ty*>(q), H, positions, inv_freq, slots, Hkv, dh, static_cast<Ty*>(k_cache),
        static_cast<Ty*>(v_cache), num_slots, block_size, error_flag);
    check_launch("rope_kv_append");
  });
}

}  // namespace polar::cuda
