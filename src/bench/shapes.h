// Model shapes `polar bench` builds synthetic models of: the Hugging Face config.json fields of real
// models (plus tiny ones for tests), parsed by the same config_from_hf as a checkpoint's config.json.
#pragma once
#include <string>
#include <vector>

#include "io/model_config.h"

namespace polar {

// The names --shape accepts, in table order.
std::vector<std::string> shape_names();
// The config of shape `name`; an unknown name is a polar::Error listing the known ones.
ModelConfig shape_config(const std::string& name);

}  // namespace polar
