#include "ops/backend.h"

#include "ops/cuda_devices.h"
#ifdef POLAR_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#endif

namespace polar {

void Backend::begin_capture() { fail("the {} backend cannot record graphs", name()); }
std::unique_ptr<Graph> Backend::end_capture() { fail("the {} backend cannot record graphs", name()); }

void Backend::set_profiling(bool on) {
  if (on != profiling_) external_profiler_span(on);
  profiling_ = on;
  marks_.clear();
  reset_markers();
}

void Backend::region(const char* name) {
  if (profiling_) marks_.emplace_back(name, time_marker());
}

std::map<std::string, double> Backend::take_profile() {
  std::map<std::string, double> ms;
  if (!profiling_ || marks_.empty()) return ms;
  region("");  // closes the last region
  synchronize();
  for (size_t i = 0; i + 1 < marks_.size(); ++i) ms[marks_[i].first] += marker_ms(marks_[i].second, marks_[i + 1].second);
  marks_.clear();
  reset_markers();
  return ms;
}

#ifndef POLAR_HAVE_CUDA
std::vector<CudaDevice> cuda_devices(std::string* why) {
  if (why) *why = "this build of polar has no CUDA support (nvcc was not found when it was configured)";
  return {};
}
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, DType dtype, SparseMlpPath mlp_path) {
  if (device == "cpu") return make_cpu_backend();
  if (device.rfind("cuda", 0) == 0) {
    int index = 0;
    if (device.size() > 4) {
      check(device[4] == ':' && device.size() > 5 && device.size() <= 9 &&
                device.find_first_not_of("0123456789", 5) == std::string::npos,
            "device '{}': expected cuda or cuda:N", device);
      index = std::stoi(device.substr(5));
    }
    std::string why;
    std::vector<CudaDevice> devices = cuda_devices(&why);
    if (devices.empty()) fail("device '{}': {}", device, why);
    check(index < static_cast<int>(devices.size()), "device '{}': only {} CUDA device(s) visible", device, devices.size());
#ifdef POLAR_HAVE_CUDA
    return make_cuda_backend(index, dtype, mlp_path);
#else
    (void)dtype;
    (void)mlp_path;
#endif
  }
  fail("unknown device '{}' (expected cpu or cuda[:N])", device);
}

}  // namespace polar
