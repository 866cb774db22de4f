// Column moves of the sparse MLP's dense-GEMM path (columns.h).
#include "ops/cuda/columns.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

// ---- the sparse MLP's dense-GEMM path (CudaBackend::sparse_projection): selected columns moved between
// the full activations [M, D] and the compact ones [M, k] ----
//
// kGather: dst[m, j] = src[m, idx[j]] (src [M, D], dst [M, k]); else the scatter dst[m, idx[j]] = src[m, j]
// (src [M, k], dst [M, D], whose other columns the caller zeroed). Grid (ceil(k / kGridThreads), ceil(M /
// kMoveRows)): a thread reads its neuron id once and moves that column for kMoveRows rows; consecutive
// threads touch consecutive compact columns and, ids being ascending, nearby full ones. An id outside [0, D)
// moves nothing (a gathered column reads as zero) and raises kErrorNeuronOutOfRange.
constexpr int kMoveRows = 8;

template <typename T, bool kGather>
__global__ void move_columns_kernel(const T* src, T* dst, int64_t M, int64_t D, const int32_t* idx, int64_t k,
                                    int32_t* error_flag) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= k) return;
  const int32_t u = idx[j];
  const bool valid = u >= 0 && u < D;
  if (!valid && blockIdx.y == 0) atomicOr(error_flag, kErrorNeuronOutOfRange);
  const int64_t m_end = min(M, (blockIdx.y + 1) * int64_t(kMoveRows));
  for (int64_t m = blockIdx.y * int64_t(kMoveRows); m < m_end; ++m) {
    if (kGather)
      dst[m * k + j] = valid ? src[m * D + u] : T(0.0f);
    else if (valid)
      dst[m * D + u] = src[m * k + j];
  }
}

}  // namespace

void move_columns(const void* src, void* dst, int64_t M, int64_t D, const int32_t* idx, int64_t k, bool gather,
                  int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (M == 0 || k == 0) return;
  const dim3 grid(static_cast<unsigned>((k + kGridThreads - 1) / kGridThreads),
                  static_cast<unsigned>((M + kMoveRows - 1) / kMoveRows));
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    if (gather)
      move_columns_kernel<Ty, true><<<grid, kGridThreads, 0, stream>>>(static_cast<const Ty*>(src), static_cast<Ty*>(dst),
                                                                    M, D, idx, k, error_flag);
    else
      move_columns_kernel<Ty, false><<<grid, kGridThreads, 0, stream>>>(static_cast<const Ty*>(src), static_cast<Ty*>(dst),
                                                                     M, D, idx, k, error_flag);
  });
  check_launch("move_columns");
}

}  // namespace polar::cuda
