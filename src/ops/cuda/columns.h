// Column moves of the sparse MLP's dense-GEMM path (columns.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

// The selected columns idx[k] (ascending, < D) of M rows moved between full [M, D] and compact [M, k]
// activations: gather (full src -> compact dst) or scatter (compact src -> full dst, whose other columns are
// left as they are). An id outside [0, D) raises kErrorNeuronOutOfRange (a gathered column reads as zero).
void move_columns(const void* src, void* dst, int64_t M, int64_t D, const int32_t* idx, int64_t k, bool gather,
                  int32_t* error_flag, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
