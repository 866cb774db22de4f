// Router files (sparse/routers.h): random routers round-trip bit-exactly and deterministically, the k table
// answers every batch size, the fingerprint tells models apart, and every kind of broken or foreign file is
// refused with a message naming the file and the problem. Then `polar routers` as a user runs it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench/shapes.h"
#include "core/half.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "sparse/routers.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;
using json = nlohmann::json;
using test::shared_path;

namespace {

const std::string kOpt = "fixtures/hf/opt";             // ReLU MLP, MHA: 3 layers, d 64, H 4, D 256
const std::string kGqa = "fixtures/hf/llama3_gqa";      // gated MLP, GQA 8/2: 3 layers, d 64
const std::string kMetaKey = "polar.routers";
constexpr int64_t kRank = 16;  // small MLP routers keep the files small

struct Model {
  ModelConfig config;
  std::string fingerprint;
};

Model model(const std::string& rel) {
  const Checkpoint ck = load_checkpoint(shared_path(rel));
  return {ck.config, model_fingerprint(ck)};
}

Routers random_for(const Model& m, uint64_t seed = 7) { return random_routers(m.config, m.fingerprint, seed, kRank); }

using test::error_of;

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

void expect_equal(const Routers& a, const Routers& b) {
  EXPECT_EQ(routers_metadata(a), routers_metadata(b));
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_TRUE(same_bytes(a.layers[l].attn_w, b.layers[l].attn_w)) << "layer " << l;
    EXPECT_TRUE(same_bytes(a.layers[l].attn_b, b.layers[l].attn_b)) << "layer " << l;
    EXPECT_TRUE(same_bytes(a.layers[l].mlp_a, b.layers[l].mlp_a)) << "layer " << l;
    EXPECT_TRUE(same_bytes(a.layers[l].mlp_b, b.layers[l].mlp_b)) << "layer " << l;
    EXPECT_TRUE(same_bytes(a.layers[l].head_share, b.layers[l].head_share)) << "layer " << l;
    EXPECT_TRUE(same_bytes(a.layers[l].group_share, b.layers[l].group_share)) << "layer " << l;
  }
}

// Head shares (--selector static's ranking) on every layer 1..L-1: share h / 10 for head h, g / 4 for group g.
void add_head_shares(Routers& r, int64_t heads, int64_t groups) {
  for (size_t l = 1; l < r.layers.size(); ++l) {
    r.layers[l].head_share = Tensor::empty(DType::F32, {heads});
    r.layers[l].group_share = Tensor::empty(DType::F32, {groups});
    for (int64_t h = 0; h < heads; ++h) r.layers[l].head_share.data<float>()[h] = float(h) / 10;
    for (int64_t g = 0; g < groups; ++g) r.layers[l].group_share.data<float>()[g] = float(g) / 4;
  }
}

// ---- Random routers and the round trip.

TEST(Routers, RandomReluRoutersRoundTripExactly) {
  const Model m = model(kOpt);
  const Routers r = random_for(m);
  ASSERT_EQ(r.layers.size(), 3u);
  EXPECT_FALSE(r.layers[0].attn_w.defined());
  for (size_t l = 1; l < 3; ++l) {
    EXPECT_EQ(r.layers[l].attn_w.shape(), (Shape{4, 64}));
    EXPECT_EQ(r.layers[l].attn_b.shape(), (Shape{4}));
  }
  for (const LayerRouters& l : r.layers) {
    EXPECT_EQ(l.mlp_a.shape(), (Shape{kRank, 64}));
    EXPECT_EQ(l.mlp_b.shape(), (Shape{256, kRank}));
  }
  EXPECT_EQ(r.mlp_rank, kRank);
  EXPECT_EQ(r.granularity, "group");
  EXPECT_EQ(r.head_density, 0.5);
  EXPECT_EQ(r.source, "random, seed 7");
  // Weights as nn.Linear draws them, within ±1/sqrt(fan_in), and not all equal.
  const float* w = r.layers[1].attn_w.data<float>();
  const float bound = 1.0f / 8.0f;
  EXPECT_TRUE(std::all_of(w, w + 256, [&](float x) { return std::abs(x) <= bound; }));
  EXPECT_GT(*std::max_element(w, w + 256) - *std::min_element(w, w + 256), bound);

  test::TempDir tmp;
  save_routers(tmp.path("r.safetensors"), r);
  expect_equal(load_routers(tmp.path("r.safetensors"), m.config, m.fingerprint), r);
  // Without a model, the file describes itself completely.
  expect_equal(read_routers(tmp.path("r.safetensors")), r);
}

