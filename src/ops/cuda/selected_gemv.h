// The output projection of selective attention at decode-sized batches (selected_gemv.cu), behind
// cuda_backend_linear.cpp's linear_selected_inputs where it beats cuBLASLt's dense GEMM for the shape (measured):
// it reads only the weight columns of the KV groups some row selected, streamed from HBM once (16-byte loads,
// many in flight per thread), fp32 arithmetic.
//
//   y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]) (+ y if accumulate),  M <= kSelectedGemvMaxRows,
//
// where K = units · width, column block u (width columns) belonging to unit u (a KV group's query heads).
// sel [M, sel_k] (I32) lists each row's units, entries outside [0, units) being padding; rows flagged 1 in
// dense_rows [M] (optional) select every unit. x's columns of the units a row did not select must be zero
// (the attention op leaves them so), which makes the result the dense product's.
//
// x [M, ldx] and y [M, ldy] row-major; x, w, bias, y in the activation dtype. Unit blocks that are 16-byte
// aligned (ldx, width multiples of 8, x and w aligned) stream 8 elements a load; others load element by
// element (correct, slower: odd test shapes only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

constexpr int64_t kSelectedGemvMaxRows = 4;
// The most units a selection may name (a KV head count: 8 in Llama-3-8B, 72 query heads in OPT-66B).
constexpr int64_t kSelectedGemvMaxUnits = 1024;

struct SelectedGemv {
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;     // [N, K] row-major
  const void* bias = nullptr;  // [N] or null
  void* y = nullptr;
  int64_t ldy = 0;
  int64_t M = 0, N = 0;
  bool accumulate = false;
  const int32_t* sel = nullptr;  // [M, sel_k]
  int64_t sel_k = 0;
  const int32_t* dense_rows = nullptr;
  int64_t units = 0, width = 0;  // K = units · width
};

void selected_gemv(const SelectedGemv& g, int num_sms, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
