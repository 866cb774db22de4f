// Decode-sized projections on CUDA cores (gemv.cu), for cuda_backend.cpp's linear at m <= kGemvMaxRows (where
// it beats cuBLASLt's best for the shape, measured) and the o_proj of selective attention
// (linear_selected_inputs): the weight is streamed from HBM once, 16-byte loads with many in flight per
// thread, fp32 arithmetic.
//
//   y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]) (+ y if accumulate),  M <= kGemvMaxRows.
//
// Selected input units (the o_proj of selective attention): K = units · width, column block u (width columns)
// belonging to unit u (a KV group's query heads). sel [M, sel_k] (I32) lists each row's units, entries
// outside [0, units) being padding; rows flagged 1 in dense_rows [M] (optional) select every unit. Only the
// weight columns of units that some row selected are read; x's columns of the units a row did not select
// must be zero (the attention op leaves them so), which makes the result the dense product's.
//
// x [M, ldx] and y [M, ldy] row-major; x, w, bias, y in the activation dtype. Rows and unit blocks that are
// 16-byte aligned (K, ldx, width multiples of 8, pointers aligned) stream 8 elements a load; other shapes load
// element by element (correct, slower: odd test shapes only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

constexpr int64_t kGemvMaxRows = 4;
// The most units a selection may name (a KV head count; llama-3.1-405b has 16, OPT-66B 72 query heads).
constexpr int64_t kGemvMaxUnits = 1024;

struct Gemv {
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;     // [N, K] row-major
  const void* bias = nullptr;  // [N] or null
  void* y = nullptr;
  int64_t ldy = 0;
  int64_t M = 0, N = 0, K = 0;
  bool accumulate = false;
  // Selected input units; sel == nullptr: every column is read.
  const int32_t* sel = nullptr;
  int64_t sel_k = 0;
  const int32_t* dense_rows = nullptr;
  int64_t units = 0, width = 0;
};

void gemv(const Gemv& g, int num_sms, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
