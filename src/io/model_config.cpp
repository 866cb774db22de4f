#include "io/model_config.h"

#include <cmath>

#include <fmt/format.h>

#include "core/error.h"

namespace polar {

namespace {

using json = nlohmann::json;

// Reads a field that must be present and numeric/boolean; `source` names the file in errors.
struct Fields {
  const json& j;
  const std::string& source;

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }
  int64_t integer(const char* key) const {
    check(has(key), "{}: missing field '{}'", source, key);
    check(j[key].is_number_integer(), "{}: field '{}' must be an integer", source, key);
    int64_t v = j[key].get<int64_t>();
    check(v > 0, "{}: field '{}' must be positive, got {}", source, key, v);
    return v;
  }
  int64_t integer_or(const char* key, int64_t dflt) const { return has(key) ? integer(key) : dflt; }
  double number_or(const char* key, double dflt) const {
    if (!has(key)) return dflt;
    check(j[key].is_number(), "{}: field '{}' must be a number", source, key);
    return j[key].get<double>();
  }
  std::string string_or(const char* key, const std::string& dflt) const {
    if (!has(key)) return dflt;
    check(j[key].is_string(), "{}: field '{}' must be a string", source, key);
    return j[key].get<std::string>();
  }
  bool boolean_or(const char* key, bool dflt) const {
    if (!has(key)) return dflt;
    check(j[key].is_boolean(), "{}: field '{}' must be true or false", source, key);
    return j[key].get<bool>();
  }
  // bos/eos may be a single id or a list (Llama 3 lists several EOS ids); take the first.
  int32_t token_id(const char* key) const {
    if (!has(key)) return -1;
    const json& v = j[key].is_array() && !j[key].empty() ? j[key][0] : j[key];
    return v.is_number_integer() ? v.get<int32_t>() : -1;
  }
};

// RoPE settings: transformers 5 writes them under "rope_parameters" (theta included); older checkpoints
// use "rope_theta" + "rope_scaling".
RopeConfig parse_rope(const Fields& f) {
  RopeConfig r;
  const json* scaling = nullptr;
  if (f.has("rope_parameters")) {
    const json& p = f.j["rope_parameters"];
    check(p.is_object(), "{}: rope_parameters must be an object", f.source);
    r.theta = Fields{p, f.source}.number_or("rope_theta", r.theta);
    scaling = &p;
  } else {
    r.theta = f.number_or("rope_theta", 10000.0);
    if (f.has("rope_scaling")) scaling = &f.j["rope_scaling"];
  }
  if (!scaling) return r;
  check(scaling->is_object(), "{}: rope scaling must be an object", f.source);
  Fields s{*scaling, f.source};
  std::string type = s.string_or("rope_type", s.string_or("type", "default"));
  if (type == "default") return r;
  if (type == "linear") {
    r.scaling = RopeScaling::Linear;
    r.factor = s.number_or("factor", 1.0);
  } else if (type == "llama3") {
    r.scaling = RopeScaling::Llama3;
    r.factor = s.number_or("factor", 8.0);
    r.low_freq_factor = s.number_or("low_freq_factor", 1.0);
    r.high_freq_factor = s.number_or("high_freq_factor", 4.0);
    r.original_max_positions = s.integer_or("original_max_position_embeddings", 8192);
    check(r.high_freq_factor > r.low_freq_factor, "{}: llama3 rope needs high_freq_factor > low_freq_factor", f.source);
  } else {
    fail("{}: unsupported RoPE scaling type '{}' (supported: default, linear, llama3)", f.source, type);
  }
  check(r.factor > 0, "{}: rope scaling factor must be positive", f.source);
  return r;
}

}  // namespace

