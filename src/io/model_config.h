// ModelConfig: one description for every supported architecture, parsed from a Hugging Face config.json
// or from GGUF metadata. Model code reads only this, never the source format.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace polar {

enum class Family { OPT, Llama };  // Llama covers llama, mistral and qwen2
enum class NormKind { LayerNorm, RMSNorm };
enum class RopeScaling { None, Linear, Llama3 };

struct RopeConfig {
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::None;
  double factor = 1.0;               // linear and llama3
  double low_freq_factor = 1.0;      // llama3
  double high_freq_factor = 4.0;     // llama3
  int64_t original_max_positions = 8192;  // llama3
  // Per-frequency divisors given explicitly (GGUF rope_freqs.weight); overrides `scaling` when present.
  std::vector<float> freq_factors;
};

struct ModelConfig {
  std::string model_type;  // "opt", "llama", "mistral", "qwen2"
  Family family = Family::Llama;
  int64_t vocab_size = 0;
  int64_t hidden = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t ffn = 0;
  int64_t max_positions = 0;  // longest context the model supports
  double norm_eps = 1e-5;
  NormKind norm = NormKind::RMSNorm;
  bool pre_norm = true;        // OPT do_layer_norm_before; false = post-LN (OPT-350m)
  bool gated_mlp = true;       // SwiGLU (silu(gate) * up); false = ReLU MLP (OPT)
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  bool tie_embeddings = false;
  bool final_norm = true;      // OPT post-LN has none
  int64_t word_embed_proj_dim = 0;  // OPT: embedding width; != hidden means project_in/out exist
  int64_t position_offset = 0;      // OPT learned positions are stored offset by 2
  int64_t sliding_window = 0;       // 0 = full attention
  RopeConfig rope;                  // Llama family only
  int32_t bos_id = -1;
  int32_t eos_id = -1;

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  int64_t embed_dim() const { return word_embed_proj_dim ? word_embed_proj_dim : hidden; }
  std::string describe() const;  // one line for logs and `polar info`
};

// From the parsed config.json of a Hugging Face checkpoint. Unknown model types, missing or inconsistent
// fields and unsupported RoPE scalings are polar::Errors naming the field.
ModelConfig config_from_hf(const nlohmann::json& cfg, const std::string& source);

// RoPE inverse frequencies [head_dim / 2] (float32, computed as transformers does), scaling applied.
std::vector<float> rope_inv_freq(const ModelConfig& cfg);

}  // namespace polar
