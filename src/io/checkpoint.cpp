#include "io/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include <fmt/format.h>

#include "io/chat_template.h"
#include "io/gguf.h"
#include "io/json.h"
#include "io/safetensors.h"

namespace polar {

namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t Checkpoint::n_params() const {
  int64_t n = 0;
  for (auto& [name, t] : tensors) n += t.numel();
  return n;
}

const Tensor& Checkpoint::get(const std::string& name, const Shape& shape) const {
  auto it = tensors.find(name);
  check(it != tensors.end(), "{}: missing tensor '{}'", path, name);
  check(it->second.shape() == shape, "{}: tensor '{}' has shape {} but the config implies {}", path, name,
        shape_str(it->second.shape()), shape_str(shape));
  return it->second;
}

Tensor Checkpoint::get_optional(const std::string& name, const Shape& shape) const {
  return tensors.count(name) ? get(name, shape) : Tensor();
}

bool Checkpoint::has(const std::string& name) const {
  if (synthetic_seed) return name != "lm_head.weight" || !config.tie_embeddings;
  return tensors.count(name) != 0;
}

namespace {

json read_json(const fs::path& p) {
  std::ifstream f(p);
  check(f.good(), "cannot read {}", p.string());
  try {
    return parse_json(f);
  } catch (const json::exception& e) {
    fail("{}: malformed JSON: {}", p.string(), e.what());
  }
}

std::string summarize_types(const std::map<std::string, int>& counts) {
  std::string s;
  for (auto& [type, n] : counts) s += fmt::format("{}{} x{}", s.empty() ? "" : ", ", type, n);
  return s;
}

Checkpoint load_hf_dir(const fs::path& dir, bool with_tensors) {
  Checkpoint ck;
  ck.path = dir.string();
  ck.format = "safetensors";
  ck.config = load_hf_config((dir / "config.json").string());
  std::vector<fs::path> shards;
  if (fs::exists(dir / "model.safetensors")) {
    shards.push_back(dir / "model.safetensors");
  } else if (fs::exists(dir / "model.safetensors.index.json")) {
    json index = read_json(dir / "model.safetensors.index.json");
    check(index.contains("weight_map") && index["weight_map"].is_object(), "{}: no weight_map",
          (dir / "model.safetensors.index.json").string());
    std::set<std::string> files;
    for (auto& [name, file] : index["weight_map"].items()) {
      check(file.is_string(), "{}: weight_map entry for '{}' is not a file name", dir.string(), name);
      std::string fname = file.get<std::string>();
      check(fname.find('/') == std::string::npos, "{}: shard name '{}' must be a plain file name", dir.string(), fname);
      files.insert(fname);
    }
    for (auto& fname : files) shards.push_back(dir / fname);
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir.string());
  }
  std::map<std::string, int> types;
  for (auto& shard : shards) {
    safetensors::File f = safetensors::File::open(shard.string());
    for (auto& t : f.tensors()) {
      check(!ck.tensors.count(t.name), "{}: tensor '{}' appears in more than one shard", dir.string(), t.name);
      if (with_tensors) ck.tensors[t.name] = f.load_f32(t);
      types[dtype_name(t.dtype)]++;
    }
  }
  ck.weight_types = summarize_types(types);
  // HF checkpoints carry tokenizers as separate files; a directory without them simply has none.
  if (fs::exists(dir / "tokenizer.json") || fs::exists(dir / "vocab.json")) ck.tokenizer = load_tokenizer_dir(dir.string());
  ck.chat_template = chat_template_from_hf_dir(dir.string());
  return ck;
}

// GGUF "llama" q/k rows are interleaved pairs within each head (row 2i and 2i+1 rotate together); HF's
// rotate-half layout pairs row i with row i + head_dim/2. Row r = 2i + half of a head maps to half*hd/2 + i.
Tensor unpermute_rope_rows(const Tensor& w, int64_t n_heads, int64_t head_dim) {
  const int64_t cols = w.numel() / w.dim(0);
  check(w.dim(0) == n_heads * head_dim, "rope row permutation: {} rows for {} heads of dim {}", w.dim(0), n_heads, head_dim);
  Tensor out = Tensor::empty(DType::F32, w.shape());
  const float* src = w.data<float>();
  float* dst = out.data<float>();
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t r = 0; r < head_dim; ++r) {
      int64_t dst_row = h * head_dim + (r % 2) * (head_dim / 2) + r / 2;
      std::memcpy(dst + dst_row * cols, src + (h * head_dim + r) * cols, cols * sizeof(float));
    }
  return out;
}

