// Sparse decoding on the CPU reference (polar-method.md §3, §5): the selection ops pick what their rule
// says (ties to the lower index, NaN last, padding rows ignored), the gather GEMMs equal the dense MLP on
// the selected neurons, selective attention equals dense attention with the skipped heads zeroed, and a
// model decoding with routers at density 1.0 is exactly the dense model. Then the baselines and granularities
// of issue 5: the oracle keeps the true largest head outputs, static selection the same heads for every
// token, per-query-head selection is dense attention with the other query heads zeroed; and scoring in one
// pass is serving's semantics: each sparse token gets the heads and MLP neurons of its own decode step.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>

#include <fmt/format.h>

#include "eval/scoring.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/engine.h"
#include "runtime/perplexity.h"
#include "sparse/oracle_sparsity.h"
#include "sparse/random_sparsity.h"
#include "sparse/router_sparsity.h"
#include "sparse/routers.h"
#include "sparse/selection.h"
#include "sparse/static_sparsity.h"
#include "test_util.h"

using namespace polar;

namespace {

Tensor f32(Shape shape, std::vector<float> v) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}
Tensor i32(std::vector<int32_t> v) {
  Tensor t = Tensor::empty(DType::I32, {static_cast<int64_t>(v.size())});
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}
std::vector<int32_t> ints(const Tensor& t) { return {t.data<int32_t>(), t.data<int32_t>() + t.numel()}; }
// An f32 tensor's values, for test::scaled_diff.
std::span<const float> span_of(const Tensor& t) { return {t.data<float>(), static_cast<size_t>(t.numel())}; }

Tensor copy_of(const Tensor& t) {
  Tensor c = Tensor::empty(t.dtype(), t.shape());
  std::copy(t.data<float>(), t.data<float>() + t.numel(), c.data<float>());
  return c;
}
Tensor random(Shape shape, std::mt19937_64& rng, float lo = -1, float hi = 1) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
  return t;
}

TEST(SparseOps, RouteHeadsKeepsTheBestInIndexOrderWithTiesToTheLowerIndex) {
  auto cpu = make_cpu_backend();
  const float nan = std::nanf("");
  // Row 0: 5 and 7 tie for second place -> 5; row 1: NaN ranks last.
  Tensor scores = f32({2, 8}, {0, 3, 1, 0.5f, 0, 2, 0, 2, /**/ nan, 1, 1, 1, 1, 1, 1, 0});
  Tensor idx = Tensor::empty(DType::I32, {2, 3});
  cpu->route_heads(scores, 1, idx);
  EXPECT_EQ(ints(idx), (std::vector<int32_t>{1, 5, 7, /**/ 1, 2, 3}));
  // GQA: groups of 4 scored by their best head.
  Tensor groups = Tensor::empty(DType::I32, {2, 1});
  cpu->route_heads(scores, 4, groups);
  EXPECT_EQ(ints(groups), (std::vector<int32_t>{0, 0}));
  EXPECT_THROW(cpu->route_heads(scores, 3, groups), Error);  // 8 heads do not split into groups of 3
}

TEST(SparseOps, RouteNeuronsSumsReluOverLiveRowsOnly) {
  auto cpu = make_cpu_backend();
  // Column sums of ReLU over the first 2 rows: {1, 0, 5, 2, 0}; the third row (padding) would favour 1 and 4.
  Tensor logits = f32({3, 5}, {1, -1, 2, 2, -3, /**/ -1, -2, 3, 0, 0, /**/ 0, 9, 0, 0, 9});
  Tensor idx = Tensor::empty(DType::I32, {3});
  cpu->route_neurons(logits, i32({2}), idx);
  EXPECT_EQ(ints(idx), (std::vector<int32_t>{0, 2, 3}));
  Tensor four = Tensor::empty(DType::I32, {4});
  cpu->route_neurons(logits, i32({2}), four);  // zero-score tie between 1 and 4 -> 1
  EXPECT_EQ(ints(four), (std::vector<int32_t>{0, 1, 2, 3}));
}

TEST(SparseOps, GatherGemmsEqualTheDenseMlpOnTheSelectedNeurons) {
  auto cpu = make_cpu_backend();
  std::mt19937_64 rng(3);
  const int64_t R = 5, d = 24, D = 40;
  Tensor x = random({R, d}, rng), w1 = random({D, d}, rng), b1 = random({D}, rng), w2t = random({D, d}, rng);
  Tensor b2 = random({d}, rng), residual = random({R, d}, rng);
  std::vector<int32_t> all(D);
  std::iota(all.begin(), all.end(), 0);
  // All indices: bit-for-bit the dense path.
  Tensor dense_up = Tensor::empty(DType::F32, {R, D}), all_up = Tensor::empty(DType::F32, {R, D});
  cpu->gather_up_relu(x, w1, &b1, nullptr, dense_up);
  Tensor all_idx = i32(all);
  cpu->gather_up_relu(x, w1, &b1, &all_idx, all_up);
  EXPECT_TRUE(std::equal(dense_up.data<float>(), dense_up.data<float>() + dense_up.numel(), all_up.data<float>()));
  // A subset: the dense activations' columns, and the down projection of the dense activations with the
  // other neurons zeroed.
  const std::vector<int32_t> pick = {0, 3, 4, 17, 39};
  Tensor idx = i32(pick), up = Tensor::empty(DType::F32, {R, 5});
  cpu->gather_up_relu(x, w1, &b1, &idx, up);
  Tensor masked = Tensor::zeros(DType::F32, {R, D});
  for (int64_t r = 0; r < R; ++r)
    for (size_t i = 0; i < pick.size(); ++i) {
      EXPECT_NEAR(up.data<float>()[r * 5 + i], dense_up.data<float>()[r * D + pick[i]],
                  test::scaled_tol(1e-5, dense_up.data<float>()[r * D + pick[i]]));
      masked.data<float>()[r * D + pick[i]] = up.data<float>()[r * 5 + i];
    }
  Tensor sparse_down = copy_of(residual), dense_down = copy_of(residual);
  cpu->gather_down(up, w2t, &idx, &b2, sparse_down, true);
  cpu->gather_down(masked, w2t, nullptr, &b2, dense_down, true);
  EXPECT_LE(test::scaled_diff(span_of(sparse_down), span_of(dense_down)), 1e-5);
  Tensor bad = i32({0, 40});
  Tensor two = Tensor::empty(DType::F32, {R, 2});
  EXPECT_THROW(cpu->gather_up_relu(x, w1, &b1, &bad, two), Error);
}

// One decode step of three sequences over a random paged cache.
struct PagedStep {
  KVLayer cache;
  StepLayout layout;
  Tensor q;
};
PagedStep paged_step(int64_t H, int64_t Hkv, int64_t dh, std::mt19937_64& rng) {
  const int64_t bs = 4, blocks = 12;
  PagedStep s;
  s.cache = {random({blocks, Hkv, bs, dh}, rng), random({blocks, Hkv, bs, dh}, rng)};
  s.q = random({3, H, dh}, rng);
  Tensor tables = Tensor::empty(DType::I32, {3, 4});
  const std::vector<int32_t> t = {3, 7, 1, 0, 5, 2, 0, 0, 11, 4, 9, 8};
  std::copy(t.begin(), t.end(), tables.data<int32_t>());
  s.layout = {i32({13, 5, 15}), i32({0, 1, 2}), i32({7 * 4 + 1, 2 * 4 + 1, 8 * 4 + 3}), tables, i32({0, 1, 2, 3}),
              bs, 16, 1, i32({3})};
  return s;
}

