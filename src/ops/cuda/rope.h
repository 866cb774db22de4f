// RoPE and the KV-cache append (rope.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

// qkv [T, H + 2·Hkv, dh] (query, key, value heads) -> q [T, H, dh] and slot slots[t] of the caches
// [num_slots / block_size, Hkv, block_size, dh] (row slot % block_size of block slot / block_size, in
// every head's slab), all in one pass (the decode step's prologue). With inv_freq (fp32 [dh/2], any
// llama3 / linear scaling folded in) query and key heads are rotated by rotate-half RoPE at positions[t];
// without it (nullptr) they are copied. A slot outside [0, num_slots) sets kErrorSlotOutOfRange.
void rope_kv_append(const void* qkv, void* q, int64_t H, const int32_t* positions, const float* inv_freq,
                    const int32_t* slots, int64_t T, int64_t Hkv, int64_t dh, void* k_cache, void* v_cache,
                    int64_t num_slots, int64_t block_size, int32_t* error_flag, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
