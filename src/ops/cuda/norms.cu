// Row norms (norms.h): LayerNorm / RMSNorm and the L2 norms of rows; one CTA per row, fp32 statistics.
#include "ops/cuda/norms.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

// ---- norms: one CTA per row; the row is read from memory once (residual add and statistics), then from L1/L2 ----

__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by an earlier call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x, delta, out [rows, d]; w, b [d]; grid rows, row_threads(d) threads.
template <typename T>
__global__ void norm_kernel(T* x, const T* delta, const T* w, const T* b, float eps, bool rms, int64_t d, T* out) {
  __shared__ float scratch[32];
  T* xr = x + blockIdx.x * d;
  T* orow = out + blockIdx.x * d;
  // The first pass over the row adds the residual delta (when given) and gathers the first statistic: the sum
  // for LayerNorm, the sum of squares for RMSNorm. Each thread reads back only the elements it wrote (same
  // stride), so no barrier is needed between the add and the later passes.
  const T* dr = delta ? delta + blockIdx.x * d : nullptr;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = to_float(xr[i]);
    if (dr) {
      const T sum = from_float<T>(v + to_float(dr[i]));
      xr[i] = sum;
      v = to_float(sum);  // the rounded sum, as the CPU reference and the output pass see it
    }
    s += rms ? v * v : v;
  }
  s = block_sum(s, scratch);
  float mean = 0.0f, ss = s;
  if (!rms) {
    mean = s / d;
    ss = 0.0f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const float c = to_float(xr[i]) - mean;
      ss += c * c;
    }
    ss = block_sum(ss, scratch);
  }
  const float inv = rsqrtf(ss / d + eps);
  // Every thread has its statistics before anyone overwrites x (out may alias x): block_sum ends with
  // values every thread read after the last __syncthreads, and each element is read and written by one thread.
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float y = (to_float(xr[i]) - mean) * inv * to_float(w[i]);
    if (b) y += to_float(b[i]);
    orow[i] = from_float<T>(y);
  }
}

// out[r] = sqrt(Σ x[r, :]²) in fp32; one CTA per row.
template <typename T>
__global__ void l2_norms_kernel(const T* x, int64_t n, T* out) {
  __shared__ float scratch[32];
  const T* row = x + blockIdx.x * n;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(row[i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = from_float<T>(sqrtf(ss));
}

}  // namespace

void norm(void* x, const void* delta, const void* w, const void* b, float eps, bool rms, int64_t rows, int64_t d,
          void* out, Elem e, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    norm_kernel<T><<<static_cast<unsigned>(rows), row_threads(d), 0, stream>>>(static_cast<T*>(x),
        static_cast<const T*>(delta), static_cast<const T*>(w), static_cast<const T*>(b), eps, rms, d,
        static_cast<T*>(out));
    check_launch(rms ? "rms_norm" : "layer_norm");
  });
}

void l2_norms(const void* x, int64_t R, int64_t n, void* out, Elem e, cudaStream_t stream) {
  if (R == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    l2_norms_kernel<<<static_cast<unsigned>(R), row_threads(n), 0, stream>>>(static_cast<const Ty*>(x), n,
                                                                             static_cast<Ty*>(out));
  });
  check_launch("l2_norms");
}

}  // namespace polar::cuda