TEST(SparseOps, SelectiveAttentionIsDenseAttentionWithTheSkippedHeadsZeroed) {
  auto cpu = make_cpu_backend();
  std::mt19937_64 rng(5);
  for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{4, 4}, {8, 2}, {6, 3}}) {
    const int64_t dh = 8, group = H / Hkv;
    PagedStep s = paged_step(H, Hkv, dh, rng);
    Tensor dense = Tensor::empty(DType::F32, {3, H, dh}), sparse = Tensor::empty(DType::F32, {3, H, dh});
    cpu->attention(s.q, s.cache, s.layout, 0.3f, 0, dense);
    // Token 0 keeps KV head 0, token 1 the last, token 2 the first again (k = 1 each).
    Tensor kv = Tensor::empty(DType::I32, {3, 1});
    kv.data<int32_t>()[0] = 0, kv.data<int32_t>()[1] = static_cast<int32_t>(Hkv - 1), kv.data<int32_t>()[2] = 0;
    std::fill(sparse.data<float>(), sparse.data<float>() + sparse.numel(), std::nanf(""));
    cpu->attention(s.q, s.cache, s.layout, 0.3f, 0, sparse, &kv);
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < dh; ++i) {
          const bool kept = h / group == kv.data<int32_t>()[t];
          const float want = kept ? dense.data<float>()[(t * H + h) * dh + i] : 0.0f;
          ASSERT_EQ(sparse.data<float>()[(t * H + h) * dh + i], want) << "H " << H << " Hkv " << Hkv << " t " << t;
        }
  }
}

TEST(SparseOps, L2NormsAndKeepHeads) {
  auto cpu = make_cpu_backend();
  std::mt19937_64 rng(11);
  const int64_t T = 3, H = 6, dh = 4;
  Tensor x = random({T, H, dh}, rng);
  // Per head, and per group of 3 heads (contiguous rows): sqrt of the sum of squares.
  for (int64_t group : {1, 3}) {
    const int64_t U = H / group, n = group * dh;
    Tensor norms = Tensor::empty(DType::F32, {T * U});
    cpu->l2_norms(x.reshape({T * U, n}), norms);
    for (int64_t r = 0; r < T * U; ++r) {
      double ss = 0;
      for (int64_t j = 0; j < n; ++j) ss += double(x.data<float>()[r * n + j]) * x.data<float>()[r * n + j];
      EXPECT_NEAR(norms.data<float>()[r], std::sqrt(ss), 1e-6) << "group " << group << " row " << r;
    }
  }
  // keep_heads: token 0 keeps query heads {1, 4}, token 1 {0, 5}, token 2 is flagged dense; then the same
  // selection read as groups of 3 (groups {0, 1} = everything, so nothing changes).
  Tensor heads = Tensor::empty(DType::I32, {T, 2});
  const std::vector<int32_t> pick = {1, 4, 0, 5, 2, 3};
  std::copy(pick.begin(), pick.end(), heads.data<int32_t>());
  Tensor dense = i32({0, 0, 1});
  Tensor y = copy_of(x);
  cpu->keep_heads(y, heads, 1, &dense);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const bool kept = t == 2 || h == pick[size_t(t * 2)] || h == pick[size_t(t * 2 + 1)];
      for (int64_t i = 0; i < dh; ++i)
        ASSERT_EQ(y.data<float>()[(t * H + h) * dh + i], kept ? x.data<float>()[(t * H + h) * dh + i] : 0.0f)
            << "t " << t << " h " << h;
    }
  Tensor groups = Tensor::empty(DType::I32, {T, 1});
  std::fill_n(groups.data<int32_t>(), T, 1);
  Tensor z = copy_of(x);
  cpu->keep_heads(z, groups, 3, nullptr);  // group 1 = heads 3..5
  for (int64_t i = 0; i < z.numel(); ++i)
    ASSERT_EQ(z.data<float>()[i], (i / dh) % H >= 3 ? x.data<float>()[i] : 0.0f) << i;
  // One set [1, k] for every token (a decode batch's MLP neurons in a mixed step): {0, 5} for tokens 0 and
  // 2, token 1 flagged dense.
  Tensor shared = i32({0, 5}).reshape({1, 2});
  Tensor w = copy_of(x), middle_dense = i32({0, 1, 0});
  cpu->keep_heads(w, shared, 1, &middle_dense);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const bool kept = t == 1 || h == 0 || h == 5;
      for (int64_t i = 0; i < dh; ++i)
        ASSERT_EQ(w.data<float>()[(t * H + h) * dh + i], kept ? x.data<float>()[(t * H + h) * dh + i] : 0.0f)
            << "shared set: t " << t << " h " << h;
    }
  // Group 2 (= the 2 groups) is padding (a tensor-parallel rank's list, localize_indices): it keeps nothing,
  // so a token listing only padding is zeroed; 3 is out of range.
  Tensor padding = Tensor::empty(DType::I32, {T, 1});
  std::fill_n(padding.data<int32_t>(), T, 2);
  Tensor p = copy_of(x);
  cpu->keep_heads(p, padding, 3, nullptr);
  for (int64_t i = 0; i < p.numel(); ++i) ASSERT_EQ(p.data<float>()[i], 0.0f) << i;
  Tensor outside = Tensor::empty(DType::I32, {T, 1});
  std::fill_n(outside.data<int32_t>(), T, 3);
  EXPECT_THROW(cpu->keep_heads(z, outside, 3, nullptr), Error);  // only groups 0 and 1 exist
}

TEST(SparseOps, LocalizeIndicesKeepsTheRanksRunRenumberedAndPads) {
  auto cpu = make_cpu_backend();
  // Units [4, 8) of a rank: row 0 owns 5 and 7, row 1 none, row 2 all four (m = 4).
  Tensor idx = i32({1, 5, 7, 9, 0, 1, 2, 3, 4, 5, 6, 7}).reshape({3, 4});
  Tensor out = Tensor::empty(DType::I32, {3, 4});
  cpu->localize_indices(idx, 4, 4, out);
  const std::vector<int32_t> want = {1, 3, 4, 4, 4, 4, 4, 4, 0, 1, 2, 3};
  EXPECT_EQ(std::vector<int32_t>(out.data<int32_t>(), out.data<int32_t>() + 12), want);
  Tensor narrow = Tensor::empty(DType::I32, {3, 2});
  EXPECT_THROW(cpu->localize_indices(idx, 4, 4, narrow), Error);  // a row may own min(k, count) = 4
}

