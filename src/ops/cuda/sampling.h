// Token choice from logits rows (sampling.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

// out[r] = argmax of logits[r, 0:V] (lowest index on ties); one CTA per row.
void argmax(const void* logits, int64_t R, int64_t V, int32_t* out, Elem e, cudaStream_t stream);
// For m < M, row rows[m] of logits [*, V]: target_lp[m] = its log-softmax at targets[m]; top_ids / top_lp
// [M, n] = its n largest logits' ids (descending, lower id first on ties) and log-softmax values (backend.h:
// logprobs). One CTA per listed row, n + 1 passes over it.
void logprobs(const void* logits, int64_t V, const int32_t* rows, const int32_t* targets, int64_t M, int64_t n,
              float* target_lp, int32_t* top_ids, float* top_lp, Elem e, cudaStream_t stream);
// out[r] = the token the rule of ops/sampling.h picks from logits[r, 0:V] with uniforms[r] (temperature
// > 0; greedy rows use argmax). One CTA per row.
void sample(const void* logits, int64_t R, int64_t V, float temperature, int64_t top_k, float top_p,
            const float* uniforms, int32_t* out, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
