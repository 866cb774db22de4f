// Elementwise kernels (elementwise.h): random fill, dtype conversion, add, SiLU·up, and the embedding row
// gather; grid-stride loops (or a CTA per row) that move each element once and compute in fp32.
#include "ops/cuda/elementwise.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/random.h"
#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

// ---- random, conversion, elementwise: grid-stride loops over n elements ----

template <typename T>
__global__ void random_kernel(T* out, int64_t n, float lo, float hi, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(lo + (hi - lo) * uniform_hash(seed, static_cast<uint64_t>(i)));
}

template <typename In, typename Out>
__global__ void convert_kernel(const In* in, Out* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<Out>(to_float(in[i]));
}

// Elementwise op over n elements of T: out[i] = op(a[i], b[i]).
template <typename T, typename Op>
__global__ void binary_kernel(const T* a, const T* b, T* out, int64_t n, Op op) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(op(to_float(a[i]), to_float(b[i])));
}

struct AddOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op> void launch_binary(const void* a, const void* b, void* out, int64_t n, Elem e, cudaStream_t stream,
                                          Op op, const char* what) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    binary_kernel<T, Op><<<grid_for(n, 4), kGridThreads, 0, stream>>>(static_cast<const T*>(a),
        static_cast<const T*>(b), static_cast<T*>(out), n, op);
    check_launch(what);
  });
}

// ---- embedding: one CTA per output row, a row copy; bad ids raise a flag and give zeros ----

template <typename T>
__global__ void embedding_kernel(const T* table, int64_t rows, int64_t d, const int32_t* ids, int64_t id_offset, T* out,
                                 int32_t* error_flag) {
  const int64_t t = blockIdx.x;
  const int64_t row = ids[t] + id_offset;
  T* dst = out + t * d;
  if (row < 0 || row >= rows) {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = from_float<T>(0.0f);
    if (threadIdx.x == 0) atomicOr(error_flag, kErrorIdOutOfRange);
    return;
  }
  const T* src = table + row * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// out[T, F] = silu(gate_up[t, f]) * gate_up[t, F + f], grid-stride over T·F.
template <typename T>
__global__ void silu_mul_kernel(const T* gate_up, T* out, int64_t T_, int64_t F) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T_ * F; i += int64_t(gridDim.x) * blockDim.x) {
    const T* row = gate_up + i / F * 2 * F;
    const float g = to_float(row[i % F]), u = to_float(row[F + i % F]);
    out[i] = from_float<T>(g / (1.0f + __expf(-g)) * u);
  }
}

}  // namespace

void random_uniform(void* out, int64_t n, bool f32, Elem e, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return;
  if (f32) {
    random_kernel<<<grid_for(n, 4), kGridThreads, 0, stream>>>(static_cast<float*>(out), n, lo, hi, seed);
  } else {
    dispatch(e, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      random_kernel<<<grid_for(n, 4), kGridThreads, 0, stream>>>(static_cast<T*>(out), n, lo, hi, seed);
    });
  }
  check_launch("random_uniform");
}

void to_f32(const void* in, float* out, int64_t n, Elem e, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    convert_kernel<<<grid_for(n, 4), kGridThreads, 0, stream>>>(static_cast<const T*>(in), out, n);
  });
  check_launch("to_f32");
}

void from_f32(const float* in, void* out, int64_t n, Elem e, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    convert_kernel<<<grid_for(n, 4), kGridThreads, 0, stream>>>(in, static_cast<T*>(out), n);
  });
  check_launch("from_f32");
}

void embedding(const void* table, int64_t rows, int64_t d, const int32_t* ids, int64_t n, int64_t id_offset, void* out,
               int32_t* error_flag, Elem e, cudaStream_t stream) {
  if (n == 0) return;
  dispatch(e, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    embedding_kernel<T><<<static_cast<unsigned>(n), row_threads(d), 0, stream>>>(static_cast<const T*>(table), rows, d,
        ids, id_offset, static_cast<T*>(out), error_flag);
    check_launch("embedding");
  });
}

void add(const void* a, const void* b, void* out, int64_t n, Elem e, cudaStream_t stream) {
  launch_binary(a, b, out, n, e, stream, AddOp{}, "add");
}


void silu_mul(const void* gate_up, void* out, int64_t T, int64_t F, Elem e, cudaStream_t stream) {
  if (T * F == 0) return;
  dispatch(e, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    silu_mul_kernel<Ty><<<grid_for(T * F, 4), kGridThreads, 0, stream>>>(static_cast<const Ty*>(gate_up),
        static_cast<Ty*>(out), T, F);
    check_launch("silu_mul");
  });
}

}  // namespace polar::cuda