ModelConfig config_from_gguf(const gguf::File& f) {
  ModelConfig c;
  std::string arch = f.get_string("general.architecture");
  auto key = [&](const char* k) { return arch + "." + k; };
  if (arch == "llama" || arch == "mistral" || arch == "qwen2") {
    c.model_type = arch;
    c.family = Family::Llama;
  } else {
    fail("{}: unsupported GGUF architecture '{}' (supported: llama, mistral, qwen2)", f.path(), arch);
  }
  // Sizes are bounded as well as positive, so that the products the loader forms from them (heads x head
  // dim, rows x columns) cannot overflow on a corrupt or hostile file before the tensor shapes are checked.
  // 2^24 is far above any real model's width, head count, layer count or vocabulary; positions are I32.
  auto dimension = [&](const std::string& k, int64_t most = int64_t(1) << 24) {
    int64_t v = f.get_int(k);
    check(v > 0 && v <= most, "{}: metadata {} must be in [1, {}], got {}", f.path(), k, most, v);
    return v;
  };
  c.hidden = dimension(key("embedding_length"));
  c.n_layers = dimension(key("block_count"));
  c.n_heads = dimension(key("attention.head_count"));
  c.n_kv_heads = f.has(key("attention.head_count_kv")) ? dimension(key("attention.head_count_kv")) : c.n_heads;
  check(c.n_heads % c.n_kv_heads == 0, "{}: head_count {} is not a multiple of head_count_kv {}", f.path(), c.n_heads,
        c.n_kv_heads);
  c.head_dim = f.has(key("attention.key_length")) ? dimension(key("attention.key_length")) : c.hidden / c.n_heads;
  if (f.has(key("rope.dimension_count")))
    check(f.get_int(key("rope.dimension_count")) == c.head_dim, "{}: partial rotary embeddings are not supported",
          f.path());
  c.ffn = dimension(key("feed_forward_length"));
  c.max_positions = dimension(key("context_length"), std::numeric_limits<int32_t>::max());
  c.norm_eps = f.get_float(key("attention.layer_norm_rms_epsilon"));
  c.rope.theta = f.find_float(key("rope.freq_base")).value_or(10000.0);
  if (f.has(key("rope.scaling.type"))) {
    std::string type = f.get_string(key("rope.scaling.type"));
    if (type == "linear") {
      c.rope.scaling = RopeScaling::Linear;
      c.rope.factor = f.get_float(key("rope.scaling.factor"));
    } else {
      check(type == "none", "{}: unsupported RoPE scaling type '{}'", f.path(), type);
    }
  }
  c.qkv_bias = f.find("blk.0.attn_q.bias") != nullptr;
  c.tie_embeddings = f.find("output.weight") == nullptr;
  if (f.has("tokenizer.ggml.tokens")) c.vocab_size = static_cast<int64_t>(f.metadata()["tokenizer.ggml.tokens"].size());
  if (f.has(key("vocab_size"))) c.vocab_size = dimension(key("vocab_size"));
  check(c.vocab_size > 0, "{}: vocabulary size unknown (no {}.vocab_size and no tokenizer)", f.path(), arch);
  c.bos_id = f.find_token_id("tokenizer.ggml.bos_token_id").value_or(-1);
  c.eos_id = f.find_token_id("tokenizer.ggml.eos_token_id").value_or(-1);
  return c;
}