TEST(SparseOps, SelectiveAttentionSkipsPaddingEntries) {
  auto cpu = make_cpu_backend();
  std::mt19937_64 rng(6);
  const int64_t H = 8, Hkv = 2, dh = 8;
  PagedStep s = paged_step(H, Hkv, dh, rng);
  Tensor one = Tensor::empty(DType::F32, {3, H, dh}), padded = Tensor::empty(DType::F32, {3, H, dh});
  // k = 1 against k = 2 with padding (Hkv): the same selection.
  Tensor kv1 = i32({1, 0, 1}).reshape({3, 1}), kv2 = i32({1, 2, 0, 2, 1, 2}).reshape({3, 2});
  cpu->attention(s.q, s.cache, s.layout, 0.3f, 0, one, &kv1);
  cpu->attention(s.q, s.cache, s.layout, 0.3f, 0, padded, &kv2);
  for (int64_t i = 0; i < one.numel(); ++i) ASSERT_EQ(padded.data<float>()[i], one.data<float>()[i]) << i;
}

// Greedy decoding of two prompts with random routers; returns the logits of every decode step.
std::vector<std::vector<float>> decode(Model& model, Sparsity* sparsity, int steps) {
  Engine e(model, {.kv_tokens = 256, .sparsity = sparsity});
  const std::vector<std::vector<int32_t>> prompts = {{5, 17, 42, 9}, {3, 8}};
  std::vector<SeqChunk> chunks;
  std::vector<int64_t> seqs;
  for (const auto& p : prompts) {
    seqs.push_back(e.add_sequence());
    chunks.push_back({seqs.back(), p});
  }
  Tensor logits = e.step(chunks, false);
  std::vector<std::vector<float>> out;
  std::vector<int32_t> next(2);
  for (int s = 0; s < steps; ++s) {
    const int64_t V = logits.dim(1);
    for (int i = 0; i < 2; ++i) {
      const float* row = logits.data<float>() + i * V;
      next[i] = static_cast<int32_t>(std::max_element(row, row + V) - row);
    }
    std::vector<SeqChunk> dec = {{seqs[0], std::span<const int32_t>(&next[0], 1)},
                                 {seqs[1], std::span<const int32_t>(&next[1], 1)}};
    logits = e.step(dec, false);
    out.emplace_back(logits.data<float>(), logits.data<float>() + logits.numel());
  }
  return out;
}

TEST(SparseModels, DensityOneIsDenseAndLowerDensitiesChangeTheDecode) {
  for (const char* fixture : {"opt", "llama_mha", "llama3_gqa"}) {
    SCOPED_TRACE(fixture);
    Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
    auto cpu = make_cpu_backend();
    auto model = make_model(ck, *cpu);
    const Routers routers = random_routers(ck.config, model_fingerprint(ck), 7, 16);
    Routers heads_only = routers;  // attention routers alone
    heads_only.mlp_k.reset();
    heads_only.mlp_rank = 0;
    for (LayerRouters& l : heads_only.layers) l.mlp_a = l.mlp_b = Tensor();
    const auto dense = decode(*model, nullptr, 4);
    RouterSparsity full(*model, heads_only, 1.0);
    EXPECT_EQ(decode(*model, &full, 4), dense);
    RouterSparsity half(*model, heads_only, 0.5);
    EXPECT_EQ(half.kept(), std::max<int64_t>(1, ck.config.n_kv_heads / 2));
    EXPECT_NE(decode(*model, &half, 4), dense);
    if (!routers.mlp_k) continue;
    // ReLU MLP: k = D everywhere is the dense MLP; the table's smaller k is not.
    Routers all_neurons = routers;
    for (auto& row : all_neurons.mlp_k->k) std::fill(row.begin(), row.end(), ck.config.ffn);
    RouterSparsity mlp_dense(*model, all_neurons, 1.0);
    EXPECT_EQ(decode(*model, &mlp_dense, 4), dense);
    RouterSparsity mlp_sparse(*model, routers, 1.0);
    EXPECT_LT(mlp_sparse.mlp_neurons_kept(1, 2), ck.config.ffn);
    EXPECT_NE(decode(*model, &mlp_sparse, 4), dense);
  }
}

// Routers of the fixture with the MLP part removed (attention sparsity alone).
Routers attention_routers(const Checkpoint& ck, uint64_t seed) {
  Routers r = random_routers(ck.config, model_fingerprint(ck), seed, 16);
  r.mlp_k.reset();
  r.mlp_rank = 0;
  for (LayerRouters& l : r.layers) l.mlp_a = l.mlp_b = Tensor();
  return r;
}

// Scoring a text in one pass with every token after the first sparse (sparse_from = 1) gives the logits
// that feeding it one decode step at a time gives: each token's selection (heads, and for OPT MLP neurons)
// depends only on its own hidden state, and every token's K/V (of all heads) are in the cache either way.
// The same holds for the oracle (chosen after each token's dense attention) and per query head.
TEST(SparseModels, ScoredPrefillEqualsTokenByTokenSparseDecode) {
  for (const char* fixture : {"opt", "llama_mha", "llama3_gqa"}) {
    for (const char* selector : {"router", "oracle", "oracle per query head"}) {
      SCOPED_TRACE(testing::Message() << fixture << ", " << selector);
      Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
      auto cpu = make_cpu_backend();
      auto model = make_model(ck, *cpu);
      RouterSparsity routers(*model, random_routers(ck.config, model_fingerprint(ck), 3, 16), 0.5);
      OracleSparsity oracle(*model, 0.5, std::string(selector) == "oracle" ? Granularity::Group : Granularity::Head);
      Sparsity& sparse = std::string(selector) == "router" ? static_cast<Sparsity&>(routers) : oracle;
      const std::vector<int32_t> text = {5, 17, 42, 9, 3, 8, 100, 7, 1, 60};
      Engine one_pass(*model, {.kv_tokens = 64, .sparsity = &sparse});
      Tensor all = one_pass.step({{one_pass.add_sequence(), text, 1}}, /*all_logits=*/true);
      Engine stepwise(*model, {.kv_tokens = 64, .sparsity = &sparse});
      const int64_t seq = stepwise.add_sequence(), V = ck.config.vocab_size;
      for (size_t i = 0; i < text.size(); ++i) {
        // The first token is a one-token prompt (dense), as sparse_from = 1 has it; then decode steps.
        const std::optional<int64_t> dense_first = i == 0 ? std::optional<int64_t>(1) : std::nullopt;
        Tensor row = stepwise.step({{seq, std::span<const int32_t>(&text[i], 1), dense_first}}, false);
        ASSERT_LE(test::scaled_diff(span_of(row), span_of(all).subspan(i * V, V)), 2e-5) << "token " << i;
      }
      // And the dense rows of a scored step are the dense model's.
      Engine dense(*model, {.kv_tokens = 64});
      Tensor d = dense.step({{dense.add_sequence(), text}}, true);
      EXPECT_LE(test::scaled_diff(span_of(d).first(V), span_of(all).first(V)), 1e-6);
      double differs = 0;
      for (int64_t j = V; j < d.numel(); ++j) differs = std::max(differs, double(std::abs(d.data<float>()[j] - all.data<float>()[j])));
      EXPECT_GT(differs, 1e-3);  // the sparse rows are not the dense ones
    }
  }
}

