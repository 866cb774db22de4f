// Checkpoint loading: a Hugging Face directory (config.json + model.safetensors, or shards listed in
// model.safetensors.index.json) or a GGUF file, turned into one ModelConfig plus fp32 host tensors under
// canonical (Hugging Face) names. GGUF names are mapped to HF names and GGUF "llama" q/k rows are permuted
// from interleaved-pair to rotate-half RoPE order here, so model code sees one layout.
#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "core/tensor.h"
#include "io/model_config.h"
#include "io/tokenizer.h"

namespace polar {

struct Checkpoint {
  std::string path;
  std::string format;        // "safetensors", "gguf" or "synthetic"
  std::string weight_types;  // e.g. "F32" or "Q4_1 x210, F32 x61, Q8_0 x1"
  ModelConfig config;
  std::map<std::string, Tensor> tensors;  // fp32, canonical names
  std::unique_ptr<Tokenizer> tokenizer;   // null if the checkpoint carries none
  // The model's own chat template (Jinja source, see io/chat_template.h): GGUF metadata
  // tokenizer.chat_template, or a Hugging Face directory's (chat_template_from_hf_dir). nullopt if none.
  std::optional<std::string> chat_template;
  // Set for a synthetic checkpoint (benchmarks): it holds no tensors; every tensor its config implies is
  // drawn at random on the device from this seed when a model is built (Model::load_weight).
  std::optional<uint64_t> synthetic_seed;
  int64_t n_params() const;

  // Whether the checkpoint holds tensor `name`. A synthetic one holds what its config implies: all the
  // tensors, an lm_head only when the embeddings are untied.
  bool has(const std::string& name) const;

  // The tensor `name` with shape `shape`; a missing tensor or another shape is a polar::Error.
  const Tensor& get(const std::string& name, const Shape& shape) const;
  // Like get, but absent -> undefined Tensor.
  Tensor get_optional(const std::string& name, const Shape& shape) const;
};

// Detects the format from the path: a directory is a HF checkpoint, a file starting with "GGUF" is GGUF.
Checkpoint load_checkpoint(const std::string& path);
// The same without reading any tensor (tensors stays empty; the config, weight_types, tokenizer and chat
// template are filled in): for commands that only need a model's text side, such as rendering its prompts.
Checkpoint load_checkpoint_metadata(const std::string& path);

// The ModelConfig of a Hugging Face config.json file.
ModelConfig load_hf_config(const std::string& path);

// A checkpoint of `config` with random weights drawn from `seed` (see synthetic_seed) and no tokenizer;
// `name` says in logs what it stands for.
Checkpoint synthetic_checkpoint(const ModelConfig& config, const std::string& name, uint64_t seed);

}  // namespace polar