TEST(Routers, RandomGqaRoutersHaveNoMlpPart) {
  const Model m = model(kGqa);
  const Routers r = random_for(m);
  EXPECT_EQ(r.mlp_rank, 0);
  EXPECT_FALSE(r.mlp_k.has_value());
  for (size_t l = 0; l < r.layers.size(); ++l) {
    EXPECT_EQ(r.layers[l].attn_w.defined(), l > 0);
    EXPECT_FALSE(r.layers[l].mlp_a.defined());
    EXPECT_FALSE(r.layers[l].mlp_b.defined());
  }
  // One score per query head (8), max-pooled over the KV groups at selection time.
  EXPECT_EQ(r.layers[1].attn_w.shape(), (Shape{8, 64}));
  const json meta = routers_metadata(r);
  EXPECT_FALSE(meta.contains("mlp_rank"));
  EXPECT_FALSE(meta.contains("mlp_k"));

  test::TempDir tmp;
  save_routers(tmp.path("r.safetensors"), r);
  expect_equal(load_routers(tmp.path("r.safetensors"), m.config, m.fingerprint), r);
  expect_equal(read_routers(tmp.path("r.safetensors")), r);
}

// Head shares are optional: random routers have none; calibrated ones keep them through the file.
TEST(Routers, HeadSharesRoundTripAndAreOptional) {
  const Model m = model(kGqa);
  Routers r = random_for(m);
  EXPECT_FALSE(has_head_shares(r));
  test::TempDir tmp;
  save_routers(tmp.path("plain"), r);
  EXPECT_FALSE(has_head_shares(load_routers(tmp.path("plain"), m.config, m.fingerprint)));
  add_head_shares(r, 8, 2);
  EXPECT_TRUE(has_head_shares(r));
  save_routers(tmp.path("shares"), r);
  const Routers back = load_routers(tmp.path("shares"), m.config, m.fingerprint);
  EXPECT_TRUE(has_head_shares(back));
  expect_equal(r, back);
  expect_equal(r, read_routers(tmp.path("shares")));  // Hkv read from the file itself
}

// Adaptive selection's statistics (issue 19) for a model of `layers` layers, `heads` heads in `groups` KV
// groups: increasing quantiles and concave coverage curves, as calibration records them.
SelectionStats selection_stats(int64_t layers, int64_t heads, int64_t groups) {
  auto stats = [](int64_t units, float shift) {
    UnitStats u;
    for (int64_t i = 0; i <= kSelectionQuantiles; ++i) {
      u.score.push_back(shift + 0.1f * static_cast<float>(i));
      u.z.push_back(-2.0f + 0.04f * static_cast<float>(i));
    }
    for (int64_t k = 0; k <= units; ++k) u.coverage.push_back(std::sqrt(float(k) / float(units)));
    return u;
  };
  SelectionStats s;
  s.group.resize(size_t(layers));
  s.head.resize(size_t(layers));
  for (size_t l = 1; l < size_t(layers); ++l) {
    s.group[l] = stats(groups, float(l));
    s.head[l] = stats(heads, -float(l));
  }
  return s;
}

TEST(Routers, SelectionStatsRoundTripAndAreOptional) {
  const Model m = model(kGqa);
  Routers r = random_for(m);
  test::TempDir tmp;
  save_routers(tmp.path("plain"), r);
  EXPECT_FALSE(load_routers(tmp.path("plain"), m.config, m.fingerprint).selection.has_value());
  r.selection = selection_stats(3, 8, 2);
  save_routers(tmp.path("stats"), r);
  const Routers back = load_routers(tmp.path("stats"), m.config, m.fingerprint);
  ASSERT_TRUE(back.selection.has_value());
  EXPECT_EQ(back.selection->group[2].coverage, r.selection->group[2].coverage);
  EXPECT_EQ(back.selection->head[1].score, r.selection->head[1].score);
  EXPECT_EQ(back.selection->group[1].z, r.selection->group[1].z);
  expect_equal(r, back);
  add_head_shares(r, 8, 2);  // Hkv then comes from the file itself
  save_routers(tmp.path("shares"), r);
  expect_equal(r, read_routers(tmp.path("shares")));
}

TEST(Routers, SameSeedWritesTheSameBytes) {
  const Model m = model(kOpt);
  test::TempDir tmp;
  save_routers(tmp.path("a"), random_for(m, 3));
  save_routers(tmp.path("b"), random_for(m, 3));
  save_routers(tmp.path("c"), random_for(m, 4));
  EXPECT_EQ(test::read_bytes(tmp.path("a")), test::read_bytes(tmp.path("b")));
  EXPECT_NE(test::read_bytes(tmp.path("a")), test::read_bytes(tmp.path("c")));
}

TEST(Routers, MeasuredRecallsSurviveTheRoundTrip) {
  const Model m = model(kOpt);
  Routers r = random_for(m);
  r.attn_recall = {std::numeric_limits<double>::quiet_NaN(), 0.93, 0.875};
  r.mlp_k->recall[2][4] = 0.99;
  r.head_density = 0.3;
  r.granularity = "head";
  r.source = "calibrated on wikitext-2";
  test::TempDir tmp;
  save_routers(tmp.path("r"), r);
  const Routers back = load_routers(tmp.path("r"), m.config, m.fingerprint);
  expect_equal(back, r);
  EXPECT_EQ(back.attn_recall[1], 0.93);
  EXPECT_TRUE(std::isnan(back.attn_recall[0]));
  EXPECT_EQ(back.mlp_k->recall[2][4], 0.99);
  EXPECT_TRUE(std::isnan(back.mlp_k->recall[2][3]));
}

