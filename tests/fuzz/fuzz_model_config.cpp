// config.json -> ModelConfig (config_from_hf), then what is derived from it before any weight is read:
// the description and the RoPE frequencies.
#include <cstdint>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/model_config.h"

using namespace polar;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Malformed JSON is nlohmann's to reject (the loaders turn its exception into a polar::Error).
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    const ModelConfig c = config_from_hf(j, "config.json");
    c.describe();
    rope_inv_freq(c);
  } catch (const Error&) {
  }
  return 0;
}