// GGUF tensor name -> HF name, for the tensors of the Llama family.
std::string hf_name(const std::string& g) {
  static const std::map<std::string, std::string> top = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  static const std::map<std::string, std::string> block = {
      {"attn_norm.weight", "input_layernorm.weight"},  {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"attn_q.weight", "self_attn.q_proj.weight"},    {"attn_q.bias", "self_attn.q_proj.bias"},
      {"attn_k.weight", "self_attn.k_proj.weight"},    {"attn_k.bias", "self_attn.k_proj.bias"},
      {"attn_v.weight", "self_attn.v_proj.weight"},    {"attn_v.bias", "self_attn.v_proj.bias"},
      {"attn_output.weight", "self_attn.o_proj.weight"}, {"ffn_gate.weight", "mlp.gate_proj.weight"},
      {"ffn_up.weight", "mlp.up_proj.weight"},         {"ffn_down.weight", "mlp.down_proj.weight"},
  };
  if (auto it = top.find(g); it != top.end()) return it->second;
  if (g.rfind("blk.", 0) == 0) {
    size_t dot = g.find('.', 4);
    if (dot != std::string::npos) {
      std::string layer = g.substr(4, dot - 4);
      if (auto it = block.find(g.substr(dot + 1)); it != block.end())
        return "model.layers." + layer + "." + it->second;
    }
  }
  return "";
}

Checkpoint load_gguf(const std::string& path, bool with_tensors) {
  gguf::File f = gguf::File::open(path);
  Checkpoint ck;
  ck.path = path;
  ck.format = "gguf";
  ck.config = config_from_gguf(f);
  const ModelConfig& c = ck.config;
  std::map<std::string, int> types;
  for (auto& t : f.tensors()) {
    types[gguf::type_name(t.type)]++;
    if (t.name == "rope_freqs.weight") {  // Llama 3.1 GGUFs store the llama3 scaling as per-frequency divisors
      Tensor v = f.load_f32(t);
      ck.config.rope.freq_factors.assign(v.data<float>(), v.data<float>() + v.numel());
      continue;
    }
    std::string name = hf_name(t.name);
    check(!name.empty(), "{}: unexpected tensor '{}'", path, t.name);
    if (!with_tensors) continue;
    Tensor w = f.load_f32(t);
    // llama.cpp's converter permutes q/k rows into interleaved order for arch "llama" (Mistral included);
    // qwen2 files keep the rotate-half order.
    bool is_q = t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_q.bias");
    bool is_k = t.name.ends_with("attn_k.weight") || t.name.ends_with("attn_k.bias");
    if (c.model_type != "qwen2" && (is_q || is_k)) w = unpermute_rope_rows(w, is_q ? c.n_heads : c.n_kv_heads, c.head_dim);
    ck.tensors[name] = w;
  }
  ck.weight_types = summarize_types(types);
  if (f.has("tokenizer.ggml.model")) ck.tokenizer = load_tokenizer(f);
  if (f.has("tokenizer.chat_template")) ck.chat_template = f.get_string("tokenizer.chat_template");
  return ck;
}

Checkpoint load_any(const std::string& path, bool with_tensors) {
  fs::path p(path);
  check(fs::exists(p), "model path {} does not exist", path);
  if (fs::is_directory(p)) return load_hf_dir(p, with_tensors);
  char magic[4] = {};
  std::ifstream f(p, std::ios::binary);
  f.read(magic, 4);
  if (f.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0) return load_gguf(path, with_tensors);
  if (p.filename() == "config.json" || p.extension() == ".safetensors") return load_hf_dir(p.parent_path(), with_tensors);
  fail("{}: unknown model format (expected a Hugging Face directory or a GGUF file)", path);
}

}  // namespace

Checkpoint load_checkpoint(const std::string& path) { return load_any(path, /*with_tensors=*/true); }
Checkpoint load_checkpoint_metadata(const std::string& path) { return load_any(path, /*with_tensors=*/false); }

ModelConfig load_hf_config(const std::string& path) { return config_from_hf(read_json(path), path); }

Checkpoint synthetic_checkpoint(const ModelConfig& config, const std::string& name, uint64_t seed) {
  Checkpoint ck;
  ck.path = name;
  ck.format = "synthetic";
  ck.weight_types = fmt::format("random, seed {}", seed);
  ck.config = config;
  ck.synthetic_seed = seed;
  return ck;
}

}  // namespace polar
