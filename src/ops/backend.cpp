#include "ops/backend.h"

#include "ops/cuda_devices.h"

namespace polar {

#ifndef POLAR_HAVE_CUDA
std::vector<CudaDevice> cuda_devices(std::string* why) {
  if (why) *why = "this build of polar has no CUDA support (nvcc was not found when it was configured)";
  return {};
}
#endif

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device.rfind("cuda", 0) == 0) {
    std::string why;
    std::vector<CudaDevice> devices = cuda_devices(&why);
    if (devices.empty()) fail("device '{}': {}", device, why);
    fail("device '{}': the CUDA backend is not part of this version of polar yet ({} CUDA device(s) visible); use --device cpu",
         device, devices.size());
  }
  fail("unknown device '{}' (expected cpu or cuda[:N])", device);
}

}  // namespace polar
