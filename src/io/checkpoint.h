// Checkpoint loading: a Hugging Face directory (config.json + model.safetensors, or shards listed in
// model.safetensors.index.json) or a GGUF file, turned into one ModelConfig plus fp32 host tensors under
// canonical (Hugging Face) names. GGUF names are mapped to HF names and GGUF "llama" q/k rows are permuted
// from interleaved-pair to rotate-half RoPE order here, so model code sees one layout.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "core/tensor.h"
#include "io/model_config.h"
#include "io/tokenizer.h"

namespace polar {

struct Checkpoint {
  std::string path;
  std::string format;        // "safetensors" or "gguf"
  std::string weight_types;  // e.g. "F32" or "Q4_1 x210, F32 x61, Q8_0 x1"
  ModelConfig config;
  std::map<std::string, Tensor> tensors;  // fp32, canonical names
  std::unique_ptr<Tokenizer> tokenizer;   // null if the checkpoint carries none
  int64_t n_params() const;

  // The tensor `name` with shape `shape`; a missing tensor or another shape is a polar::Error.
  const Tensor& get(const std::string& name, const Shape& shape) const;
  // Like get, but absent -> undefined Tensor.
  Tensor get_optional(const std::string& name, const Shape& shape) const;
};

// Detects the format from the path: a directory is a HF checkpoint, a file starting with "GGUF" is GGUF.
Checkpoint load_checkpoint(const std::string& path);

}  // namespace polar
