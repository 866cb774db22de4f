// RoPE fused with the KV-cache append (rope.h): one pass over the fused q/k/v projection's output.
#include "ops/cuda/rope.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

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

}  // namespace

void rope_kv_append(const void* qkv, void* q, int64_t H, const int32_t* positions, const float* inv_freq,
                    const int32_t* slots, int64_t T, int64_t Hkv, int64_t dh, void* k_cache, void* v_cache,
                    int64_t num_slots, int64_t block_size, int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (T == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    rope_kv_append_kernel<Ty><<<static_cast<unsigned>(T), row_threads((H + 2 * Hkv) * dh / 2), 0, stream>>>(static_cast<const Ty*>(qkv),
        static_cast<Ty*>(q), H, positions, inv_freq, slots, Hkv, dh, static_cast<Ty*>(k_cache),
        static_cast<Ty*>(v_cache), num_slots, block_size, error_flag);
    check_launch("rope_kv_append");
  });
}

}  // namespace polar::cuda
