// Skinny GEMMs of decode steps on the CUDA backend (skinny_gemm.cu): y[m, n] = x[m, k] · wᵀ (+ bias[n])
// (ReLU) (+ y) for w [n, k] (a Linear's weight) and m <= kSkinnyMaxRows. A decode step's projections read a
// whole weight to produce a handful of rows, so their limit is the weight's read time; cuBLASLt's kernels,
// built for tiles of 64+ rows, left the 4096 x 4096 o_proj at ~60% of copy bandwidth (docs/benchmarks.md).
// Here the weight is the MMA's A operand (16 output columns a tile) and the few rows of x its B operand
// (8 or 16 wide), so every weight byte is loaded once, straight into registers, and k is split between the
// warps of a thread-block cluster that reduces its partial sums in distributed shared memory (fixed order:
// the result does not depend on timing). The GEMM planner (cublaslt_gemm.h) times the variants beside
// cuBLASLt's candidates and keeps the fastest per shape.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

constexpr int64_t kSkinnyMaxRows = 16;

struct SkinnyGemm {
  const void* x = nullptr;     // [m, k], 16-byte aligned
  const void* w = nullptr;     // [n, k], 16-byte aligned
  const void* bias = nullptr;  // [n] or null
  void* y = nullptr;           // [m, n]
  int64_t m = 0, n = 0, k = 0;
  bool relu = false, accumulate = false;
};

// Launch variants: output columns per CTA (16 or 32) x cluster size (1, 2, 4 or 8 CTAs splitting k).
constexpr int kSkinnyVariants = 8;
// Whether the kernel takes g: m in [1, kSkinnyMaxRows], k a multiple of 8 (16-byte rows), x and w 16-byte
// aligned, n below 2^31.
bool skinny_gemm_supports(const SkinnyGemm& g);
void skinny_gemm(const SkinnyGemm& g, int variant, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