TEST(SparseModels, RandomSelectorKeepsKDistinctHeadsReproducibly) {
  Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  auto cpu = make_cpu_backend();
  auto model = make_model(ck, *cpu);
  RandomSparsity a(*model, 0.5, 9), b(*model, 0.5, 9), c(*model, 0.5, 10);
  const int64_t Hkv = ck.config.n_kv_heads, k = a.kept();
  ASSERT_EQ(k, std::max<int64_t>(1, Hkv / 2));
  Tensor h = Tensor::zeros(DType::F32, {40, ck.config.hidden});
  EXPECT_FALSE(a.attention_heads(0, h).defined());  // layer 0 stays dense
  (void)b.attention_heads(0, h), (void)c.attention_heads(0, h);
  std::vector<int32_t> first = ints(a.attention_heads(1, h)), again = ints(b.attention_heads(1, h));
  EXPECT_EQ(first, again);                             // same seed, same draw
  EXPECT_NE(first, ints(c.attention_heads(1, h)));     // another seed, another draw
  EXPECT_NE(first, ints(a.attention_heads(1, h)));     // the next call draws anew
  std::set<std::vector<int32_t>> seen;
  for (int64_t t = 0; t < 40; ++t) {
    std::vector<int32_t> row(first.begin() + t * k, first.begin() + (t + 1) * k);
    EXPECT_TRUE(std::is_sorted(row.begin(), row.end()) && std::adjacent_find(row.begin(), row.end()) == row.end());
    for (int32_t g : row) EXPECT_TRUE(g >= 0 && g < Hkv);
    seen.insert(row);
  }
  EXPECT_GT(seen.size(), 1u);  // not the same heads for every token
}

// Evaluation's sparse scoring is serving's semantics: a continuation's log-likelihood equals prefilling
// the context densely and decoding the continuation one sparse step at a time (OPT: with its MLP routers),
// whatever else shares the pass; density 1.0 without MLP routers is dense.
TEST(SparseModels, SparseScoringEqualsDensePrefillThenSparseDecode) {
  for (const char* fixture : {"opt", "opt_postln_proj", "llama_mha", "llama3_gqa"}) {
    SCOPED_TRACE(fixture);
    Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
    auto cpu = make_cpu_backend();
    auto model = make_model(ck, *cpu);
    RouterSparsity half(*model, random_routers(ck.config, model_fingerprint(ck), 5, 16), 0.5);
    RouterSparsity full(*model, attention_routers(ck, 5), 1.0);
    const std::vector<ScoreRequest> requests = {{{5, 17, 42, 9, 3, 8, 100}, 4, 0}, {{1, 2, 3, 60, 61}, 2, 0}};
    const std::vector<Score> dense = score(*model, requests, {});
    const std::vector<Score> at_one = score(*model, requests, {.sparsity = &full});
    const std::vector<Score> sparse = score(*model, requests, {.batch = 2, .sparsity = &half});
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(at_one[i].logprob, dense[i].logprob);
      const ScoreRequest& r = requests[i];
      Engine e(*model, {.kv_tokens = 64, .sparsity = &half});
      const int64_t seq = e.add_sequence(), V = ck.config.vocab_size;
      Tensor logits = e.step({{seq, std::span<const int32_t>(r.tokens.data(), r.context_len)}}, false);
      double logprob = 0;
      for (size_t t = r.context_len; t < r.tokens.size(); ++t) {
        logprob += log_prob(logits.data<float>(), V, r.tokens[t]);
        if (t + 1 < r.tokens.size()) logits = e.step({{seq, std::span<const int32_t>(&r.tokens[t], 1)}}, false);
      }
      EXPECT_NEAR(sparse[i].logprob, logprob, test::scaled_tol(1e-5, logprob)) << "request " << i;
      EXPECT_GT(std::abs(sparse[i].logprob - dense[i].logprob), 1e-4);
    }
  }
}

TEST(SparseModels, SparseFromOutsideTheChunkIsRefused) {
  Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama_mha"));
  auto cpu = make_cpu_backend();
  auto model = make_model(ck, *cpu);
  RouterSparsity sparse(*model, attention_routers(ck, 3), 0.5);
  Engine e(*model, {.kv_tokens = 64, .sparsity = &sparse});
  const std::vector<int32_t> text = {5, 17, 42};
  EXPECT_THROW(e.step({{e.add_sequence(), text, 4}}, true), Error);
}

TEST(SparseModels, RouterSparsityRejectsRoutersThatDoNotFit) {
  Checkpoint opt = load_checkpoint(test::shared_path("fixtures/hf/opt"));
  auto cpu = make_cpu_backend();
  auto model = make_model(opt, *cpu);
  const Routers right = random_routers(opt.config, model_fingerprint(opt), 1, 16);
  Routers wrong = right;
  wrong.layers[1].attn_w = Tensor::zeros(DType::F32, {opt.config.n_heads + 1, opt.config.hidden});
  EXPECT_THROW(RouterSparsity(*model, wrong, 0.5), Error);
  wrong = right;
  wrong.layers[2].mlp_b = Tensor::zeros(DType::F32, {opt.config.ffn - 1, 16});
  EXPECT_THROW(RouterSparsity(*model, wrong, 0.5), Error);
  wrong = right;
  wrong.layers.pop_back();
  EXPECT_THROW(RouterSparsity(*model, wrong, 0.5), Error);
  EXPECT_THROW(RouterSparsity(*model, right, 0.0), Error);
  EXPECT_THROW(RouterSparsity(*model, right, 1.5), Error);
}

// Logits of every token of `text` scored in one pass, tokens from `sparse_from` on sparse (as evaluation
// scores a continuation after a dense prompt).
Tensor scored(Model& model, Sparsity* sparsity, const std::vector<int32_t>& text, int64_t sparse_from = 1,
              Probe* probe = nullptr) {
  Engine e(model, {.kv_tokens = 64, .sparsity = sparsity});
  return e.step({{e.add_sequence(), text, sparsity ? std::optional<int64_t>(sparse_from) : std::nullopt}}, true,
                probe);
}

const std::vector<int32_t> kText = {5, 17, 42, 9, 3, 8, 100, 7, 1, 60, 33, 2};

bool same(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::equal(a.data<float>(), a.data<float>() + a.numel(), b.data<float>());
}

// The oracle and the routers keep every head at density 1.0, at either granularity: exactly dense.
TEST(SparseModels, EverySelectorAtDensityOneIsDense) {
  for (const char* fixture : {"opt", "llama_mha", "llama3_gqa"}) {
    SCOPED_TRACE(fixture);
    Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
    auto cpu = make_cpu_backend();
    auto model = make_model(ck, *cpu);
    const Tensor dense = scored(*model, nullptr, kText);
    for (Granularity g : {Granularity::Group, Granularity::Head}) {
      OracleSparsity oracle(*model, 1.0, g);
      RouterSparsity routers(*model, attention_routers(ck, 3), 1.0, g);
      RandomSparsity random(*model, 1.0, 4, g);
      EXPECT_TRUE(same(scored(*model, &oracle, kText), dense)) << granularity_name(g);
      EXPECT_TRUE(same(scored(*model, &routers, kText), dense)) << granularity_name(g);
      EXPECT_TRUE(same(scored(*model, &random, kText), dense)) << granularity_name(g);
    }
  }
}