// F16 and BF16 files load, converted to fp32.
TEST(Routers, HalfPrecisionTensorsLoad) {
  const Model m = model(kOpt);
  const Routers r = random_for(m);
  test::TempDir tmp;
  save_routers(tmp.path("f32"), r);
  const safetensors::File f = safetensors::File::open(tmp.path("f32"));
  std::vector<std::pair<std::string, Tensor>> halves;
  for (const auto& t : f.tensors()) {
    Tensor h = Tensor::empty(t.name.ends_with("bias") ? DType::BF16 : DType::F16, t.shape);
    const float* src = f.view(t).data<float>();
    for (int64_t i = 0; i < h.numel(); ++i)
      h.data<uint16_t>()[i] = h.dtype() == DType::F16 ? f32_to_f16(src[i]) : f32_to_bf16(src[i]);
    halves.emplace_back(t.name, h);
  }
  safetensors::write(tmp.path("half"), halves, f.metadata());
  const Routers back = load_routers(tmp.path("half"), m.config, m.fingerprint);
  EXPECT_EQ(back.layers[1].attn_w.dtype(), DType::F32);
  EXPECT_EQ(back.layers[1].attn_w.data<float>()[5], f16_to_f32(f32_to_f16(r.layers[1].attn_w.data<float>()[5])));
  EXPECT_EQ(back.layers[2].attn_b.data<float>()[3], bf16_to_f32(f32_to_bf16(r.layers[2].attn_b.data<float>()[3])));
  EXPECT_EQ(back.layers[0].mlp_b.data<float>()[17], f16_to_f32(f32_to_f16(r.layers[0].mlp_b.data<float>()[17])));
}

// ---- The k table.

TEST(Routers, RandomKTableFollowsThePaperRoundedUpTo128) {
  // One layer, rank 1: an MLP as wide as OPT-6.7B's without allocating its routers.
  ModelConfig c = model(kOpt).config;
  c.n_layers = 1;
  c.ffn = 16384;
  const Routers r = random_routers(c, "x", 0, 1);
  ASSERT_TRUE(r.mlp_k.has_value());
  EXPECT_EQ(r.mlp_k->batch_sizes, (std::vector<int64_t>{1, 2, 4, 8, 16, 32, 64, 128, 256}));
  // ceil(f * 16384 / 128) * 128 for f = 9.5%, 15%, 21%, 29%, 40%, 52%, 62%, 71%, 77%.
  EXPECT_EQ(r.mlp_k->k[0], (std::vector<int64_t>{1664, 2560, 3456, 4864, 6656, 8576, 10240, 11648, 12672}));
  EXPECT_TRUE(std::isnan(r.mlp_k->recall[0][0]));
  // Capped at D.
  c.ffn = 200;
  EXPECT_EQ(random_routers(c, "x", 0, 1).mlp_k->k[0],
            (std::vector<int64_t>{128, 128, 128, 128, 128, 128, 128, 200, 200}));
}

TEST(Routers, KForTakesTheNextTabulatedBatchSize) {
  MlpKTable t;
  t.batch_sizes = {1, 4, 16};
  t.k = {{10, 20, 30}, {11, 21, 31}};
  EXPECT_EQ(t.k_for(0, 1), 10);   // on an entry
  EXPECT_EQ(t.k_for(0, 2), 20);   // between entries: the next larger one
  EXPECT_EQ(t.k_for(0, 4), 20);
  EXPECT_EQ(t.k_for(1, 5), 31);
  EXPECT_EQ(t.k_for(1, 16), 31);
  EXPECT_EQ(t.k_for(0, 17), 30);  // beyond the table: the largest
  EXPECT_EQ(t.k_for(0, 100000), 30);
  MlpKTable below;  // a table that starts above batch 1
  below.batch_sizes = {8};
  below.k = {{64}};
  EXPECT_EQ(below.k_for(0, 1), 64);
  EXPECT_THAT(error_of([&] { t.k_for(2, 1); }), HasSubstr("layer 2 is outside [0, 2)"));
  EXPECT_THAT(error_of([&] { t.k_for(0, 0); }), HasSubstr("batch size 0"));
}

// ---- Fingerprints.

