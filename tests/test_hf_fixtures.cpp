// Architectures pinned to Hugging Face transformers: every fixture model in ../shared/fixtures/hf must
// reproduce transformers' logits, hidden states, router inputs, head norms, MLP activations and greedy
// continuations (tolerance: max |ours - ref| / max |ref| <= 1e-4).
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include <fmt/format.h>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"
#include "test_util.h"

using namespace polar;

namespace {

constexpr double kTol = 1e-4;

double rel_err(const Tensor& ours, const Tensor& ref) {
  EXPECT_EQ(ours.numel(), ref.numel());
  double max_diff = 0, max_ref = 0;
  for (int64_t i = 0; i < std::min(ours.numel(), ref.numel()); ++i) {
    max_diff = std::max(max_diff, double(std::fabs(ours.data<float>()[i] - ref.data<float>()[i])));
    max_ref = std::max(max_ref, double(std::fabs(ref.data<float>()[i])));
  }
  return max_diff / std::max(max_ref, 1e-30);
}

// Keeps a copy of every probed tensor under the fixture's key names.
class Recorder : public Probe {
 public:
  std::map<std::string, Tensor> got;
  void hidden(int i, const Tensor& x) override { keep(fmt::format("hidden_states.{}", i), x); }
  void attn_in(int l, const Tensor& x) override { keep(fmt::format("attn_in.{}", l), x); }
  void head_norms(int l, const Tensor& n) override { keep(fmt::format("head_norms.{}", l), n); }
  void mlp_act(int l, const Tensor& a) override { keep(fmt::format("mlp_act.{}", l), a); }

 private:
  void keep(const std::string& key, const Tensor& t) {
    Tensor c = Tensor::empty(DType::F32, t.shape());
    std::copy(t.data<float>(), t.data<float>() + t.numel(), c.data<float>());
    got[key] = c;
  }
};

std::vector<int32_t> ids_of(const safetensors::File& ref, const std::string& key) {
  const safetensors::TensorInfo* info = ref.find(key);
  EXPECT_NE(info, nullptr) << key;
  Tensor t = ref.view(*info);
  std::vector<int32_t> out;
  for (int64_t i = 0; i < t.numel(); ++i) out.push_back(static_cast<int32_t>(t.data<int64_t>()[i]));
  return out;
}

class HfFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(HfFixture, MatchesTransformers) {
  const std::string dir = test::shared_path("fixtures/hf/" + GetParam());
  Checkpoint ck = load_checkpoint(dir);
  safetensors::File ref = safetensors::File::open(dir + "/reference.safetensors");
  auto backend = make_cpu_backend();
  auto model = make_model(ck, *backend);
  for (int s = 0; s < 2; ++s) {
    const std::string pre = fmt::format("seq{}.", s);
    std::vector<int32_t> ids = ids_of(ref, pre + "input_ids");
    Engine engine(*model, {.kv_tokens = 64});
    int64_t seq = engine.add_sequence();
    Recorder rec;
    Tensor logits = engine.step({{seq, ids}}, /*all_logits=*/true, &rec);
    EXPECT_LE(rel_err(logits, ref.load_f32(*ref.find(pre + "logits"))), kTol) << pre << "logits";
    int checked = 0;
    for (auto& [key, ours] : rec.got) {
      const safetensors::TensorInfo* info = ref.find(pre + key);
      ASSERT_NE(info, nullptr) << "reference lacks " << pre + key;
      ASSERT_EQ(ours.shape(), info->shape) << pre + key;
      EXPECT_LE(rel_err(ours, ref.load_f32(*info)), kTol) << pre + key;
      ++checked;
    }
    // Every probed key of the reference was produced.
    int expected = 0;
    for (auto& t : ref.tensors())
      if (t.name.rfind(pre, 0) == 0 && t.name.find("logits") == std::string::npos &&
          t.name.find("ids") == std::string::npos)
        ++expected;
    EXPECT_EQ(checked, expected) << pre;

    // Greedy continuation with KV-cached decoding, one token per step.
    std::vector<int32_t> golden = ids_of(ref, pre + "greedy_ids");
    Engine gen(*model, {.kv_tokens = 64});
    int64_t g = gen.add_sequence();
    std::vector<int32_t> out = ids;
    Tensor last = gen.step({{g, ids}}, false);
    while (out.size() < golden.size()) {
      int32_t next = argmax(last.data<float>(), last.dim(1));
      out.push_back(next);
      std::vector<int32_t> one{next};
      last = gen.step({{g, one}}, false);
    }
    EXPECT_EQ(out, golden) << pre << "greedy_ids";
  }
}

INSTANTIATE_TEST_SUITE_P(All, HfFixture,
                         ::testing::Values("opt", "opt_postln_proj", "llama_mha", "llama3_gqa", "mistral_gqa",
                                           "qwen2_gqa"));

}  // namespace