// Routers of an OPT fixture whose k table keeps few MLP neurons at batch size 1 (k_one(l) at layer l) and
// every neuron at batch size 2: a scored pass that took k at its own token count instead of 1 would run
// the MLP densely.
Routers mlp_sparse_at_batch_one(const Checkpoint& ck, uint64_t seed, const std::function<int64_t(size_t)>& k_one) {
  Routers r = random_routers(ck.config, model_fingerprint(ck), seed, 16);
  r.mlp_k->batch_sizes = {1, 2};
  for (size_t l = 0; l < r.layers.size(); ++l) {
    r.mlp_k->k[l] = {k_one(l), ck.config.ffn};
    r.mlp_k->recall[l] = {std::nan(""), std::nan("")};
  }
  return r;
}

// Probe: each layer's MLP activations (the down projection's input).
struct ActProbe final : Probe {
  std::map<int, Tensor> act;
  void mlp_act(int layer, const Tensor& a) override { act[layer] = copy_of(a); }
};

// Issue 5's serving semantics for the MLP: in a scored pass each sparse token keeps the neurons a decode step
// of that token alone keeps (k at batch size 1): one pass over a text gives the logits of its dense prompt
// followed by one-token decode steps, at most k activations of a sparse token are nonzero, the dense
// tokens are the dense model's, and the MLP's sparsity shows in the sparse tokens' logits (attention is
// dense at density 1, so only the MLP differs from the dense model there).
TEST(SparseModels, ScoredPassGivesEachTokenTheMlpNeuronsOfItsOwnDecodeStep) {
  for (const char* fixture : {"opt", "opt_postln_proj"}) {
    Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
    auto cpu = make_cpu_backend();
    auto model = make_model(ck, *cpu);
    const int64_t D = ck.config.ffn, T = static_cast<int64_t>(kText.size()), V = ck.config.vocab_size;
    const int64_t context = 3;
    // 37 + 8l neurons at layer l (rounded up to 40, 48, ...), ~1/6 of D.
    const Routers routers = mlp_sparse_at_batch_one(ck, 9, [](size_t l) { return int64_t(37 + 8 * l); });
    const Tensor dense = scored(*model, nullptr, kText);
    for (double density : {1.0, 0.5}) {
      SCOPED_TRACE(testing::Message() << fixture << " density " << density);
      RouterSparsity sparse(*model, routers, density), heads_only(*model, attention_routers(ck, 9), density);
      for (int64_t l = 0; l < ck.config.n_layers; ++l) {
        ASSERT_EQ(sparse.mlp_neurons_kept(static_cast<int>(l), 1), mlp_neurons_rounded(37 + 8 * l, D));
        ASSERT_EQ(sparse.mlp_neurons_kept(static_cast<int>(l), 2), D);
      }
      ActProbe probe;
      const Tensor all = scored(*model, &sparse, kText, context, &probe);
      // Serving: the prompt prefilled densely, then one decode step per token.
      Engine e(*model, {.kv_tokens = 64, .sparsity = &sparse});
      const int64_t seq = e.add_sequence();
      Tensor row = e.step({{seq, std::span<const int32_t>(kText.data(), context)}}, false);
      for (int64_t t = context - 1; t < T; ++t) {
        if (t >= context) row = e.step({{seq, std::span<const int32_t>(&kText[t], 1)}}, false);
        ASSERT_LE(test::scaled_diff(span_of(row), span_of(all).subspan(t * V, V)), 2e-5) << "token " << t;
      }
      for (const auto& [layer, act] : probe.act)
        for (int64_t t = context; t < T; ++t) {
          const float* a = act.data<float>() + t * D;
          EXPECT_LE(std::count_if(a, a + D, [](float v) { return v != 0.0f; }), sparse.mlp_neurons_kept(layer, 1))
              << "layer " << layer << " token " << t;
        }
      const Tensor attention_only = scored(*model, &heads_only, kText, context);
      EXPECT_TRUE(std::equal(dense.data<float>(), dense.data<float>() + context * V, all.data<float>()));
      EXPECT_TRUE(std::equal(attention_only.data<float>(), attention_only.data<float>() + context * V, all.data<float>()));
      double differs = 0;
      for (int64_t i = context * V; i < T * V; ++i)
        differs = std::max(differs, double(std::abs(attention_only.data<float>()[i] - all.data<float>()[i])));
      EXPECT_GT(differs, 1e-3);  // the MLP's neuron sets change the sparse tokens' logits
      if (density == 1.0) {
        EXPECT_TRUE(same(attention_only, dense));
      }
    }
    // No MLP sparsity where the k table keeps every neuron, or more than 0.8 · D (which runs dense): exactly
    // the dense model at density 1.
    for (int64_t k : {D, D * 17 / 20}) {
      RouterSparsity all_neurons(*model, mlp_sparse_at_batch_one(ck, 9, [&](size_t) { return k; }), 1.0);
      EXPECT_TRUE(same(scored(*model, &all_neurons, kText, context), dense)) << fixture << " k " << k;
    }
  }
}

// Records what the oracle is given and what it keeps.
class RecordingOracle final : public Sparsity {
 public:
  RecordingOracle(const Model& model, double density, Granularity g) : oracle_(model, density, g) {}
  Tensor attention_heads(int layer, const Tensor& h) override { return oracle_.attention_heads(layer, h); }
  Tensor mlp_neurons(int, const Tensor&, const StepLayout&) override { return Tensor(); }
  bool per_query_head() const override { return oracle_.per_query_head(); }
  Tensor heads_from_attention(int layer, const Tensor& attn) override {
    Tensor kept = oracle_.heads_from_attention(layer, attn);
    if (kept.defined()) seen[layer] = {copy_of(attn), kept};
    return kept;
  }
  const OracleSparsity& oracle() const { return oracle_; }
  std::map<int, std::pair<Tensor, Tensor>> seen;  // layer -> (attention output, kept units)

 private:
  OracleSparsity oracle_;
};

// Probe: each layer's per-head output norms, as calibration collects them.
struct NormProbe final : Probe {
  std::map<int, Tensor> norms;
  void head_norms(int layer, const Tensor& n) override { norms[layer] = copy_of(n); }
};

// Brute force: per token, the k best of n units by the L2 norm of their rows (ties to the lower index),
// ascending.
std::vector<int32_t> brute_top(const std::vector<double>& norm, int64_t k) {
  std::vector<int32_t> order(norm.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return norm[a] > norm[b]; });
  order.resize(size_t(k));
  std::sort(order.begin(), order.end());
  return order;
}