TEST(Routers, FingerprintNamesTheShapeAndTheWeights) {
  const Checkpoint opt = load_checkpoint(shared_path(kOpt));
  const std::string fp = model_fingerprint(opt);
  EXPECT_THAT(fp, ::testing::MatchesRegex("opt L3 d64 H4 Hkv4 dh16 ffn256 V512 w:[0-9a-f]{16}"));
  EXPECT_EQ(model_fingerprint(load_checkpoint(shared_path(kOpt))), fp);
  // The GGUF and safetensors copies of one model (both fp32) are the same model.
  EXPECT_EQ(model_fingerprint(load_checkpoint(shared_path("models/stories260K/stories260K.gguf"))),
            model_fingerprint(load_checkpoint(shared_path("models/stories260K/hf"))));
  // Another fine-tune of the same shape: one weight of the final norm changed.
  Checkpoint tuned = load_checkpoint(shared_path(kOpt));
  const std::string norm = "model.decoder.final_layer_norm.weight";
  Tensor changed = Tensor::empty(DType::F32, {64});
  std::memcpy(changed.raw(), tuned.tensors.at(norm).raw(), changed.nbytes());
  changed.data<float>()[10] += 0.5f;
  tuned.tensors[norm] = changed;
  const std::string tuned_fp = model_fingerprint(tuned);
  EXPECT_NE(tuned_fp, fp);
  EXPECT_EQ(tuned_fp.substr(0, tuned_fp.find(" w:")), fp.substr(0, fp.find(" w:")));
  // Synthetic models: by their seed.
  const ModelConfig tiny = shape_config("tiny-opt");
  EXPECT_THAT(model_fingerprint(synthetic_checkpoint(tiny, "a", 5)), ::testing::EndsWith(" synthetic:5"));
  auto synthetic = [&](const char* name, uint64_t seed) {
    return model_fingerprint(synthetic_checkpoint(tiny, name, seed));
  };
  EXPECT_EQ(synthetic("a", 5), synthetic("b", 5));
  EXPECT_NE(synthetic("a", 5), synthetic("a", 6));
}

// ---- Broken and foreign files: each case edits a good file's parts and names what the error must say.

struct Parts {
  std::map<std::string, std::string> metadata;
  std::vector<std::pair<std::string, Tensor>> tensors;

  void edit_meta(const std::function<void(json&)>& f) {
    json j = json::parse(metadata.at(kMetaKey));
    f(j);
    metadata[kMetaKey] = j.dump();
  }
  void remove(const std::string& name) {
    std::erase_if(tensors, [&](const auto& t) { return t.first == name; });
  }
  void replace(const std::string& name, Tensor t) {
    remove(name);
    tensors.emplace_back(name, std::move(t));
  }
};

struct BadFile {
  std::string name;
  std::string model;  // kOpt or kGqa
  std::function<void(Parts&)> edit;
  std::vector<std::string> expect;
};

void PrintTo(const BadFile& b, std::ostream* os) { *os << b.name; }

class BadRouterFile : public ::testing::TestWithParam<BadFile> {};

TEST_P(BadRouterFile, IsRefusedWithTheFileAndTheProblem) {
  const BadFile& c = GetParam();
  const Model m = model(c.model);
  test::TempDir tmp;
  save_routers(tmp.path("good.safetensors"), random_for(m));
  const safetensors::File good = safetensors::File::open(tmp.path("good.safetensors"));
  Parts parts{good.metadata(), {}};
  for (const auto& t : good.tensors()) parts.tensors.emplace_back(t.name, good.view(t));
  c.edit(parts);
  const std::string path = tmp.path("bad.safetensors");
  safetensors::write(path, parts.tensors, parts.metadata);
  const std::string err = error_of([&] { load_routers(path, m.config, m.fingerprint); });
  ASSERT_FALSE(err.empty()) << "loaded";
  EXPECT_THAT(err, HasSubstr(path));
  for (const std::string& s : c.expect) EXPECT_THAT(err, HasSubstr(s));
}

Tensor filled(DType dtype, Shape shape, float v) {
  Tensor t = Tensor::zeros(dtype, std::move(shape));
  if (dtype == DType::F32) std::fill_n(t.data<float>(), t.numel(), v);
  return t;
}

