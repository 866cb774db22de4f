// Dequantisation of each supported ggml type on arbitrary block bytes: the first byte picks the type, the
// rest (whole blocks) is the data, copied to a buffer of exactly that size so that ASan sees any overread.
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/gguf.h"

using namespace polar;
using gguf::GGMLType;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static constexpr GGMLType kTypes[] = {GGMLType::F32,  GGMLType::F16,  GGMLType::BF16, GGMLType::Q8_0, GGMLType::Q4_0,
                                        GGMLType::Q4_1, GGMLType::Q4_K, GGMLType::Q5_K, GGMLType::Q6_K};
  if (size < 1) return 0;
  const GGMLType type = kTypes[data[0] % std::size(kTypes)];
  const auto block_bytes = static_cast<size_t>(gguf::type_block_bytes(type));
  const size_t blocks = (size - 1) / block_bytes;
  const int64_t n = static_cast<int64_t>(blocks) * gguf::type_block_elems(type);
  std::vector<uint8_t> src(data + 1, data + 1 + blocks * block_bytes);
  std::vector<float> dst(static_cast<size_t>(n));
  gguf::dequantize(type, src.data(), dst.data(), n);
  // A whole number of blocks is always accepted; one element short of a block is always refused.
  if (gguf::type_block_elems(type) > 1) {
    bool refused = false;
    try {
      gguf::dequantize(type, src.data(), dst.data(), n - 1);
    } catch (const Error&) {
      refused = true;
    }
    fuzz::require(refused, "a partial block is refused");
  }
  return 0;
}
