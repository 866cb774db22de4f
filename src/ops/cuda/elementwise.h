// Elementwise kernels (elementwise.cu). Raw pointers and sizes; every launcher enqueues on `stream` and
// checks the launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

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
// out[T, F] = silu(gate_up[:, :F]) * gate_up[:, F:] (gate_up [T, 2F]).
void silu_mul(const void* gate_up, void* out, int64_t T, int64_t F, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
