// Checkpoint loading: Hugging Face directories built in a TempDir from the llama_mha fixture (broken in one
// way each, sharded, stored as fp16/bf16), RoPE config styles, and the two copies of stories260K (GGUF with
// interleaved q/k rows, safetensors with rotate-half rows) against each other and REFERENCE.md.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/half.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;
using json = nlohmann::json;
using test::shared_path;
using test::TempDir;

namespace {

using TensorList = std::vector<std::pair<std::string, Tensor>>;

// A fixture checkpoint as editable parts: config.json and the tensors (views of the fixture's file).
struct Parts {
  json config;
  TensorList tensors;
};

Parts read_parts(const std::string& fixture) {
  const std::string dir = shared_path("fixtures/hf/" + fixture);
  Parts p;
  std::ifstream(dir + "/config.json") >> p.config;
  safetensors::File f = safetensors::File::open(dir + "/model.safetensors");
  for (auto& t : f.tensors()) p.tensors.emplace_back(t.name, f.view(t));
  return p;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// Writes config.json + model.safetensors into a new directory `name` under tmp; returns its path.
std::string write_dir(const TempDir& tmp, const std::string& name, const Parts& p) {
  const std::string dir = tmp.path(name);
  std::filesystem::create_directories(dir);
  write_text(dir + "/config.json", p.config.dump(2));
  safetensors::write(dir + "/model.safetensors", p.tensors);
  return dir;
}

// Loads the checkpoint and builds the model (which validates every tensor): the polar::Error message, or "".
std::string load_error(const std::string& path) {
  try {
    Checkpoint ck = load_checkpoint(path);
    auto backend = make_cpu_backend();
    make_model(ck, *backend);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Logits of every position of `ids` fed as one sequence.
Tensor logits_of(const Checkpoint& ck, const std::vector<int32_t>& ids) {
  auto backend = make_cpu_backend();
  auto model = make_model(ck, *backend);
  Engine engine(*model, {.kv_tokens = static_cast<int64_t>(ids.size())});
  return engine.step({{engine.add_sequence(), ids}}, /*all_logits=*/true);
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double m = 0;
  for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i)
    m = std::max(m, double(std::fabs(a.data<float>()[i] - b.data<float>()[i])));
  return m;
}

double max_abs(const Tensor& a) {
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, double(std::fabs(a.data<float>()[i])));
  return m;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

const std::vector<int32_t> kIds = {1, 17, 300, 5, 42, 511, 0, 99, 256, 7, 7, 130};

// ---- One way of breaking a checkpoint per case; each must give an Error naming the problem.

struct BadCheckpoint {
  std::string name;
  std::function<void(Parts&)> edit;
  std::vector<std::string> expect;  // substrings of the message
};

void PrintTo(const BadCheckpoint& b, std::ostream* os) { *os << b.name; }

void erase_tensor(Parts& p, const std::string& name) {
  std::erase_if(p.tensors, [&](auto& kv) { return kv.first == name; });
}

std::vector<BadCheckpoint> bad_checkpoints() {
  std::vector<BadCheckpoint> cases = {
      {"MissingTensor", [](Parts& p) { erase_tensor(p, "model.layers.1.mlp.up_proj.weight"); },
       {"missing tensor 'model.layers.1.mlp.up_proj.weight'"}},
      {"MissingUntiedLmHead", [](Parts& p) { erase_tensor(p, "lm_head.weight"); }, {"missing tensor 'lm_head.weight'"}},
      {"WrongShape",
       [](Parts& p) {
         erase_tensor(p, "model.layers.0.self_attn.k_proj.weight");
         p.tensors.emplace_back("model.layers.0.self_attn.k_proj.weight", Tensor::zeros(DType::F32, {32, 64}));
       },
       {"tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 64] but the config implies [64, 64]"}},
      {"UnknownModelType", [](Parts& p) { p.config["model_type"] = "gpt_neox"; },
       {"config.json", "unsupported model_type 'gpt_neox'"}},
      {"RopeYarnNewStyle",
       [](Parts& p) { p.config["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 1e4}}; },
       {"config.json", "unsupported RoPE scaling type 'yarn'"}},
      {"RopeYarnOldStyle",
       [](Parts& p) {
         p.config.erase("rope_parameters");
         p.config["rope_theta"] = 1e4;
         p.config["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
       },
       {"unsupported RoPE scaling type 'yarn'"}},
      {"NonPositiveField", [](Parts& p) { p.config["hidden_size"] = 0; }, {"field 'hidden_size' must be positive"}},
      {"FieldOfWrongType", [](Parts& p) { p.config["num_hidden_layers"] = "3"; },
       {"field 'num_hidden_layers' must be an integer"}},
      {"HeadsNotMultipleOfKvHeads", [](Parts& p) { p.config["num_key_value_heads"] = 3; }, {"not a multiple"}},
      {"UnsupportedActivation", [](Parts& p) { p.config["hidden_act"] = "gelu"; }, {"activation 'gelu'"}},
      // Fields of the wrong JSON type are polar::Errors naming the field, not JSON library exceptions.
      {"RopeThetaNotNumber", [](Parts& p) { p.config["rope_parameters"]["rope_theta"] = "1e4"; },
       {"field 'rope_theta' must be a number"}},
      {"RopeTypeNotString", [](Parts& p) { p.config["rope_parameters"]["rope_type"] = 3; },
       {"field 'rope_type' must be a string"}},
      {"ActivationNotString", [](Parts& p) { p.config["hidden_act"] = json::array({"silu"}); },
       {"field 'hidden_act' must be a string"}},
      {"ConfigNotObject", [](Parts& p) { p.config = json::array({1, 2}); }, {"config is not a JSON object"}},
  };
  // Every required field, removed in turn, is named in the error.
  for (const char* field : {"model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "max_position_embeddings"})
    cases.push_back({std::string("Missing_") + field, [field](Parts& p) { p.config.erase(field); },
                     {"config.json", std::string("missing field '") + field + "'"}});
  return cases;
}

class CheckpointBadInput : public ::testing::TestWithParam<BadCheckpoint> {};

TEST_P(CheckpointBadInput, GivesErrorNamingTheProblem) {
  TempDir tmp;
  Parts p = read_parts("llama_mha");
  GetParam().edit(p);
  const std::string msg = load_error(write_dir(tmp, "ck", p));
  ASSERT_NE(msg, "") << "loaded without error";
  for (auto& s : GetParam().expect) EXPECT_THAT(msg, HasSubstr(s));
}

INSTANTIATE_TEST_SUITE_P(Checkpoint, CheckpointBadInput, ::testing::ValuesIn(bad_checkpoints()),
                         [](const auto& info) { return info.param.name; });

// The unmodified parts load and reproduce the fixture itself: the base of every case above is sound.
TEST(Checkpoint, RewrittenFixtureLoadsIdentically) {
  TempDir tmp;
  const std::string dir = write_dir(tmp, "ck", read_parts("llama_mha"));
  EXPECT_EQ(load_error(dir), "");
  Checkpoint ours = load_checkpoint(dir), orig = load_checkpoint(shared_path("fixtures/hf/llama_mha"));
  EXPECT_EQ(ours.format, "safetensors");
  EXPECT_TRUE(same_bytes(logits_of(ours, kIds), logits_of(orig, kIds)));
}

TEST(Checkpoint, DirectoryProblemsAreErrors) {
  TempDir tmp;
  Parts p = read_parts("llama_mha");
  // No config.json.
  std::filesystem::create_directories(tmp.path("noconfig"));
  EXPECT_THAT(load_error(tmp.path("noconfig")), HasSubstr("config.json"));
  // config.json that is not JSON.
  const std::string bad_json = write_dir(tmp, "badjson", p);
  write_text(bad_json + "/config.json", "{\"model_type\": ");
  EXPECT_THAT(load_error(bad_json), HasSubstr("malformed JSON"));
  // Config but no weights.
  const std::string no_weights = write_dir(tmp, "noweights", p);
  std::filesystem::remove(no_weights + "/model.safetensors");
  EXPECT_THAT(load_error(no_weights), HasSubstr("no model.safetensors or model.safetensors.index.json"));
  EXPECT_THAT(load_error(tmp.path("nonexistent")), HasSubstr("does not exist"));
}

// ---- Sharded checkpoints: model.safetensors.index.json maps each tensor to its shard.

// Writes p as two shards plus an index (weight_map[name] = shard); `edit_map` may corrupt the map.
std::string write_sharded(const TempDir& tmp, const std::string& name, const Parts& p,
                          const std::function<void(json&)>& edit_map = {}) {
  const std::string dir = tmp.path(name);
  std::filesystem::create_directories(dir);
  write_text(dir + "/config.json", p.config.dump(2));
  const size_t half = p.tensors.size() / 2;
  const TensorList first(p.tensors.begin(), p.tensors.begin() + half), second(p.tensors.begin() + half, p.tensors.end());
  const std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors";
  safetensors::write(dir + "/" + s1, first);
  safetensors::write(dir + "/" + s2, second);
  json map = json::object();
  for (auto& [n, t] : first) map[n] = s1;
  for (auto& [n, t] : second) map[n] = s2;
  if (edit_map) edit_map(map);
  write_text(dir + "/model.safetensors.index.json", json{{"metadata", json::object()}, {"weight_map", map}}.dump(2));
  return dir;
}

TEST(CheckpointSharded, LoadsLikeTheSingleFile) {
  TempDir tmp;
  Parts p = read_parts("llama_mha");
  ASSERT_GT(p.tensors.size(), 2u);
  Checkpoint sharded = load_checkpoint(write_sharded(tmp, "sharded", p));
  Checkpoint single = load_checkpoint(write_dir(tmp, "single", p));
  ASSERT_EQ(sharded.tensors.size(), single.tensors.size());
  for (auto& [name, t] : single.tensors) {
    ASSERT_TRUE(sharded.tensors.count(name)) << name;
    EXPECT_TRUE(same_bytes(sharded.tensors.at(name), t)) << name;
  }
  EXPECT_TRUE(same_bytes(logits_of(sharded, kIds), logits_of(single, kIds)));
}

TEST(CheckpointSharded, BadIndexIsAnError) {
  TempDir tmp;
  Parts p = read_parts("llama_mha");
  const std::string first_name = p.tensors.front().first;
  EXPECT_THAT(load_error(write_sharded(tmp, "missing", p, [](json& m) { m["extra.weight"] = "model-00003.safetensors"; })),
              HasSubstr("model-00003.safetensors"));
  EXPECT_THAT(load_error(write_sharded(tmp, "escape", p, [](json& m) { m["extra.weight"] = "../x.safetensors"; })),
              HasSubstr("must be a plain file name"));
  EXPECT_THAT(load_error(write_sharded(tmp, "notname", p, [](json& m) { m["extra.weight"] = 3; })),
              HasSubstr("'extra.weight' is not a file name"));
  // A tensor stored in both shards: which copy wins would be arbitrary.
  const std::string dup = write_sharded(tmp, "dup", p);
  safetensors::write(dup + "/model-00002-of-00002.safetensors",
                     TensorList(p.tensors.begin() + p.tensors.size() / 2 - 1, p.tensors.end()));
  EXPECT_THAT(load_error(dup), HasSubstr("appears in more than one shard"));
  // A tensor missing from every shard is still named when the model is built.
  Parts missing = p;
  erase_tensor(missing, "model.norm.weight");
  EXPECT_THAT(load_error(write_sharded(tmp, "lost", missing)), HasSubstr("missing tensor 'model.norm.weight'"));
}

// ---- Half-precision checkpoints: stored as fp16 / bf16, converted to fp32 at load.

struct HalfCase {
  DType dtype;
  uint16_t (*encode)(float);
  float (*decode)(uint16_t);
  double tolerance;  // on max |logit diff| / max |logit|: the weights carry 11 (f16) or 8 (bf16) bits
};

class CheckpointHalf : public ::testing::TestWithParam<HalfCase> {};

TEST_P(CheckpointHalf, LoadsAndMatchesFp32Loosely) {
  const HalfCase& c = GetParam();
  TempDir tmp;
  Parts p = read_parts("llama_mha");
  Parts half = p;
  for (auto& [name, t] : half.tensors) {
    Tensor h = Tensor::empty(c.dtype, t.shape());
    for (int64_t i = 0; i < t.numel(); ++i) h.data<uint16_t>()[i] = c.encode(t.data<float>()[i]);
    t = h;
  }
  Checkpoint ck = load_checkpoint(write_dir(tmp, "half", half));
  EXPECT_EQ(ck.weight_types, fmt::format("{} x{}", dtype_name(c.dtype), p.tensors.size()));
  // The loaded fp32 weights are exactly the stored half values.
  const Tensor& w = ck.tensors.at("model.layers.0.self_attn.q_proj.weight");
  const Tensor& src = std::find_if(half.tensors.begin(), half.tensors.end(), [](auto& kv) {
                        return kv.first == "model.layers.0.self_attn.q_proj.weight";
                      })->second;
  ASSERT_EQ(w.dtype(), DType::F32);
  for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(w.data<float>()[i], c.decode(src.data<uint16_t>()[i])) << i;

  Tensor ref = logits_of(load_checkpoint(shared_path("fixtures/hf/llama_mha")), kIds);
  Tensor got = logits_of(ck, kIds);
  const double rel = max_abs_diff(got, ref) / max_abs(ref);
  EXPECT_LE(rel, c.tolerance);
  EXPECT_GT(rel, 0.0) << "rounding the weights should change the logits a little";
}

INSTANTIATE_TEST_SUITE_P(Checkpoint, CheckpointHalf,
                         ::testing::Values(HalfCase{DType::F16, f32_to_f16, f16_to_f32, 1e-2},
                                           HalfCase{DType::BF16, f32_to_bf16, bf16_to_f32, 5e-2}),
                         [](const auto& info) { return std::string(dtype_name(info.param.dtype)); });

// ---- RoPE settings: transformers 5's rope_parameters and the older rope_theta + rope_scaling describe the
// same thing and must give the same inverse frequencies.

struct RopeStyles {
  std::string name;
  json new_style;  // the rope_parameters object
  json old_style;  // top-level fields: rope_theta, rope_scaling
};

void PrintTo(const RopeStyles& r, std::ostream* os) { *os << r.name; }

class CheckpointRopeStyles : public ::testing::TestWithParam<RopeStyles> {};

TEST_P(CheckpointRopeStyles, GiveTheSameInverseFrequencies) {
  const RopeStyles& r = GetParam();
  json base = read_parts("llama3_gqa").config;
  base.erase("rope_parameters");
  json cfg_new = base, cfg_old = base;
  cfg_new["rope_parameters"] = r.new_style;
  cfg_old.update(r.old_style);
  const ModelConfig a = config_from_hf(cfg_new, "new"), b = config_from_hf(cfg_old, "old");
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.scaling, b.rope.scaling);
  EXPECT_EQ(rope_inv_freq(a), rope_inv_freq(b));
  // Unless the style is the default one, the scaling must actually have changed something.
  ModelConfig plain = a;
  plain.rope.scaling = RopeScaling::None;
  if (a.rope.scaling != RopeScaling::None) {
    EXPECT_NE(rope_inv_freq(a), rope_inv_freq(plain));
  }
}

const json kLlama3 = {{"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                      {"original_max_position_embeddings", 16}};

json with(json j, const json& extra) {
  j.update(extra);
  return j;
}

INSTANTIATE_TEST_SUITE_P(
    Checkpoint, CheckpointRopeStyles,
    ::testing::Values(
        RopeStyles{"Default", {{"rope_type", "default"}, {"rope_theta", 1e6}}, {{"rope_theta", 1e6}}},
        RopeStyles{"Linear",
                   {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 1e4}},
                   {{"rope_theta", 1e4}, {"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}}}},
        // The fixture's own settings; old checkpoints say "type", Llama 3.1's own config says "rope_type".
        RopeStyles{"Llama3Type", with(kLlama3, {{"rope_type", "llama3"}, {"rope_theta", 5e5}}),
                   {{"rope_theta", 5e5}, {"rope_scaling", with(kLlama3, {{"type", "llama3"}})}}},
        RopeStyles{"Llama3RopeType", with(kLlama3, {{"rope_type", "llama3"}, {"rope_theta", 5e5}}),
                   {{"rope_theta", 5e5}, {"rope_scaling", with(kLlama3, {{"rope_type", "llama3"}})}}}),
    [](const auto& info) { return info.param.name; });

// The old-style config of llama3_gqa drives the model to the same logits as the fixture's own.
TEST(Checkpoint, OldStyleRopeConfigGivesSameLogits) {
  TempDir tmp;
  Parts p = read_parts("llama3_gqa");
  ASSERT_EQ(p.config["rope_parameters"]["rope_type"], "llama3");
  json params = p.config["rope_parameters"];
  p.config.erase("rope_parameters");
  p.config["rope_theta"] = params["rope_theta"];
  params.erase("rope_theta");
  params.erase("rope_type");
  params["type"] = "llama3";
  p.config["rope_scaling"] = params;
  Checkpoint old_style = load_checkpoint(write_dir(tmp, "old", p));
  EXPECT_EQ(old_style.config.rope.scaling, RopeScaling::Llama3);
  EXPECT_TRUE(same_bytes(logits_of(old_style, kIds), logits_of(load_checkpoint(shared_path("fixtures/hf/llama3_gqa")), kIds)));
}

// ---- stories260K: the GGUF copy (q/k rows interleaved) and the safetensors copy (rotate-half) are the same
// model once checkpoint.cpp un-permutes the GGUF rows.

const std::string kStoriesGguf = "models/stories260K/stories260K.gguf";
const std::string kStoriesHf = "models/stories260K/hf";

TEST(CheckpointGguf, StoriesGgufEqualsSafetensorsCopy) {
  Checkpoint g = load_checkpoint(shared_path(kStoriesGguf)), h = load_checkpoint(shared_path(kStoriesHf));
  EXPECT_EQ(g.format, "gguf");
  EXPECT_EQ(h.format, "safetensors");
  const ModelConfig &cg = g.config, &ch = h.config;
  EXPECT_EQ(cg.describe(), ch.describe());
  EXPECT_EQ(cg.n_heads, 8);
  EXPECT_EQ(cg.n_kv_heads, 4);
  // GGUF stores eps as float32; the model uses it as float32, so that is the precision that must agree.
  EXPECT_EQ(static_cast<float>(cg.norm_eps), static_cast<float>(ch.norm_eps));
  EXPECT_EQ(cg.tie_embeddings, ch.tie_embeddings);
  EXPECT_EQ(cg.bos_id, ch.bos_id);
  EXPECT_EQ(cg.eos_id, ch.eos_id);
  // Same tensors, bit for bit: a wrong q/k permutation shows here by name before it shows in the logits.
  ASSERT_EQ(g.tensors.size(), h.tensors.size());
  for (auto& [name, t] : h.tensors) {
    ASSERT_TRUE(g.tensors.count(name)) << name;
    EXPECT_TRUE(same_bytes(g.tensors.at(name), t)) << name;
  }
  const std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 2, 0, 511, 13};
  EXPECT_LT(max_abs_diff(logits_of(g, ids), logits_of(h, ids)), 1e-4);
}

// Golden outputs of the original llama2.c implementation (REFERENCE.md), reproduced by both copies.
class CheckpointStories : public ::testing::TestWithParam<std::string> {};

TEST_P(CheckpointStories, MatchesReferenceImplementation) {
  Checkpoint ck = load_checkpoint(shared_path(GetParam()));
  auto backend = make_cpu_backend();
  auto model = make_model(ck, *backend);
  Engine engine(*model, {.kv_tokens = 64});
  const int64_t seq = engine.add_sequence();
  const int32_t bos = 1;
  Tensor logits = engine.step({{seq, std::span<const int32_t>(&bos, 1)}}, false);
  // "Logits at position 0 (after BOS), first 8 entries" (printed to 6 significant digits).
  const std::vector<float> first8 = {-6.22291f, 8.40434f, -6.22374f, -6.22254f, -6.22195f, -6.22288f, -6.22188f, -6.22342f};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(logits.data<float>()[i], first8[i], 1e-4) << i;
  // "Greedy from BOS alone, 40 steps, generated ids", decoded one token per step through the KV cache.
  const std::vector<int32_t> golden = {403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317,
                                       426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282,
                                       295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352};
  std::vector<int32_t> got;
  while (got.size() < golden.size()) {
    got.push_back(argmax(logits.data<float>(), logits.dim(1)));
    logits = engine.step({{seq, std::span<const int32_t>(&got.back(), 1)}}, false);
  }
  EXPECT_EQ(got, golden);
}

INSTANTIATE_TEST_SUITE_P(Checkpoint, CheckpointStories, ::testing::Values(kStoriesGguf, kStoriesHf),
                         [](const auto& info) { return info.index == 0 ? std::string("Gguf") : std::string("Hf"); });

}  // namespace
