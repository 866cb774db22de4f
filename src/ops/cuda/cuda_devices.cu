#include <cuda_runtime.h>

#include "ops/cuda_devices.h"

namespace polar {

std::vector<CudaDevice> cuda_devices(std::string* why) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why) *why = cudaGetErrorString(err);
    return {};
  }
  std::vector<CudaDevice> out;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    out.push_back({i, p.name, p.major, p.minor, static_cast<int64_t>(p.totalGlobalMem), p.multiProcessorCount});
  }
  if (out.empty() && why) *why = "no CUDA device is visible";
  return out;
}

}  // namespace polar