ModelConfig config_from_hf(const json& cfg, const std::string& source) {
  check(cfg.is_object(), "{}: config is not a JSON object", source);
  Fields f{cfg, source};
  check(cfg.contains("model_type") && cfg["model_type"].is_string(), "{}: missing field 'model_type'", source);
  ModelConfig c;
  c.model_type = cfg["model_type"].get<std::string>();
  c.vocab_size = f.integer("vocab_size");
  c.hidden = f.integer("hidden_size");
  c.n_layers = f.integer("num_hidden_layers");
  c.n_heads = f.integer("num_attention_heads");
  c.bos_id = f.token_id("bos_token_id");
  c.eos_id = f.token_id("eos_token_id");
  c.tie_embeddings = f.boolean_or("tie_word_embeddings", c.model_type == "opt");
  if (c.model_type == "opt") {
    c.family = Family::OPT;
    c.n_kv_heads = c.n_heads;
    check(c.hidden % c.n_heads == 0, "{}: hidden_size {} is not divisible by num_attention_heads {}", source, c.hidden,
          c.n_heads);
    c.head_dim = c.hidden / c.n_heads;
    c.ffn = f.integer("ffn_dim");
    c.max_positions = f.integer("max_position_embeddings");
    c.norm = NormKind::LayerNorm;
    c.norm_eps = 1e-5;  // OPT's LayerNorms use torch's default epsilon
    c.pre_norm = f.boolean_or("do_layer_norm_before", true);
    c.final_norm = c.pre_norm && !f.boolean_or("_remove_final_layer_norm", false);
    c.gated_mlp = false;
    bool bias = f.boolean_or("enable_bias", true);
    c.qkv_bias = c.o_bias = c.mlp_bias = bias;
    check(f.boolean_or("layer_norm_elementwise_affine", true), "{}: OPT without LayerNorm affine parameters is not supported",
          source);
    std::string act = f.string_or("activation_function", "relu");
    check(act == "relu", "{}: OPT activation '{}' is not supported (only relu)", source, act);
    c.word_embed_proj_dim = f.integer_or("word_embed_proj_dim", c.hidden);
    if (c.word_embed_proj_dim == c.hidden) c.word_embed_proj_dim = 0;
    c.position_offset = 2;
    c.tie_embeddings = true;  // OPTForCausalLM always ties lm_head to the token embedding
  } else if (c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2") {
    c.family = Family::Llama;
    c.n_kv_heads = f.integer_or("num_key_value_heads", c.n_heads);
    check(c.n_heads % c.n_kv_heads == 0, "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", source,
          c.n_heads, c.n_kv_heads);
    c.head_dim = f.integer_or("head_dim", c.hidden / c.n_heads);
    c.ffn = f.integer("intermediate_size");
    c.max_positions = f.integer("max_position_embeddings");
    c.norm_eps = f.number_or("rms_norm_eps", 1e-6);
    std::string act = f.string_or("hidden_act", "silu");
    check(act == "silu", "{}: activation '{}' is not supported (only silu)", source, act);
    if (c.model_type == "qwen2") {
      c.qkv_bias = true;
      if (f.boolean_or("use_sliding_window", false)) c.sliding_window = f.integer_or("sliding_window", 0);
    } else {
      c.qkv_bias = c.o_bias = f.boolean_or("attention_bias", false);
      c.mlp_bias = f.boolean_or("mlp_bias", false);
      if (c.model_type == "mistral") c.sliding_window = f.integer_or("sliding_window", 0);
    }
    c.rope = parse_rope(f);
  } else {
    fail("{}: unsupported model_type '{}' (supported: opt, llama, mistral, qwen2)", source, c.model_type);
  }
  return c;
}

std::vector<float> rope_inv_freq(const ModelConfig& cfg) {
  const int64_t half = cfg.head_dim / 2;
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // transformers: 1 / theta ** (arange(0, dim, 2).float() / dim), in float32.
    float expo = static_cast<float>(2 * i) / static_cast<float>(cfg.head_dim);
    inv[i] = 1.0f / std::pow(static_cast<float>(cfg.rope.theta), expo);
  }
  const RopeConfig& r = cfg.rope;
  if (!r.freq_factors.empty()) {
    check(static_cast<int64_t>(r.freq_factors.size()) == half, "rope frequency factors have {} entries, expected {}",
          r.freq_factors.size(), half);
    for (int64_t i = 0; i < half; ++i) inv[i] /= r.freq_factors[i];
    return inv;
  }
  if (r.scaling == RopeScaling::Linear) {
    for (float& v : inv) v = static_cast<float>(v / r.factor);
  } else if (r.scaling == RopeScaling::Llama3) {
    const double low_wavelen = r.original_max_positions / r.low_freq_factor;
    const double high_wavelen = r.original_max_positions / r.high_freq_factor;
    for (float& v : inv) {
      const double wavelen = 2 * M_PI / v;
      if (wavelen > low_wavelen) {
        v = static_cast<float>(v / r.factor);  // long wavelengths: fully interpolated
      } else if (wavelen >= high_wavelen) {   // medium: blend between interpolated and original
        double smooth = (r.original_max_positions / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        v = static_cast<float>((1 - smooth) * v / r.factor + smooth * v);
      }
    }
  }
  return inv;
}

std::string ModelConfig::describe() const {
  std::string s = fmt::format("{} layers={} hidden={} heads={} kv_heads={} head_dim={} ffn={} vocab={} max_ctx={}",
                              model_type, n_layers, hidden, n_heads, n_kv_heads, head_dim, ffn, vocab_size, max_positions);
  if (family == Family::OPT) s += fmt::format(" {}", pre_norm ? "pre-LN" : "post-LN");
  if (word_embed_proj_dim) s += fmt::format(" embed_proj={}", word_embed_proj_dim);
  if (family == Family::Llama) {
    s += fmt::format(" rope_theta={}", rope.theta);
    if (rope.scaling == RopeScaling::Linear) s += fmt::format(" rope=linear(x{})", rope.factor);
    if (rope.scaling == RopeScaling::Llama3) s += fmt::format(" rope=llama3(x{})", rope.factor);
  }
  if (sliding_window) s += fmt::format(" window={}", sliding_window);
  return s;
}

}  // namespace polar