std::vector<BadFile> bad_files() {
  auto meta = [](std::function<void(json&)> f) { return [f](Parts& p) { p.edit_meta(f); }; };
  // Valid selection statistics of the GQA fixture (3 layers, 8 heads in 2 groups), then `f`'s damage.
  auto with_selection = [](std::function<void(json&)> f) {
    return [f](Parts& p) {
      p.edit_meta([&](json& j) {
        Routers r;
        r.layers.resize(3);
        r.selection = selection_stats(3, 8, 2);
        json sel = routers_metadata(r)["selection"];
        f(sel);
        j["selection"] = sel;
      });
    };
  };
  // Head shares on both sparse layers of the GQA fixture (8 heads), with `groups` group shares of `value`.
  auto group_shares = [](int64_t groups, float value) {
    return [=](Parts& p) {
      for (const char* l : {"1", "2"}) {
        p.replace(fmt::format("layers.{}.attn.head_share", l), filled(DType::F32, {8}, 0.5f));
        p.replace(fmt::format("layers.{}.attn.group_share", l), filled(DType::F32, {groups}, value));
      }
    };
  };
  return {
      {"AnotherModel", kOpt,
       meta([](json& j) { j["model"] = "opt L3 d64 H4 Hkv4 dh16 ffn256 V512 w:0000000000000000"; }),
       {"were made for model opt L3 d64 H4 Hkv4 dh16 ffn256 V512 w:0000000000000000, not opt L3 d64 H4"}},
      {"WrongShape", kOpt, [](Parts& p) { p.replace("layers.1.attn.weight", filled(DType::F32, {3, 64}, 0)); },
       {"tensor 'layers.1.attn.weight' has shape [3, 64] but the model needs [4, 64]"}},
      {"MissingLayerTensor", kOpt, [](Parts& p) { p.remove("layers.2.attn.bias"); },
       {"missing tensor 'layers.2.attn.bias'"}},
      {"MissingMlpRouters", kOpt, [](Parts& p) {
         p.remove("layers.1.mlp.a");
         p.remove("layers.1.mlp.b");
       },
       {"missing tensor 'layers.1.mlp.a' (and 1 more)"}},
      {"ExtraTensor", kOpt, [](Parts& p) { p.replace("layers.1.attn.scale", filled(DType::F32, {4}, 1)); },
       {"unexpected tensor 'layers.1.attn.scale'"}},
      {"LayerZeroAttentionRouter", kGqa,
       [](Parts& p) {
         p.replace("layers.0.attn.weight", filled(DType::F32, {8, 64}, 0));
         p.replace("layers.0.attn.bias", filled(DType::F32, {8}, 0));
       },
       {"unexpected tensor 'layers.0.attn.", "layer 0 is always dense"}},
      {"MlpRoutersForGatedModel", kGqa, [](Parts& p) { p.replace("layers.0.mlp.a", filled(DType::F32, {16, 64}, 0)); },
       {"unexpected tensor 'layers.0.mlp.a'", "gated"}},
      {"MlpFieldsForGatedModel", kGqa, meta([](json& j) { j["mlp_rank"] = 16; }), {"mlp_rank", "gated"}},
      {"IntegerTensor", kOpt, [](Parts& p) { p.replace("layers.1.attn.bias", filled(DType::I32, {4}, 0)); },
       {"tensor 'layers.1.attn.bias' is i32"}},
      {"NanWeight", kOpt,
       [](Parts& p) {
         p.replace("layers.2.attn.bias", filled(DType::F32, {4}, std::numeric_limits<float>::quiet_NaN()));
       },
       {"tensor 'layers.2.attn.bias' holds nan at element 0"}},
      {"MissingMetadata", kOpt, [](Parts& p) { p.metadata.clear(); }, {"not a router file", "polar.routers"}},
      {"MalformedJson", kOpt, [](Parts& p) { p.metadata[kMetaKey] = R"({"format": 1, "model": )"; },
       {"malformed \"polar.routers\" metadata"}},
      {"MetadataNotAnObject", kOpt, [](Parts& p) { p.metadata[kMetaKey] = "[1, 2]"; }, {"is not a JSON object"}},
      {"MissingField", kOpt, meta([](json& j) { j.erase("granularity"); }), {"lacks \"granularity\""}},
      // A million nested arrays: refused while parsing (quoting the bad "format" in the error would recurse a
      // million deep and overflow the stack).
      {"DeeplyNestedMetadata", kOpt,
       [](Parts& p) { p.metadata[kMetaKey] = R"({"format": )" + std::string(1'000'000, '[') + std::string(1'000'000, ']') + "}"; },
       {"malformed \"polar.routers\" metadata", "nested deeper than 128 levels"}},
      {"FormatTwo", kOpt, meta([](json& j) { j["format"] = 2; }), {"format 2", "reads format 1"}},
      {"FormatNotANumber", kOpt, meta([](json& j) { j["format"] = "1"; }), {"format must be an integer"}},
      {"UnknownField", kOpt, meta([](json& j) { j["mlp_density"] = 0.5; }), {"unknown field \"mlp_density\""}},
      {"BadGranularity", kOpt, meta([](json& j) { j["granularity"] = "token"; }),
       {"granularity must be \"head\" or \"group\", not \"token\""}},
      {"DensityZero", kOpt, meta([](json& j) { j["head_density"] = 0; }), {"head_density must be a number in (0, 1]"}},
      {"DensityAboveOne", kOpt, meta([](json& j) { j["head_density"] = 1.5; }), {"head_density", "not 1.5"}},
      {"DensityNotANumber", kOpt, meta([](json& j) { j["head_density"] = "half"; }), {"head_density"}},
      {"AttentionRecallTooShort", kGqa, meta([](json& j) { j["attention_recall"] = {nullptr, 0.5}; }),
       {"attention_recall has 2 entries, expected 3 (one per layer)"}},
      {"AttentionRecallAboveOne", kGqa, meta([](json& j) { j["attention_recall"][1] = 1.5; }),
       {"attention_recall[1] must be a recall in [0, 1] or null"}},
      {"AttentionRecallOnLayerZero", kGqa, meta([](json& j) { j["attention_recall"][0] = 0.9; }),
       {"attention_recall[0] must be null"}},
      {"BatchSizesNotAscending", kOpt, meta([](json& j) { j["mlp_k"]["batch_sizes"][3] = 4; }),
       {"batch_sizes must be strictly ascending, but 4 follows 4"}},
      {"BatchSizeZero", kOpt, meta([](json& j) { j["mlp_k"]["batch_sizes"][0] = 0; }),
       {"mlp_k.batch_sizes[0] = 0 is not a batch size"}},
      {"BatchSizesEmpty", kOpt, meta([](json& j) { j["mlp_k"]["batch_sizes"] = json::array(); }),
       {"batch_sizes must be a non-empty array"}},
      {"KAboveD", kOpt, meta([](json& j) { j["mlp_k"]["k"][1][3] = 257; }),
       {"mlp_k.k[1][3] = 257 is outside [1, 256]"}},
      {"KZero", kOpt, meta([](json& j) { j["mlp_k"]["k"][0][0] = 0; }), {"mlp_k.k[0][0] = 0 is outside [1, 256]"}},
      {"KNotAnInteger", kOpt, meta([](json& j) { j["mlp_k"]["k"][0][0] = 128.5; }),
       {"mlp_k.k[0][0] must be an integer"}},
      {"KRowTooShort", kOpt, meta([](json& j) { j["mlp_k"]["k"][2].erase(8); }),
       {"mlp_k.k[2] has 8 entries, expected 9 (one per batch size)"}},
      {"KMissingALayer", kOpt, meta([](json& j) { j["mlp_k"]["k"].erase(2); }), {"mlp_k.k has 2 entries, expected 3"}},
      {"KRecallNegative", kOpt, meta([](json& j) { j["mlp_k"]["recall"][0][0] = -0.1; }),
       {"mlp_k.recall[0][0] must be a recall in [0, 1] or null"}},
      {"NoKTable", kOpt, meta([](json& j) { j.erase("mlp_k"); }), {"lacks \"mlp_k\""}},
      {"MlpRankZero", kOpt, meta([](json& j) { j["mlp_rank"] = 0; }), {"mlp_rank must be at least 1"}},
      {"MlpRankDisagreesWithTensors", kOpt, meta([](json& j) { j["mlp_rank"] = 8; }),
       {"tensor 'layers.0.mlp.a' has shape [16, 64] but the model needs [8, 64]"}},
      // Head shares: all layers or none, of the model's head and group counts, each in [0, 1].
      {"HeadSharesOfOneLayerOnly", kGqa,
       [](Parts& p) {
         p.replace("layers.1.attn.head_share", filled(DType::F32, {8}, 0.5f));
         p.replace("layers.1.attn.group_share", filled(DType::F32, {2}, 0.5f));
       },
       {"missing tensor 'layers.2.attn.group_share' (and 1 more)"}},
      {"GroupShareOfTheWrongSize", kGqa, group_shares(8, 0.5f),
       {"tensor 'layers.1.attn.group_share' has shape [8] but the model needs [2]"}},
      {"HeadShareAboveOne", kGqa, group_shares(2, 1.5f),
       {"tensor 'layers.1.attn.group_share' holds 1.5 at element 0, not a share in [0, 1]"}},
      // Selection statistics (issue 19): optional, but whole and consistent when present.
      {"SelectionQuantilesDecrease", kGqa, with_selection([](json& sel) { sel["layers"][1]["group"]["score"][5] = -100; }),
       {"selection.layers[1].group.score must not decrease", "score[5] = -100"}},
      {"SelectionCoverageOfTheWrongLength", kGqa,
       with_selection([](json& sel) { sel["layers"][2]["group"]["coverage"] = {0, 0.5, 0.8, 1}; }),
       {"selection.layers[2].group.coverage must be an array of 3 numbers"}},
      {"SelectionCoverageAboveOne", kGqa,
       with_selection([](json& sel) { sel["layers"][1]["head"]["coverage"][8] = 1.5; }),
       {"selection.layers[1].head.coverage[8] = 1.5 is not a share in [0, 1]"}},
      {"SelectionCoverageNotFromZero", kGqa,
       with_selection([](json& sel) { sel["layers"][1]["group"]["coverage"][0] = 0.1; }),
       {"selection.layers[1].group.coverage[0] must be 0"}},
      {"SelectionOnLayerZero", kGqa, with_selection([](json& sel) { sel["layers"][0] = sel["layers"][1]; }),
       {"selection.layers[0] must be null"}},
      {"SelectionQuantileCount", kGqa, with_selection([](json& sel) { sel["quantiles"] = 50; }),
       {"selection.quantiles is 50, this polar reads 100"}},
      {"SelectionLayerMissingAGranularity", kGqa, with_selection([](json& sel) { sel["layers"][2].erase("head"); }),
       {"lacks \"selection.layers[2].head\""}},
      {"HeadShareOnLayerZero", kGqa,
       [](Parts& p) { p.replace("layers.0.attn.head_share", filled(DType::F32, {8}, 0.5f)); },
       {"unexpected tensor 'layers.0.attn.head_share' (layer 0 is always dense"}},
  };
}

