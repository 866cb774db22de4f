// Row norms (norms.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

// x[rows, d] -> out[rows, d] (out may alias x). LayerNorm: (x - mean) / sqrt(var + eps) * w + b;
// RMSNorm (b == nullptr and rms): x / sqrt(mean(x²) + eps) * w. One CTA per row, fp32 statistics.
// With delta [rows, d] (not aliasing x or out): x += delta first, rounded to x's type and written back,
// and the norm is taken of that (the residual add fused into the next norm).
void norm(void* x, const void* delta, const void* w, const void* b, float eps, bool rms, int64_t rows, int64_t d,
          void* out, Elem e, cudaStream_t stream);
// out[r] = the L2 norm of row r of x [R, n], fp32 accumulation; one CTA per row.
void l2_norms(const void* x, int64_t R, int64_t n, void* out, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
