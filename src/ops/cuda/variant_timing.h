// Timing alternatives of one operation on the device, for choices made by measurement (cuBLASLt's
// algorithms, the sparse MLP's path, attention split plans): cuda_backend_linear.cpp,
// cuda_backend_attention.cpp and cublaslt_gemm.cpp.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cuda/cuda_check.h"

namespace polar::cuda {

constexpr int kTuneRuns = 5;

// The median time (ms) of each of n variants of one operation, enqueued by run(i), which returns false
// where variant i cannot run (its time is then infinite). Every variant runs once untimed (plans and
// caches it builds on first use stay out of the timing), then kTuneRuns times, each run after an
// L2-sized flush so that weights come from HBM as in a decode step. Empty without memory for the flush.
template <typename Run> std::vector<float> time_variants(int device, cudaStream_t stream, size_t n, const Run& run) {
  int l2 = 0;
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  const size_t flush_bytes = 2 * static_cast<size_t>(l2);
  void* flush = nullptr;
  if (cudaMalloc(&flush, flush_bytes) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  cudaEvent_t start, stop;
  cuda_check(cudaEventCreate(&start), "cudaEventCreate");
  cuda_check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> medians(n, INFINITY);
  for (size_t i = 0; i < n; ++i) {
    if (!run(i)) continue;
    std::vector<float> ms;
    for (int r = 0; r < kTuneRuns; ++r) {
      cuda_check(cudaMemsetAsync(flush, r, flush_bytes, stream), "L2 flush");
      cuda_check(cudaEventRecord(start, stream), "cudaEventRecord");
      if (!run(i)) break;
      cuda_check(cudaEventRecord(stop, stream), "cudaEventRecord");
      cuda_check(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float t = 0;
      cuda_check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
      ms.push_back(t);
    }
    if (ms.size() < static_cast<size_t>(kTuneRuns)) continue;
    std::nth_element(ms.begin(), ms.begin() + kTuneRuns / 2, ms.end());
    medians[i] = ms[kTuneRuns / 2];
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cuda_check(cudaFree(flush), "cudaFree");
  return medians;
}

}  // namespace polar::cuda