INSTANTIATE_TEST_SUITE_P(Routers, BadRouterFile, ::testing::ValuesIn(bad_files()),
                         [](const auto& info) { return info.param.name; });

TEST(Routers, FingerprintOfAnotherFineTuneIsRefused) {
  const Model m = model(kOpt);
  test::TempDir tmp;
  save_routers(tmp.path("r"), random_for(m));
  const std::string tuned = m.fingerprint.substr(0, m.fingerprint.find(" w:")) + " w:0123456789abcdef";
  EXPECT_EQ(error_of([&] { load_routers(tmp.path("r"), m.config, tuned); }),
            "routers in " + tmp.path("r") + " were made for model " + m.fingerprint + ", not " + tuned);
}

TEST(Routers, RoutersOfAnotherArchitectureAreRefused) {
  const Model opt = model(kOpt), gqa = model(kGqa);
  test::TempDir tmp;
  save_routers(tmp.path("r"), random_for(opt));
  EXPECT_THAT(error_of([&] { load_routers(tmp.path("r"), gqa.config, gqa.fingerprint); }),
              HasSubstr("were made for model opt L3"));
}

TEST(Routers, TruncatedFileIsRefused) {
  const Model m = model(kOpt);
  test::TempDir tmp;
  save_routers(tmp.path("r"), random_for(m));
  std::vector<uint8_t> bytes = test::read_bytes(tmp.path("r"));
  bytes.resize(bytes.size() / 2);
  test::write_bytes(tmp.path("cut"), bytes);
  const std::string err = error_of([&] { load_routers(tmp.path("cut"), m.config, m.fingerprint); });
  EXPECT_THAT(err, HasSubstr(tmp.path("cut")));
  EXPECT_THAT(err, HasSubstr("truncated or corrupt"));
}

