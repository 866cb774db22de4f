// Gather GEMMs of the sparse ReLU MLP (backend.h: gather_up_relu, gather_down) on the CUDA backend
// (gather_gemm.cu): one tensor-core kernel reads only the selected neurons' rows of a neuron-major weight,
// straight from where they lie, so a sparse MLP moves its selected weight bytes once.
//
//   y[M, N] = epilogue(x[M, K] · B), B [K, N] taken from w [D, ldw] (neuron-major, row-major) by idx:
//     gather_n (up):    N = number of selected neurons, B(k, n) = w[idx[n], k]   (fc1 [D, d], K = d)
//     !gather_n (down): K = number of selected neurons, B(k, n) = w[idx[k], n]   (fc2ᵀ [D, d], N = d)
//   epilogue: + bias (up: bias[idx[n]], down: bias[n]; optional), ReLU (optional), + y (accumulate).
//
// x [M, ldx], y [M, ldy] row-major; all of x, w, bias, y in the activation dtype; arithmetic in fp32.
// Any shape works; rows that are 16-byte aligned (ldx, ldw a multiple of 8 and K, N as the loads need)
// stream through cp.async, others load element by element (correct, slower: odd test shapes only).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

struct GatherGemm {
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  int64_t ldw = 0;
  const int32_t* idx = nullptr;  // [N] (gather_n) or [K]; an index outside [0, D) reads as a zero row and
  int64_t D = 0;                 // raises kErrorNeuronOutOfRange in error_flag
  int32_t* error_flag = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t ldy = 0;
  int64_t M = 0, N = 0, K = 0;
  bool gather_n = true;
  bool relu = false;
  bool accumulate = false;
};

// Scratch the launch needs for the partial sums of output tiles split between CTAs.
size_t gather_gemm_workspace_bytes(const GatherGemm& g, int num_sms, Elem e);
void gather_gemm(const GatherGemm& g, void* workspace, size_t workspace_bytes, int num_sms, Elem e,
                 cudaStream_t stream);

}  // namespace polar::cuda