TEST(SparseModels, OracleKeepsTheLargestTrueHeadOutputs) {
  for (const char* fixture : {"llama_mha", "llama3_gqa"}) {
    Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
    auto cpu = make_cpu_backend();
    auto model = make_model(ck, *cpu);
    const ModelConfig& c = ck.config;
    // Dense head norms of the same text: layer 1 of the sparse pass sees the dense model's state (layer 0
    // is dense), so its choice must be calibration's top-k of these.
    NormProbe probe;
    {
      Engine e(*model, {.kv_tokens = 64});
      e.step({{e.add_sequence(), kText}}, true, &probe);
    }
    for (Granularity g : {Granularity::Group, Granularity::Head})
      for (double density : {0.5, 0.75}) {
        SCOPED_TRACE(testing::Message() << fixture << " " << granularity_name(g) << " density " << density);
        RecordingOracle rec(*model, density, g);
        const int64_t U = rec.oracle().units(), k = rec.oracle().kept(), group = c.n_heads / U;
        EXPECT_EQ(k, std::max<int64_t>(1, static_cast<int64_t>(density * double(U))));
        EXPECT_FALSE(same(scored(*model, &rec, kText), scored(*model, nullptr, kText)));
        ASSERT_EQ(rec.seen.size(), size_t(c.n_layers - 1));  // layers 1..L-1
        const int64_t T = static_cast<int64_t>(kText.size()), dh = c.head_dim;
        for (const auto& [layer, record] : rec.seen) {
          const auto& [attn, kept] = record;
          ASSERT_EQ(kept.shape(), (Shape{T, k}));
          for (int64_t t = 0; t < T; ++t) {
            std::vector<double> norm(size_t(U), 0), dense_norm(size_t(U), 0);
            for (int64_t h = 0; h < c.n_heads; ++h) {
              for (int64_t i = 0; i < dh; ++i) {
                const double v = attn.data<float>()[(t * c.n_heads + h) * dh + i];
                norm[size_t(h / group)] += v * v;
              }
              const double n = probe.norms.at(layer).data<float>()[t * c.n_heads + h];
              dense_norm[size_t(h / group)] += n * n;
            }
            const std::vector<int32_t> got(kept.data<int32_t>() + t * k, kept.data<int32_t>() + (t + 1) * k);
            EXPECT_EQ(got, brute_top(norm, k)) << "layer " << layer << " token " << t;
            if (layer == 1) {
              EXPECT_EQ(got, brute_top(dense_norm, k)) << "token " << t;
            }
          }
        }
      }
  }
}

// Keeps the same query heads (or KV groups) for every token at layers >= 1.
class FixedHeads final : public Sparsity {
 public:
  FixedHeads(std::vector<int32_t> heads, bool per_query_head) : heads_(std::move(heads)), per_head_(per_query_head) {}
  Tensor attention_heads(int layer, const Tensor& h) override {
    if (layer == 0) return Tensor();
    const int64_t T = h.dim(0), k = static_cast<int64_t>(heads_.size());
    Tensor idx = Tensor::empty(DType::I32, {T, k});
    for (int64_t t = 0; t < T; ++t) std::copy(heads_.begin(), heads_.end(), idx.data<int32_t>() + t * k);
    return idx;
  }
  Tensor mlp_neurons(int, const Tensor&, const StepLayout&) override { return Tensor(); }
  bool per_query_head() const override { return per_head_; }

 private:
  std::vector<int32_t> heads_;
  bool per_head_;
};

// Per-query-head selection keeping all H heads is dense; keeping a known set equals the dense model whose
// output projections ignore the other heads (their o_proj columns zeroed at layers >= 1).
TEST(SparseModels, HeadGranularityIsDenseWithTheOtherQueryHeadsZeroed) {
  Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  const ModelConfig& c = ck.config;
  auto cpu = make_cpu_backend();
  auto model = make_model(ck, *cpu);
  std::vector<int32_t> all(size_t(c.n_heads));
  std::iota(all.begin(), all.end(), 0);
  FixedHeads every(all, true);
  EXPECT_TRUE(same(scored(*model, &every, kText), scored(*model, nullptr, kText)));
  // Heads 1, 2 and 6 of 8: a part of each of the two KV groups, which group selection cannot express.
  const std::vector<int32_t> keep = {1, 2, 6};
  FixedHeads some(keep, true);
  const Tensor sparse = scored(*model, &some, kText, /*sparse_from=*/0);
  Checkpoint masked = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  for (int64_t l = 1; l < c.n_layers; ++l) {
    const std::string name = fmt::format("model.layers.{}.self_attn.o_proj.weight", l);
    Tensor w = copy_of(ck.get(name, {c.hidden, c.q_dim()}));
    for (int64_t h = 0; h < c.n_heads; ++h)
      if (std::find(keep.begin(), keep.end(), h) == keep.end())
        for (int64_t r = 0; r < c.hidden; ++r) std::fill_n(w.data<float>() + r * c.q_dim() + h * c.head_dim, c.head_dim, 0.0f);
    masked.tensors[name] = w;
  }
  auto masked_model = make_model(masked, *cpu);
  const Tensor reference = scored(*masked_model, nullptr, kText);
  EXPECT_LE(test::scaled_diff(span_of(sparse), span_of(reference)), 1e-5);
  // Routers at head granularity pick per query head: k of H, not whole groups.
  RouterSparsity heads(*model, attention_routers(ck, 3), 0.5, Granularity::Head);
  EXPECT_TRUE(heads.per_query_head());
  EXPECT_EQ(heads.kept(), c.n_heads / 2);
  EXPECT_EQ(heads.kv_heads_read(1), c.n_kv_heads);
  Tensor h = Tensor::zeros(DType::F32, {2, c.hidden});
  EXPECT_EQ(heads.attention_heads(1, h).shape(), (Shape{2, c.n_heads / 2}));
  // MHA: a head is a group, and head granularity stays on the selective attention path.
  Checkpoint mha = load_checkpoint(test::shared_path("fixtures/hf/llama_mha"));
  auto mha_model = make_model(mha, *cpu);
  EXPECT_FALSE(OracleSparsity(*mha_model, 0.5, Granularity::Head).per_query_head());
}

TEST(SparseModels, StaticSelectionIsTheSameForEveryToken) {
  Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  auto cpu = make_cpu_backend();
  auto model = make_model(ck, *cpu);
  Routers r = attention_routers(ck, 3);
  EXPECT_THAT(test::error_of([&] { StaticSparsity(*model, r, 0.5, "r.safetensors"); }),
              ::testing::HasSubstr("r.safetensors records no head importance"));
  // Shares: heads ranked 7, 6, ..., 0 with a tie between 2 and 5 at layer 1; group 1 above group 0.
  for (size_t l = 1; l < r.layers.size(); ++l) {
    r.layers[l].head_share = f32({8}, {0.0f, 0.1f, 0.4f, 0.3f, 0.35f, 0.4f, 0.6f, 0.9f});
    r.layers[l].group_share = f32({2}, {0.2f, 0.8f});
  }
  StaticSparsity groups(*model, r, 0.5, "r", Granularity::Group);
  StaticSparsity heads(*model, r, 0.5, "r", Granularity::Head);
  EXPECT_EQ(groups.kept_units(1), (std::vector<int32_t>{1}));
  EXPECT_EQ(heads.kept_units(1), (std::vector<int32_t>{2, 5, 6, 7}));  // of the tie, the lower index first
  std::mt19937_64 rng(2);
  Tensor h = random({5, ck.config.hidden}, rng);
  EXPECT_FALSE(heads.attention_heads(0, h).defined());
  EXPECT_EQ(ints(heads.attention_heads(2, h)),
            (std::vector<int32_t>{2, 5, 6, 7, 2, 5, 6, 7, 2, 5, 6, 7, 2, 5, 6, 7, 2, 5, 6, 7}));
  EXPECT_FALSE(same(scored(*model, &groups, kText), scored(*model, nullptr, kText)));
}

