// safetensors: the header length, the JSON header and the tensor table, then every tensor read as fp32.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

using namespace polar;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_file("model.safetensors", fuzz::as_text(data, size));
  try {
    const safetensors::File f = safetensors::File::open(path);
    for (const safetensors::TensorInfo& t : f.tensors()) {
      fuzz::require(t.begin <= size && t.nbytes <= size - t.begin, "a safetensors tensor lies inside the file");
      fuzz::require(f.find(t.name) != nullptr, "every listed tensor can be found by name");
      if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16) continue;
      const Tensor x = f.load_f32(t);
      float sum = 0;  // reads every element
      for (int64_t i = 0; i < x.numel(); ++i) sum += x.data<float>()[i];
      (void)sum;
    }
  } catch (const Error&) {
  }
  return 0;
}
