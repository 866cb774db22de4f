// Writes the fuzz targets' seed corpora into DIR/<target>/ (tests/fuzz/corpus in the repository): small valid
// inputs made with polar's own writers, so that the fuzzers start from files the parsers accept.
//   fuzz_make_corpus DIR
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/half.h"
#include "io/gguf.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "sparse/routers.h"
#include "router_models.h"

#include <unistd.h>

using namespace polar;
using gguf::GGMLType;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

fs::path root;

void put(const std::string& target, const std::string& name, const std::string& bytes) {
  fs::create_directories(root / target);
  std::ofstream f(root / target / name, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  check(f.good(), "cannot write {}", (root / target / name).string());
}

std::string read(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

// Deterministic bytes for block data (a fixed LCG: the corpus must not change from run to run).
std::vector<uint8_t> bytes(size_t n, uint32_t seed) {
  std::vector<uint8_t> out(n);
  for (auto& b : out) b = static_cast<uint8_t>((seed = seed * 1664525u + 1013904223u) >> 24);
  return out;
}

std::vector<uint8_t> f16_values(int64_t n) {
  std::vector<uint8_t> out(static_cast<size_t>(n) * 2);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = f32_to_f16(0.25f * static_cast<float>(i) - 1.0f);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

constexpr GGMLType kSupported[] = {GGMLType::F32,  GGMLType::F16,  GGMLType::BF16, GGMLType::Q8_0, GGMLType::Q4_0,
                                   GGMLType::Q4_1, GGMLType::Q4_K, GGMLType::Q5_K, GGMLType::Q6_K};

// One block's worth of a valid encoding: f16 scales where the format has them, so values stay finite.
std::vector<uint8_t> block_data(GGMLType t, int64_t n) {
  if (t == GGMLType::F16 || t == GGMLType::BF16) return f16_values(n);
  if (t == GGMLType::F32) {
    std::vector<uint8_t> out(static_cast<size_t>(n) * 4);
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(i) / 8;
      std::memcpy(out.data() + 4 * i, &v, 4);
    }
    return out;
  }
  std::vector<uint8_t> out = bytes(gguf::type_nbytes(t, n), static_cast<uint32_t>(t));
  const uint16_t scale = f32_to_f16(0.125f);
  const size_t block = static_cast<size_t>(gguf::type_block_bytes(t));
  const size_t at = t == GGMLType::Q6_K ? 208 : 0;  // Q6_K keeps d last
  for (size_t b = 0; b < out.size(); b += block) {
    std::memcpy(out.data() + b + at, &scale, 2);
    if (t == GGMLType::Q4_1 || t == GGMLType::Q4_K || t == GGMLType::Q5_K) std::memcpy(out.data() + b + 2, &scale, 2);
  }
  return out;
}

std::string gguf_bytes(const gguf::Writer& w) {
  const std::vector<uint8_t> b = w.bytes();
  return {b.begin(), b.end()};
}

void gguf_corpus() {
  for (GGMLType t : kSupported) {
    gguf::Writer w;
    w.set_string("general.name", "fuzz seed");
    const int64_t row = gguf::type_block_elems(t) == 1 ? 8 : gguf::type_block_elems(t);
    w.add_tensor("t", t, {row, 2}, block_data(t, row * 2));
    put("fuzz_gguf", std::string("tensor_") + gguf::type_name(t) + ".gguf", gguf_bytes(w));

    std::string blocks(1, static_cast<char>(&t - kSupported));
    const std::vector<uint8_t> data = block_data(t, row);
    blocks.append(data.begin(), data.end());
    put("fuzz_dequantize", std::string(gguf::type_name(t)), blocks);
  }

  // Every metadata value type the writer has, and an alignment.
  gguf::Writer meta;
  meta.set_u32("general.alignment", 16);
  meta.set_i32("i32", -3);
  meta.set_u64("u64", 1ull << 40);
  meta.set_f32("f32", 0.5f);
  meta.set_bool("bool", true);
  meta.set_strings("strings", {"a", "", "ccc"});
  meta.set_f32s("f32s", {1, 2});
  meta.set_i32s("i32s", {-1, 7});
  meta.add_f32_tensor("a", {4}, {1, 2, 3, 4});
  meta.add_f32_tensor("b", {2, 2}, {5, 6, 7, 8});
  put("fuzz_gguf", "metadata.gguf", gguf_bytes(meta));

  // Tiny Llama-architecture checkpoints with a SentencePiece ("llama") and a byte-level BPE ("gpt2") tokenizer.
  for (const bool spm : {true, false}) {
    gguf::Writer w;
    w.set_string("general.architecture", "llama");
    w.set_u32("llama.embedding_length", 8);
    w.set_u32("llama.block_count", 1);
    w.set_u32("llama.attention.head_count", 2);
    w.set_u32("llama.attention.head_count_kv", 1);
    w.set_u32("llama.feed_forward_length", 16);
    w.set_u32("llama.context_length", 64);
    w.set_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    w.set_f32("llama.rope.freq_base", 10000);
    std::vector<std::string> tokens;
    std::vector<int32_t> types;
    if (spm) {
      w.set_string("tokenizer.ggml.model", "llama");
      tokens = {"<unk>", "<s>", "</s>", "<0x0A>", "<0xFF>", "\xE2\x96\x81", "a", "b", "\xE2\x96\x81" "a", "ab"};
      types = {2, 3, 3, 6, 6, 1, 1, 1, 1, 1};
      w.set_f32s("tokenizer.ggml.scores", {0, 0, 0, 0, 0, -1, -2, -3, -0.5f, -0.7f});
      w.set_u32("tokenizer.ggml.bos_token_id", 1);
      w.set_u32("tokenizer.ggml.eos_token_id", 2);
    } else {
      w.set_string("tokenizer.ggml.model", "gpt2");
      w.set_string("tokenizer.ggml.pre", "llama-bpe");
      tokens = {"a", "b", "\xC4\xA0", "ab", "\xC4\xA0" "a", "<|begin_of_text|>", "<|eot_id|>"};
      types = {1, 1, 1, 1, 1, 3, 3};
      w.set_strings("tokenizer.ggml.merges", {"a b", "\xC4\xA0 a"});
      w.set_u32("tokenizer.ggml.bos_token_id", 5);
      w.set_u32("tokenizer.ggml.eos_token_id", 6);
    }
    w.set_strings("tokenizer.ggml.tokens", tokens);
    w.set_i32s("tokenizer.ggml.token_type", types);
    const auto vocab = static_cast<int64_t>(tokens.size());
    w.add_f32_tensor("token_embd.weight", {8, vocab}, std::vector<float>(8 * vocab, 0.5f));
    w.add_f32_tensor("output_norm.weight", {8}, std::vector<float>(8, 1));
    w.add_tensor("blk.0.attn_q.weight", GGMLType::Q8_0, {32, 8}, block_data(GGMLType::Q8_0, 32 * 8));
    w.add_f32_tensor("blk.0.attn_k.weight", {8, 4}, std::vector<float>(32, 0.25f));
    put("fuzz_gguf", spm ? "llama_spm.gguf" : "llama_bpe.gguf", gguf_bytes(w));
  }
}

void safetensors_corpus(const fs::path& tmp) {
  Tensor a = Tensor::empty(DType::F32, {2, 3}), h = Tensor::empty(DType::F16, {4}), b = Tensor::empty(DType::BF16, {2, 2}),
         i = Tensor::empty(DType::I32, {3}), e = Tensor::empty(DType::U8, {0});
  for (int k = 0; k < 6; ++k) a.data<float>()[k] = static_cast<float>(k) - 2.5f;
  for (int k = 0; k < 4; ++k) h.data<uint16_t>()[k] = f32_to_f16(static_cast<float>(k));
  for (int k = 0; k < 4; ++k) b.data<uint16_t>()[k] = f32_to_bf16(static_cast<float>(-k));
  for (int k = 0; k < 3; ++k) i.data<int32_t>()[k] = k;
  const std::string path = (tmp / "seed.safetensors").string();
  safetensors::write(path, {{"a", a}, {"h", h}, {"b", b}, {"i", i}, {"empty", e}}, {{"format", "pt"}});
  put("fuzz_safetensors", "tensors.safetensors", read(path));
  safetensors::write(path, {{"only", a}});
  put("fuzz_safetensors", "one.safetensors", read(path));
}


void routers_corpus(const fs::path& tmp) {
  for (const bool relu : {true, false}) {
    const ModelConfig c = fuzz::router_model(relu);
    Routers r = random_routers(c, "fuzz", 7, 4);
    const std::string path = (tmp / "seed.routers.safetensors").string();
    save_routers(path, r);
    put("fuzz_routers", relu ? "relu.safetensors" : "gated.safetensors", read(path));
    // With the calibration's head shares.
    for (size_t l = 1; l < r.layers.size(); ++l) {
      r.layers[l].head_share = Tensor::zeros(DType::F32, {c.n_heads});
      r.layers[l].group_share = Tensor::zeros(DType::F32, {c.n_kv_heads});
      r.layers[l].group_share.data<float>()[0] = 1;
    }
    r.attn_recall = {NAN, 0.5, 0.75};
    save_routers(path, r);
    put("fuzz_routers", relu ? "relu_shares.safetensors" : "gated_shares.safetensors", read(path));
  }
}

void config_corpus() {
  const json llama = {{"model_type", "llama"}, {"vocab_size", 32}, {"hidden_size", 16}, {"num_hidden_layers", 2},
                      {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"intermediate_size", 40},
                      {"max_position_embeddings", 64}, {"rms_norm_eps", 1e-6}, {"hidden_act", "silu"},
                      {"bos_token_id", 1}, {"eos_token_id", json::array({2, 3})}, {"tie_word_embeddings", false},
                      {"rope_theta", 10000.0}};
  put("fuzz_model_config", "llama.json", llama.dump(1));
  json llama3 = llama;
  llama3.erase("rope_theta");
  llama3["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "llama3"}, {"factor", 8.0},
                               {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                               {"original_max_position_embeddings", 16}};
  llama3["head_dim"] = 4;
  put("fuzz_model_config", "llama3.json", llama3.dump(1));
  json linear = llama;
  linear["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  linear["attention_bias"] = true;
  linear["mlp_bias"] = true;
  put("fuzz_model_config", "llama_linear.json", linear.dump(1));
  json mistral = llama;
  mistral["model_type"] = "mistral";
  mistral["sliding_window"] = 32;
  put("fuzz_model_config", "mistral.json", mistral.dump(1));
  json qwen2 = llama;
  qwen2["model_type"] = "qwen2";
  qwen2["use_sliding_window"] = true;
  qwen2["sliding_window"] = 16;
  put("fuzz_model_config", "qwen2.json", qwen2.dump(1));
  const json opt = {{"model_type", "opt"}, {"vocab_size", 50}, {"hidden_size", 16}, {"num_hidden_layers", 2},
                    {"num_attention_heads", 4}, {"ffn_dim", 64}, {"max_position_embeddings", 32},
                    {"do_layer_norm_before", true}, {"enable_bias", true}, {"activation_function", "relu"},
                    {"word_embed_proj_dim", 16}, {"bos_token_id", 2}, {"eos_token_id", 2}};
  put("fuzz_model_config", "opt.json", opt.dump(1));
  json opt350 = opt;
  opt350["do_layer_norm_before"] = false;
  opt350["word_embed_proj_dim"] = 8;
  opt350["_remove_final_layer_norm"] = false;
  put("fuzz_model_config", "opt_postln_proj.json", opt350.dump(1));
}

void tokenizer_corpus() {
  const std::string sep = "\n=====\n";
  // Byte-level vocabulary: "Ġ" (U+0120) is the space byte in GPT-2's alphabet.
  const json vocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"\xC4\xA0", 3}, {"ab", 4}, {"\xC4\xA0" "a", 5}, {"1", 6},
                      {"<|endoftext|>", 7}};
  const json tokenizer = {
      {"version", "1.0"},
      {"added_tokens", {{{"id", 8}, {"content", "<|im_start|>"}, {"special", true}},
                        {{"id", 9}, {"content", "<tool>"}, {"special", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "\\p{N}{1,3}"}}}, {"behavior", "Isolated"},
                            {"invert", false}},
                           {{"type", "Digits"}, {"individual_digits", true}},
                           {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"}, {"single", {{{"SpecialToken", {{"id", "<|endoftext|>"}, {"type_id", 0}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"ignore_merges", false},
                 {"vocab", vocab}, {"merges", {"a b", json::array({"\xC4\xA0", "a"})}}}}};
  const json tokenizer_config = {{"add_bos_token", false}, {"eos_token", "<|endoftext|>"},
                                 {"bos_token", {{"content", "<|endoftext|>"}, {"special", true}}}};
  const json special_tokens_map = {{"unk_token", "<|endoftext|>"}};
  const json config = {{"bos_token_id", 7}, {"eos_token_id", json::array({7, 8})}};
  put("fuzz_tokenizer_hf", "tokenizer_json",
      "j" + tokenizer.dump() + sep + tokenizer_config.dump() + sep + special_tokens_map.dump() + sep + config.dump());
  put("fuzz_tokenizer_hf", "tokenizer_json_alone", "j" + tokenizer.dump(1));
  const json added = {{"add_prefix_space", true},
                      {"added_tokens_decoder", {{"8", {{"content", "<|im_start|>"}, {"special", true}}}}}};
  put("fuzz_tokenizer_hf", "vocab_merges",
      "v" + vocab.dump() + sep + "#version: 0.2\na b\n\xC4\xA0 a\r\n" + sep + added.dump() + sep +
          special_tokens_map.dump() + sep + config.dump());

  put("fuzz_tokenize", "english", "Hello world, the cat sat on the mat. It's 2026!\n");
  put("fuzz_tokenize", "specials", "<s>Once upon a time</s><|begin_of_text|>there <|eot_id|> was\t\ta  dog");
  static constexpr char kBytes[] = "caf\xC3\xA9 \xE2\x96\x81 \xF0\x9F\x98\x80 \xFF\xFE\x00 \xC3";  // a NUL, a cut-off character
  put("fuzz_tokenize", "bytes", std::string(kBytes, sizeof(kBytes) - 1));
}

void tasks_corpus() {
  put("fuzz_tasks", "multiple_choice.jsonl",
      "{\"query\": \"The sky is\", \"choices\": [\"blue\", \"green\"], \"gold\": 0}\n\n"
      "{\"query\": \"Two plus two is\", \"choices\": [\"three\", \"four\", \"five\"], \"gold\": 1}\n");
  put("fuzz_tasks", "schema.jsonl",
      "{\"context_options\": [\"The cup fell because it\", \"The table fell because it\"], \"continuation\": "
      "\"was pushed.\", \"gold\": 0}\n");
  put("fuzz_tasks", "language_modeling.jsonl",
      "{\"context\": \"Once upon a\", \"continuation\": \"time\"}\r\n{\"context\": \"\", \"continuation\": \"x\"}\n");
  put("fuzz_tasks", "rte.jsonl",
      "{\"premise\": \"A dog runs.\", \"hypothesis\": \"An animal moves.\", \"label\": \"entailment\"}\n"
      "{\"premise\": \"A dog sleeps.\", \"hypothesis\": \"A cat runs.\", \"label\": \"not_entailment\"}\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  try {
    root = argv[1];
    const fs::path tmp = fs::temp_directory_path() / ("polar-make-corpus-" + std::to_string(::getpid()));
    fs::create_directories(tmp);
    gguf_corpus();
    safetensors_corpus(tmp);
    routers_corpus(tmp);
    config_corpus();
    tokenizer_corpus();
    tasks_corpus();
    fs::remove_all(tmp);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