TEST(SparseModels, UnknownGranularityIsAClearError) {
  EXPECT_EQ(parse_granularity("head"), Granularity::Head);
  EXPECT_EQ(parse_granularity("group"), Granularity::Group);
  EXPECT_THAT(test::error_of([] { parse_granularity("heads"); }),
              ::testing::HasSubstr("unknown granularity 'heads': choose group (KV groups) or head (query heads)"));
}

// ---- Adaptive selection (issue 19): threshold rules over fixed-capacity lists, density schedules.

TEST(SparseOps, RouteHeadsCutoffKeepsUnitsAboveTheThresholdBetweenKminAndK) {
  auto cpu = make_cpu_backend();
  const float nan = std::nanf("");
  // Threshold 1.5, kmin 2, capacity 4. Row 0: 3, 2, 2 clear it -> {1, 5, 7} and one padding slot (8);
  // row 1: nothing clears it (NaN ranks last) -> the best 2, {1, 2} (ties to the lower index); row 2:
  // nothing either -> its best 2, -1 and -2 at {3, 4}.
  Tensor scores = f32({3, 8}, {0, 3, 1, 0.5f, 0, 2, 0, 2, /**/ nan, 1, 1, 1, 1, 1, 1, 0,
                               /**/ -5, -4, -3, -2, -1, -6, -7, -8});
  Tensor idx = Tensor::empty(DType::I32, {3, 4});
  // The tally counts live rows (the first 2) not flagged dense (row 0 is): row 1 alone, 2 units.
  Tensor tally = i32({0, 0}), live = i32({2}), dense = i32({1, 0, 0});
  HeadCutoff cut{.kmin = 2, .value = 1.5f, .tally = &tally, .live_rows = &live, .dense_rows = &dense};
  cpu->route_heads(scores, 1, idx, &cut);
  EXPECT_EQ(ints(idx), (std::vector<int32_t>{1, 5, 7, 8, /**/ 1, 2, 8, 8, /**/ 3, 4, 8, 8}));
  EXPECT_EQ(ints(tally), (std::vector<int32_t>{2, 1}));
  // A capacity below what clears the threshold keeps the best k: threshold 0.5 clears 5 units of row 0.
  Tensor three = Tensor::empty(DType::I32, {3, 3});
  HeadCutoff low{.kmin = 1, .value = 0.5f};
  cpu->route_heads(scores, 1, three, &low);
  const std::vector<int32_t> first_row = ints(three);
  EXPECT_EQ(std::vector<int32_t>(first_row.begin(), first_row.begin() + 3), (std::vector<int32_t>{1, 5, 7}));
  // Statistical top-k: units {0, 0, 0, 4} (groups of 2 over 8 heads) have mean 1 and std sqrt(3): c = 1
  // puts the line at 2.73 (only unit 3), c = -1 at -0.73 (all four).
  Tensor row = f32({1, 8}, {0, -1, 0, -2, -3, 0, 4, 1});
  Tensor units = Tensor::empty(DType::I32, {1, 4});
  HeadCutoff stat{.kmin = 1, .value = 1.0f, .row_stat = true};
  cpu->route_heads(row, 2, units, &stat);
  EXPECT_EQ(ints(units), (std::vector<int32_t>{3, 4, 4, 4}));
  stat.value = -1.0f;
  cpu->route_heads(row, 2, units, &stat);
  EXPECT_EQ(ints(units), (std::vector<int32_t>{0, 1, 2, 3}));
  HeadCutoff too_many{.kmin = 5};
  EXPECT_THAT(test::error_of([&] { cpu->route_heads(scores, 1, idx, &too_many); }),
              ::testing::HasSubstr("kmin 5 outside [1, 4]"));
}

// A threshold that keeps everything is the full selection; kmin = k is top-k whatever the threshold; and in
// between, a row's units are exactly the top n for its count n.
TEST(SparseOps, RouteHeadsCutoffIdentities) {
  auto cpu = make_cpu_backend();
  std::mt19937_64 rng(11);
  const Tensor scores = random({37, 24}, rng, -2, 2);
  for (int64_t group : {1, 3}) {
    const int64_t G = 24 / group;
    Tensor all = Tensor::empty(DType::I32, {37, G}), top_all = Tensor::empty(DType::I32, {37, G});
    HeadCutoff everything{.kmin = 1, .value = -INFINITY};
    cpu->route_heads(scores, group, all, &everything);
    cpu->route_heads(scores, group, top_all);
    EXPECT_EQ(ints(all), ints(top_all));
    const int64_t k = G / 2;
    Tensor top = Tensor::empty(DType::I32, {37, k}), pinned = Tensor::empty(DType::I32, {37, k});
    cpu->route_heads(scores, group, top);
    for (float value : {-10.0f, 0.0f, 10.0f})
      for (bool row_stat : {false, true}) {
        HeadCutoff cut{.kmin = k, .value = value, .row_stat = row_stat};
        cpu->route_heads(scores, group, pinned, &cut);
        EXPECT_EQ(ints(pinned), ints(top)) << "group " << group << " value " << value << " stat " << row_stat;
      }
    HeadCutoff mid{.kmin = 1, .value = 0.5f, .row_stat = true};
    Tensor var = Tensor::empty(DType::I32, {37, G});
    cpu->route_heads(scores, group, var, &mid);
    std::set<int64_t> counts;
    const std::vector<int32_t> rows = ints(var);
    for (int64_t r = 0; r < 37; ++r) {
      const std::vector<int32_t> row(rows.begin() + r * G, rows.begin() + (r + 1) * G);
      const int64_t n = std::find(row.begin(), row.end(), static_cast<int32_t>(G)) - row.begin();
      counts.insert(n);
      ASSERT_GE(n, 1);
      EXPECT_TRUE(std::all_of(row.begin() + n, row.end(), [&](int32_t u) { return u == G; }));
      Tensor top_n = Tensor::empty(DType::I32, {1, n});
      cpu->route_heads(scores.slice_rows(r, r + 1), group, top_n);
      EXPECT_EQ(std::vector<int32_t>(row.begin(), row.begin() + n), ints(top_n)) << "row " << r;
    }
    EXPECT_GT(counts.size(), 1u) << "the counts vary between rows";
  }
}

// Selection statistics for the model's routers, the same at every layer: flat score and z quantiles at
// `cutoff` and a concave coverage curve 1 - (1 - k/n)².
Routers with_selection_stats(Routers r, const ModelConfig& c, float cutoff) {
  auto stats = [&](int64_t units) {
    UnitStats u;
    u.score.assign(kSelectionQuantiles + 1, cutoff);
    u.z = u.score;
    for (int64_t k = 0; k <= units; ++k) {
      const double rest = 1.0 - double(k) / double(units);
      u.coverage.push_back(static_cast<float>(1.0 - rest * rest));
    }
    return u;
  };
  r.selection = SelectionStats{};
  r.selection->group.resize(static_cast<size_t>(c.n_layers));
  r.selection->head.resize(static_cast<size_t>(c.n_layers));
  for (size_t l = 1; l < static_cast<size_t>(c.n_layers); ++l) {
    r.selection->group[l] = stats(c.n_kv_heads);
    r.selection->head[l] = stats(c.n_heads);
  }
  return r;
}

