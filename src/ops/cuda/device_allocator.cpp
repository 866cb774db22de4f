#include "ops/cuda/device_allocator.h"

#include <algorithm>

#include "core/error.h"

namespace polar {

// Prefill and mixed steps ask for sizes that vary with their token count; with exact sizes each new count
// would miss the cache (a cudaMalloc, which synchronises) and leave one more block in it for good. Between
// 64 KiB and 256 MiB, sizes are rounded up to 8 classes per power of two (at most 12.5% unused), so the cache
// holds a bounded set of sizes; below, to 256 bytes; above (weights, the KV cache), to 2 MiB, where a wider
// class would waste gigabytes.
size_t cuda_block_bytes(size_t bytes) {
  auto round_up = [](size_t x, size_t to) { return (x + to - 1) / to * to; };
  if (bytes < (size_t{64} << 10)) return std::max<size_t>(256, round_up(bytes, 256));
  if (bytes >= (size_t{256} << 20)) return round_up(bytes, size_t{2} << 20);
  size_t top = size_t{1} << 16;
  while (top * 2 <= bytes) top *= 2;  // top <= bytes < 2 top
  return round_up(bytes, top / 8);
}

namespace cuda {

void* DeviceAllocator::allocate_locked(size_t bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of the failed allocation
    release_cached_locked();
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      fail("out of GPU memory allocating {:.1f} MiB ({:.1f} MiB free of {:.1f} MiB)", bytes / 1048576.0,
           free_b / 1048576.0, total_b / 1048576.0);
    }
  }
  return p;
}

void DeviceAllocator::release_cached_locked() {
  for (auto& [size, blocks] : free_)
    for (void* p : blocks) cudaFree(p);
  free_.clear();
  cached_bytes_ = 0;
}

}  // namespace cuda

}  // namespace polar
