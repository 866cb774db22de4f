// config.json -> ModelConfig (config_from_hf), then what is derived from it before any weight is read:
// the description and the RoPE frequencies.
#include <cstdint>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json.h"
#include "io/model_config.h"

using namespace polar;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Malformed JSON is nlohmann's to reject (load_hf_config turns its exception into a polar::Error).
  nlohmann::json j;
  try {
    j = parse_json(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  try {
    const ModelConfig c = config_from_hf(j, "config.json");
    c.describe();
    rope_inv_freq(c);
  } catch (const Error&) {
  }
  return 0;
}