TEST(Routers, NonSafetensorsFileIsRefused) {
  const Model m = model(kOpt);
  test::TempDir tmp;
  const std::string text = "layers.1.attn.weight = [[0.1, 0.2], [0.3, 0.4]]\n";
  test::write_bytes(tmp.path("r.txt"), std::vector<uint8_t>(text.begin(), text.end()));
  std::string err = error_of([&] { load_routers(tmp.path("r.txt"), m.config, m.fingerprint); });
  EXPECT_THAT(err, HasSubstr(tmp.path("r.txt")));
  EXPECT_THAT(err, HasSubstr("corrupt"));
  test::write_bytes(tmp.path("tiny"), {'h', 'i'});
  EXPECT_THAT(error_of([&] { read_routers(tmp.path("tiny")); }),
              HasSubstr(tmp.path("tiny") + ": not a safetensors file"));
  // A model checkpoint is a safetensors file, but not a router file.
  EXPECT_THAT(error_of([&] { read_routers(shared_path(kOpt + "/model.safetensors")); }),
              HasSubstr("not a router file"));
  EXPECT_THAT(error_of([&] { read_routers(tmp.path("absent")); }), HasSubstr(tmp.path("absent")));
}

// Without a model, a file is checked against its own layer 1 and layer 0 routers.
TEST(Routers, ReadingWithoutAModelChecksTheFileAgainstItself) {
  const Model m = model(kOpt);
  Routers r = random_for(m);
  r.layers[2].attn_w = Tensor::zeros(DType::F32, {5, 64});
  test::TempDir tmp;
  save_routers(tmp.path("r"), r);
  EXPECT_THAT(error_of([&] { read_routers(tmp.path("r")); }),
              HasSubstr("tensor 'layers.2.attn.weight' has shape [5, 64] but the rest of the file implies [4, 64]"));
  r = random_for(m);
  r.layers[1].attn_w = Tensor();
  save_routers(tmp.path("r"), r);
  EXPECT_THAT(error_of([&] { read_routers(tmp.path("r")); }), HasSubstr("missing tensor 'layers.1.attn.weight'"));
}

// ---- polar routers.

using test::run_polar;
using test::RunResult;

std::string describe(const RunResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout\n" + r.out + "\n--- stderr\n" + r.err;
}

