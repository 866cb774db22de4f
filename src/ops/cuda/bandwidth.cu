#include "ops/cuda/bandwidth.h"

#include <algorithm>

#include "core/error.h"
#include "ops/cuda/device_util.cuh"

namespace polar::cuda {

using namespace detail;

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 8;  // independent 16-byte loads in flight per thread before the first is used

// data [n16] as uint4, then a tail of `tail` words [n16 * 4, n16 * 4 + tail) as uint32. Each thread reads
// kUnroll vectors kUnroll·stride apart per iteration (all issued before any is consumed), so a warp keeps
// 8 × 512 bytes of requests outstanding; streaming loads (ld.global.cs) do not keep the data in L1/L2.
__global__ void __launch_bounds__(kThreads) read_probe_kernel(const uint4* __restrict__ data, int64_t n16,
                                                              const uint32_t* __restrict__ tail_words, int tail,
                                                              uint32_t* xor_out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  uint32_t acc = 0;
  for (; i + (kUnroll - 1) * stride < n16; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(data + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = __ldcs(data + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (blockIdx.x == 0 && threadIdx.x < tail) acc ^= tail_words[threadIdx.x];
  // One atomic per warp: the XOR of the warp's lanes.
  for (int offset = 16; offset > 0; offset /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
  if ((threadIdx.x & 31) == 0) atomicXor(xor_out, acc);
}

}  // namespace

void read_probe(const void* data, int64_t bytes, uint32_t* xor_out, int blocks, cudaStream_t stream) {
  check(reinterpret_cast<uintptr_t>(data) % 16 == 0 && bytes % 4 == 0 && blocks > 0,
        "read_probe: needs 16-byte aligned data, a whole number of words and a grid");
  const int64_t n16 = bytes / 16;
  const int tail = static_cast<int>((bytes % 16) / 4);
  read_probe_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(data), n16,
                                                     static_cast<const uint32_t*>(data) + n16 * 4, tail, xor_out);
  check_launch("read_probe");
}

int read_probe_blocks(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    fail("read_probe: cannot read the multiprocessor count of device {}", device);
  return sms * ctas_per_sm(read_probe_kernel, kThreads, 0, "read_probe");
}

}  // namespace polar::cuda
