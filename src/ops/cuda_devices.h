// The CUDA devices this process can see. Builds without CUDA report none (and say why).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace polar {

struct CudaDevice {
  int index;
  std::string name;
  int sm_major, sm_minor;
  int64_t memory_bytes;
  int sm_count;
};

// Empty when the build has no CUDA or no device is visible; `why` (if given) then says which.
std::vector<CudaDevice> cuda_devices(std::string* why = nullptr);

}  // namespace polar