TEST(RoutersCli, RandomForACheckpointThenShowJson) {
  test::TempDir tmp;
  const std::string out = tmp.path("opt.routers.safetensors"), opt = shared_path(kOpt);
  RunResult w = run_polar({"routers", "--random", "--model", opt, "--out", out, "--seed", "3", "--mlp-rank", "16"});
  ASSERT_EQ(w.exit_code, 0) << describe(w);
  EXPECT_THAT(w.err, HasSubstr("wrote random routers (seed 3)"));
  EXPECT_EQ(w.out, "");
  // The file is what the library makes from the same seed.
  const Model m = model(kOpt);
  save_routers(tmp.path("lib"), random_routers(m.config, m.fingerprint, 3, 16));
  EXPECT_EQ(test::read_bytes(out), test::read_bytes(tmp.path("lib")));

  RunResult s = run_polar({"routers", "--show", out, "--model", opt, "--json"});
  ASSERT_EQ(s.exit_code, 0) << describe(s);
  const json j = json::parse(s.out);
  EXPECT_EQ(j["model"], m.fingerprint);
  EXPECT_EQ(j["checked_against"], opt);
  EXPECT_EQ(j["layers"], 3);
  EXPECT_EQ(j["heads"], 4);
  EXPECT_EQ(j["hidden"], 64);
  EXPECT_EQ(j["ffn"], 256);
  EXPECT_EQ(j["mlp_rank"], 16);
  EXPECT_EQ(j["source"], "random, seed 3");
  EXPECT_EQ(j["head_shares"], false);  // random routers cannot serve --selector static
  EXPECT_EQ(j["mlp_k"]["k"][2], (std::vector<int64_t>{128, 128, 128, 128, 128, 256, 256, 256, 256}));
  EXPECT_TRUE(j["mlp_k"]["recall"][0][0].is_null());

  RunResult t = run_polar({"routers", "--show", out});
  ASSERT_EQ(t.exit_code, 0) << describe(t);
  EXPECT_THAT(t.out, HasSubstr(m.fingerprint));
  EXPECT_THAT(t.out, HasSubstr("checked      only on its own"));
  EXPECT_THAT(t.out, HasSubstr("head shares  none (--selector static needs routers from polar calibrate)"));
  EXPECT_THAT(t.out, HasSubstr("selection    none (--selection threshold / stat-topk and --density-schedule "
                               "calibrated need routers from polar calibrate)"));
  EXPECT_THAT(t.out, HasSubstr("rank 16 routers over D = 256"));
  EXPECT_THAT(t.out, HasSubstr("  layer 2   0.500  0.500  0.500  0.500  0.500  1.000  1.000  1.000  1.000\n"));
}

TEST(RoutersCli, GqaRoutersHaveADenseMlp) {
  test::TempDir tmp;
  const std::string out = tmp.path("gqa.routers.safetensors"), gqa = shared_path(kGqa);
  RunResult w = run_polar({"routers", "--random", "--model", gqa, "--out", out});
  ASSERT_EQ(w.exit_code, 0) << describe(w);
  RunResult s = run_polar({"routers", "--show", out, "--model", gqa});
  ASSERT_EQ(s.exit_code, 0) << describe(s);
  EXPECT_THAT(s.out, HasSubstr("checked      valid for " + gqa));
  EXPECT_THAT(s.out, HasSubstr("layers 1-2: 8 heads scored from d = 64, granularity group, head density 0.5"));
  EXPECT_THAT(s.out, HasSubstr("mlp          dense"));
  // Shown against another model, they are refused.
  RunResult other = run_polar({"routers", "--show", out, "--model", shared_path(kOpt)});
  EXPECT_EQ(other.exit_code, 1) << describe(other);
  EXPECT_THAT(other.err, HasSubstr("error: routers in " + out + " were made for model llama L3"));
}

// --shape makes routers for the synthetic model polar bench builds with the same seed.
TEST(RoutersCli, ShapeRoutersBelongToTheSyntheticModelOfThatSeed) {
  test::TempDir tmp;
  const std::string out = tmp.path("tiny.routers.safetensors");
  RunResult w =
      run_polar({"routers", "--random", "--shape", "tiny-opt", "--seed", "5", "--mlp-rank", "8", "--out", out});
  ASSERT_EQ(w.exit_code, 0) << describe(w);
  const ModelConfig tiny = shape_config("tiny-opt");
  const std::string fp = model_fingerprint(synthetic_checkpoint(tiny, "polar bench", 5));
  EXPECT_EQ(load_routers(out, tiny, fp).fingerprint, fp);
  RunResult same = run_polar({"routers", "--show", out, "--shape", "tiny-opt", "--seed", "5"});
  EXPECT_EQ(same.exit_code, 0) << describe(same);
  RunResult other = run_polar({"routers", "--show", out, "--shape", "tiny-opt", "--seed", "6"});
  EXPECT_EQ(other.exit_code, 1) << describe(other);
  EXPECT_THAT(other.err, HasSubstr("synthetic:5, not"));
  EXPECT_THAT(other.err, HasSubstr("synthetic:6"));
}

TEST(RoutersCli, MistakesExitWithOneAndSayWhy) {
  test::TempDir tmp;
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"routers"}, "needs --random (write routers) or --show FILE"},
      {{"routers", "--random", "--model", shared_path(kOpt)}, "needs --out FILE"},
      {{"routers", "--random", "--out", tmp.path("r")}, "needs a model"},
      {{"routers", "--random", "--shape", "gpt-5", "--out", tmp.path("r")}, "gpt-5"},
      {{"routers", "--show", tmp.path("absent")}, tmp.path("absent")},
      {{"routers", "--show", shared_path(kOpt + "/model.safetensors")}, "not a router file"},
      {{"routers", "--random", "--model", shared_path(kOpt), "--out", tmp.path("no/such/dir/r")}, "cannot create"},
  };
  for (const auto& [args, expect] : cases) {
    RunResult r = run_polar(args);
    EXPECT_EQ(r.exit_code, 1) << describe(r);
    EXPECT_THAT(r.err, HasSubstr("error: ")) << describe(r);
    EXPECT_THAT(r.err, HasSubstr(expect)) << describe(r);
  }
}

}  // namespace
