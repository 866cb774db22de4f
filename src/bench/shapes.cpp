#include "bench/shapes.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"

namespace polar {

namespace {

struct ShapePreset {
  const char* name;
  const char* hf_config;  // the fields of the model's config.json that shape it
};

// From the models' config.json on the Hugging Face hub. Llama-3-8B has no RoPE scaling; Llama-3.1-8B
// adds the llama3 scaling and 128k positions. Mistral is v0.1 (4096-token sliding window).
constexpr ShapePreset kShapes[] = {
    {"opt-6.7b", R"({"model_type": "opt", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
       "ffn_dim": 16384, "word_embed_proj_dim": 4096, "vocab_size": 50272, "max_position_embeddings": 2048,
       "do_layer_norm_before": true, "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2})"},
    {"opt-13b", R"({"model_type": "opt", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
       "ffn_dim": 20480, "word_embed_proj_dim": 5120, "vocab_size": 50272, "max_position_embeddings": 2048,
       "do_layer_norm_before": true, "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2})"},
    {"opt-30b", R"({"model_type": "opt", "hidden_size": 7168, "num_hidden_layers": 48, "num_attention_heads": 56,
       "ffn_dim": 28672, "word_embed_proj_dim": 7168, "vocab_size": 50272, "max_position_embeddings": 2048,
       "do_layer_norm_before": true, "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2})"},
    // OPT-66B and Llama-3.1-70B, the paper's tensor- and pipeline-parallel models: larger than one GPU.
    {"opt-66b", R"({"model_type": "opt", "hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72,
       "ffn_dim": 36864, "word_embed_proj_dim": 9216, "vocab_size": 50272, "max_position_embeddings": 2048,
       "do_layer_norm_before": true, "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2})"},
    {"llama-2-7b", R"({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096,
       "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false, "bos_token_id": 1,
       "eos_token_id": 2})"},
    {"llama-2-13b", R"({"model_type": "llama", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
       "num_key_value_heads": 40, "intermediate_size": 13824, "vocab_size": 32000, "max_position_embeddings": 4096,
       "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false, "bos_token_id": 1,
       "eos_token_id": 2})"},
    {"llama-3-8b", R"({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
       "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false, "bos_token_id": 128000,
       "eos_token_id": 128001})"},
    {"llama-3.1-8b", R"({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
       "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
       "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
       "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001})"},
    {"llama-3.1-70b", R"({"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
       "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
       "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling":
       {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
       "original_max_position_embeddings": 8192}, "tie_word_embeddings": false, "bos_token_id": 128000,
       "eos_token_id": 128001})"},
    {"mistral-7b", R"({"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "max_position_embeddings": 32768,
       "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
       "bos_token_id": 1, "eos_token_id": 2})"},
    {"qwen2.5-7b", R"({"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
       "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 131072,
       "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "use_sliding_window": false, "sliding_window": 131072,
       "tie_word_embeddings": false, "bos_token_id": 151643, "eos_token_id": 151643})"},
    // Tiny shapes that run on the CPU in tests.
    {"tiny-llama", R"({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 256,
       "tie_word_embeddings": false})"},
    {"tiny-opt", R"({"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "ffn_dim": 256, "vocab_size": 256, "max_position_embeddings": 128})"},
};

}  // namespace

std::vector<std::string> shape_names() {
  std::vector<std::string> names;
  for (const ShapePreset& s : kShapes) names.push_back(s.name);
  return names;
}

ModelConfig shape_config(const std::string& name) {
  for (const ShapePreset& s : kShapes)
    if (name == s.name) return config_from_hf(nlohmann::json::parse(s.hf_config), "shape " + name);
  fail("unknown shape '{}' (known: {})", name, fmt::join(shape_names(), ", "));
}

}  // namespace polar
