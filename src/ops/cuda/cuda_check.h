// The CUDA runtime's errors as polar::Errors, for the CUDA backend's host code.
#pragma once
#include <cuda_runtime.h>

#include "core/error.h"

namespace polar::cuda {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail("CUDA error in {}: {}", what, cudaGetErrorString(err));
}

}  // namespace polar::cuda