// The identities of issue 19 on whole models: a threshold that keeps everything decodes as the dense model;
// kmin = kmax = k decodes as top-k; a calibrated schedule over layers of equal importance is the uniform
// one; and the density reached is tallied over the sparse decode tokens only.
TEST(SparseModels, AdaptiveSelectionIdentities) {
  for (const char* fixture : {"opt", "llama_mha", "llama3_gqa"}) {
    SCOPED_TRACE(fixture);
    Checkpoint ck = load_checkpoint(test::shared_path(std::string("fixtures/hf/") + fixture));
    auto cpu = make_cpu_backend();
    auto model = make_model(ck, *cpu);
    const Routers keep_all = with_selection_stats(attention_routers(ck, 3), ck.config, -1e30f);
    const Routers keep_few = with_selection_stats(attention_routers(ck, 3), ck.config, 1e30f);
    const auto dense = decode(*model, nullptr, 4);
    for (SelectionRule rule : {SelectionRule::Threshold, SelectionRule::StatTopK}) {
      RouterSparsity all(*model, keep_all, 0.5, Granularity::Group, TpHeads::Global, {.rule = rule});
      EXPECT_FALSE(all.density_reached().has_value()) << "no step yet";
      EXPECT_EQ(decode(*model, &all, 4), dense);
      EXPECT_EQ(all.density_reached(), 1.0);
      RouterSparsity topk(*model, keep_all, 0.5);
      const int64_t k = topk.kept();
      RouterSparsity pinned(*model, keep_few, 0.5, Granularity::Group, TpHeads::Global,
                            {.rule = rule, .kmin = k, .kmax = k});
      EXPECT_EQ(decode(*model, &pinned, 4), decode(*model, &topk, 4));
      EXPECT_EQ(pinned.density_reached(), double(k) / double(ck.config.n_kv_heads));
      // kmin alone: the threshold keeps nothing above it, so every token keeps kmin in a list of kmax.
      RouterSparsity floor(*model, keep_few, 0.5, Granularity::Group, TpHeads::Global, {.rule = rule, .kmin = 1});
      EXPECT_EQ(floor.width(1), ck.config.n_kv_heads);
      (void)decode(*model, &floor, 2);
      EXPECT_EQ(floor.density_reached(), 1.0 / double(ck.config.n_kv_heads));
    }
    // Equal importance everywhere: the calibrated schedule gives every layer the uniform k (densities
    // whose share is a whole number of units).
    const int64_t units = ck.config.n_kv_heads;
    const double density = double(units / 2) / double(units);
    RouterSparsity uniform(*model, keep_all, density);
    RouterSparsity calibrated(*model, keep_all, density, Granularity::Group, TpHeads::Global,
                              {.schedule = DensitySchedule::Calibrated});
    for (int l = 1; l < ck.config.n_layers; ++l) EXPECT_EQ(calibrated.layer_kept(l), uniform.kept());
    EXPECT_EQ(decode(*model, &calibrated, 4), decode(*model, &uniform, 4));
  }
}

// The calibrated schedule gives more units to a layer whose best units carry less of its output, keeps the
// total of the uniform schedule at the same mean, and at least one unit everywhere.
TEST(SparseModels, CalibratedScheduleFollowsCoverage) {
  const int64_t units = 4, layers = 4;
  std::vector<std::vector<float>> coverage(layers);
  coverage[1] = {0, 0.9f, 0.97f, 0.99f, 1};   // one unit carries almost everything
  coverage[2] = {0, 0.4f, 0.7f, 0.9f, 1};     // spread out
  coverage[3] = {0, 0.6f, 0.85f, 0.95f, 1};
  const std::vector<int64_t> k = layer_units(DensitySchedule::Calibrated, 0.5, units, layers, coverage);
  EXPECT_EQ(k, (std::vector<int64_t>{0, 1, 3, 2}));
  EXPECT_EQ(layer_units(DensitySchedule::Uniform, 0.5, units, layers), (std::vector<int64_t>{0, 2, 2, 2}));
  // A mean between whole units: 0.6 of 4 units over 3 layers is 7 units (uniform would keep 2 a layer).
  const std::vector<int64_t> k6 = layer_units(DensitySchedule::Calibrated, 0.6, units, layers, coverage);
  EXPECT_EQ(k6[1] + k6[2] + k6[3], 7);
  EXPECT_EQ(layer_units(DensitySchedule::Calibrated, 0.01, units, layers, coverage), (std::vector<int64_t>{0, 1, 1, 1}));
  EXPECT_THAT(test::error_of([&] { layer_units(DensitySchedule::Calibrated, 0.5, units, layers, {}); }),
              ::testing::HasSubstr("coverage of 0 layers for 4"));
  EXPECT_FLOAT_EQ(quantile_at({0, 1, 3}, 0.75), 2.0f);
  EXPECT_FLOAT_EQ(quantile_at({0, 1, 3}, 0), 0.0f);
}

// Asking a rule or schedule of routers without selection statistics names the routers and the remedy;
// bounds outside 1 <= kmin <= kmax <= units and bounds given to top-k are refused.
TEST(SparseModels, AdaptiveSelectionErrorsAreClear) {
  Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  auto cpu = make_cpu_backend();
  auto model = make_model(ck, *cpu);
  const Routers plain = attention_routers(ck, 3);
  EXPECT_THAT(test::error_of([&] {
                RouterSparsity(*model, plain, 0.5, Granularity::Group, TpHeads::Global,
                               {.rule = SelectionRule::Threshold}, "old.routers.safetensors");
              }),
              ::testing::HasSubstr("old.routers.safetensors records no selection statistics"));
  EXPECT_THAT(test::error_of([&] {
                RouterSparsity(*model, plain, 0.5, Granularity::Group, TpHeads::Global,
                               {.schedule = DensitySchedule::Calibrated});
              }),
              ::testing::HasSubstr("calibrate the routers again"));
  const Routers stats = with_selection_stats(plain, ck.config, 0);
  EXPECT_THAT(test::error_of([&] {
                RouterSparsity(*model, stats, 0.5, Granularity::Group, TpHeads::Global,
                               {.rule = SelectionRule::StatTopK, .kmin = 2, .kmax = 1});
              }),
              ::testing::HasSubstr("--kmin 2 and --kmax 1 must satisfy 1 <= kmin <= kmax <= 2"));
  EXPECT_THAT(test::error_of([&] {
                RouterSparsity(*model, stats, 0.5, Granularity::Group, TpHeads::Global, {.kmin = 2});
              }),
              ::testing::HasSubstr("--kmin and --kmax bound the threshold rules"));
  EXPECT_THAT(test::error_of([] { parse_selection_rule("top-k"); }),
              ::testing::HasSubstr("choose topk, threshold or stat-topk"));
}

}  // namespace
