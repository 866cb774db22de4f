// The CUDA backend's elementwise, normalisation, RoPE, KV-cache and reduction kernels (kernels.cu).
// Raw pointers and sizes only; the backend (cuda_backend.cpp) validates tensors before it calls these.
// `Elem` names the activation dtype of the tensors behind void pointers: all activations, weights and KV
// of one backend share it; arithmetic is fp32. Every launcher enqueues on `stream` and checks the launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace polar::cuda {

enum class Elem { F16, BF16 };

// Any kernel that meets bad data it cannot reject on the host (an id outside a table) ORs a bit into a
// device-side flag, which the backend reads back at its next synchronisation.
enum ErrorBit : int32_t { kErrorIdOutOfRange = 1, kErrorSlotOutOfRange = 2 };

// out[i] = lo + (hi - lo) * uniform_hash(seed, i) for i < n; dtype F32 (f32 = true) or `e`.
void random_uniform(void* out, int64_t n, bool f32, Elem e, float lo, float hi, uint64_t seed, cudaStream_t stream);
// Converts n values between fp32 and the activation dtype.
void to_f32(const void* in, float* out, int64_t n, Elem e, cudaStream_t stream);
void from_f32(const float* in, void* out, int64_t n, Elem e, cudaStream_t stream);

// out[t, :] = table[ids[t] + id_offset, :]; table [rows, d], out [n, d]. Ids outside [0, rows) write zeros
// and raise kErrorIdOutOfRange.
void embedding(const void* table, int64_t rows, int64_t d, const int32_t* ids, int64_t n, int64_t id_offset, void* out,
               int32_t* error_flag, Elem e, cudaStream_t stream);
// out = a + b over n elements.
void add(const void* a, const void* b, void* out, int64_t n, Elem e, cudaStream_t stream);
// x[rows, d] -> out[rows, d] (out may alias x). LayerNorm: (x - mean) / sqrt(var + eps) * w + b;
// RMSNorm (b == nullptr and rms): x / sqrt(mean(x²) + eps) * w. One CTA per row, fp32 statistics.
void norm(const void* x, const void* w, const void* b, float eps, bool rms, int64_t rows, int64_t d, void* out, Elem e,
          cudaStream_t stream);
// In place on x[T, heads, dh], rotate-half RoPE: (x[i], x[i + dh/2]) rotated by positions[t] · inv_freq[i]
// (inv_freq fp32 [dh/2], already holding any llama3 / linear scaling).
void rope(void* x, const int32_t* positions, const float* inv_freq, int64_t T, int64_t heads, int64_t dh, Elem e,
          cudaStream_t stream);
// k, v [T, Hkv, dh] -> slot slots[t] of the caches [num_slots / block_size, Hkv, block_size, dh] (row
// slot % block_size of block slot / block_size, in every head's slab). When q is given ([T, H, dh]),
// q (in place) and k are rotated by RoPE first, all in one pass (the fused decode-step prologue).
void rope_kv_append(void* q, int64_t H, const void* k, const void* v, const int32_t* positions, const float* inv_freq,
                    const int32_t* slots, int64_t T, int64_t Hkv, int64_t dh, void* k_cache, void* v_cache,
                    int64_t num_slots, int64_t block_size, int32_t* error_flag, Elem e, cudaStream_t stream);
// x = max(x, 0) over n elements.
void relu(void* x, int64_t n, Elem e, cudaStream_t stream);
// out = silu(gate) * up over n elements (out may alias gate).
void silu_mul(const void* gate, const void* up, void* out, int64_t n, Elem e, cudaStream_t stream);
// out[r] = argmax of logits[r, 0:V] (lowest index on ties); one CTA per row.
void argmax(const void* logits, int64_t R, int64_t V, int32_t* out, Elem e, cudaStream_t stream);
// out[r] = the token the rule of ops/sampling.h picks from logits[r, 0:V] with uniforms[r] (temperature
// > 0; greedy rows use argmax). One CTA per row.
void sample(const void* logits, int64_t R, int64_t V, float temperature, int64_t top_k, float top_p,
            const float* uniforms, int32_t* out, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
