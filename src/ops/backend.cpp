#include "ops/backend.h"

namespace polar {

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device.rfind("cuda", 0) == 0)
    fail("device '{}': the CUDA backend is not available in this version of polar (use --device cpu)", device);
  fail("unknown device '{}' (expected cpu or cuda[:N])", device);
}

}  // namespace polar
