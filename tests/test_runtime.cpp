// Runtime: batching must not change results (batched, chunked, joining/leaving sequences all equal each
// sequence run alone), the paged KV cache reuses blocks safely, the sampler draws what its parameters say,
// and perplexity() is exp(mean NLL) over the windows it documents.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>

#include "io/checkpoint.h"
#include "model/model.h"
#include "ops/kv_cache.h"
#include "runtime/engine.h"
#include "runtime/generate.h"
#include "runtime/perplexity.h"
#include "runtime/sampler.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;

namespace {

// Logits of batched and unbatched runs differ only by float summation order inside GEMMs (compared relative to
// their magnitude: test::scaled_diff).
constexpr double kLogitTol = 1e-5;

struct Loaded {
  Checkpoint ck;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};

// A fixture model on the CPU backend; window > 0 overrides the attention window (sliding-window attention).
Loaded load(const std::string& fixture, int64_t window = 0) {
  Loaded m;
  m.ck = load_checkpoint(test::shared_path("fixtures/hf/" + fixture));
  if (window) m.ck.config.sliding_window = window;
  m.backend = make_cpu_backend();
  m.model = make_model(m.ck, *m.backend);
  return m;
}

// n deterministic pseudo-random token ids below vocab.
std::vector<int32_t> tokens(int64_t n, uint32_t seed, int64_t vocab) {
  std::vector<int32_t> out;
  uint32_t x = seed * 2654435761u + 12345u;
  for (int64_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    out.push_back(static_cast<int32_t>((x >> 8) % vocab));
  }
  return out;
}

// Rows of a [R, vocab] logits tensor, copied out.
using Rows = std::vector<std::vector<float>>;
Rows rows_of(const Tensor& logits) {
  Rows r;
  for (int64_t i = 0; i < logits.dim(0); ++i)
    r.emplace_back(logits.data<float>() + i * logits.dim(1), logits.data<float>() + (i + 1) * logits.dim(1));
  return r;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return test::scaled_diff(a, b);
}

// Logits of every position of `stream` fed alone, in one step.
Rows alone(Model& model, const std::vector<int32_t>& stream) {
  Engine engine(model, {.kv_tokens = static_cast<int64_t>(stream.size())});
  return rows_of(engine.step({{engine.add_sequence(), stream}}, /*all_logits=*/true));
}

const std::vector<int64_t> kPromptLengths = {3, 11, 1, 7};

std::vector<std::vector<int32_t>> prompts_for(const ModelConfig& c) {
  std::vector<std::vector<int32_t>> p;
  for (size_t i = 0; i < kPromptLengths.size(); ++i) p.push_back(tokens(kPromptLengths[i], 100 + i, c.vocab_size));
  return p;
}

// ---- Batching invariance, on every fixture architecture (and one with a short sliding window, so that
// windowed attention is exercised across batch, chunk and block boundaries).

struct ModelCase {
  std::string fixture;
  int64_t window;
};

class RuntimeBatching : public ::testing::TestWithParam<ModelCase> {};

TEST_P(RuntimeBatching, GenerateBatchedAndChunkedEqualsAlone) {
  Loaded m = load(GetParam().fixture, GetParam().window);
  const auto prompts = prompts_for(m.model->config());
  GenerateOptions opt;
  opt.max_new_tokens = 6;
  std::vector<std::vector<int32_t>> each;
  for (auto& p : prompts) each.push_back(generate(*m.model, {p}, opt)[0]);
  for (auto& e : each) ASSERT_EQ(e.size(), 6u);
  EXPECT_EQ(generate(*m.model, prompts, opt), each) << "all prompts prefilled and decoded together";
  opt.max_step_tokens = 4;  // prompts split over steps, and steps mixing the tail of one prompt with another
  EXPECT_EQ(generate(*m.model, prompts, opt), each) << "chunked prefill";
  opt.max_step_tokens = 1;
  EXPECT_EQ(generate(*m.model, prompts, opt), each) << "one prompt token per step";
}

// Feeds the streams to one Engine, every unfinished stream getting up to `chunk` tokens per step (so with a
// small chunk, streams finish at different steps); returns each stream's logits at every position.
std::vector<Rows> run_together(Model& model, const std::vector<std::vector<int32_t>>& streams, size_t chunk) {
  int64_t total = 0;
  for (auto& s : streams) total += static_cast<int64_t>(s.size()) + 16;
  Engine engine(model, {.kv_tokens = total, .block_size = 4});
  std::vector<int64_t> seq;
  for (size_t i = 0; i < streams.size(); ++i) seq.push_back(engine.add_sequence());
  std::vector<Rows> out(streams.size());
  std::vector<size_t> fed(streams.size(), 0);
  for (;;) {
    std::vector<SeqChunk> chunks;
    std::vector<size_t> owner;
    for (size_t i = 0; i < streams.size(); ++i) {
      const size_t take = std::min(chunk, streams[i].size() - fed[i]);
      if (take == 0) continue;
      chunks.push_back({seq[i], std::span<const int32_t>(streams[i]).subspan(fed[i], take)});
      owner.push_back(i);
      fed[i] += take;
    }
    if (chunks.empty()) break;
    Rows r = rows_of(engine.step(chunks, /*all_logits=*/true));
    size_t row = 0;
    for (size_t c = 0; c < chunks.size(); ++c)
      for (size_t t = 0; t < chunks[c].tokens.size(); ++t) out[owner[c]].push_back(r[row++]);
  }
  return out;
}

TEST_P(RuntimeBatching, LogitsOfBatchedStepsEqualAlone) {
  Loaded m = load(GetParam().fixture, GetParam().window);
  auto streams = prompts_for(m.model->config());
  streams.push_back(tokens(29, 7, m.model->config().vocab_size));  // spans several KV blocks of 4
  std::vector<Rows> ref;
  for (auto& s : streams) ref.push_back(alone(*m.model, s));
  for (size_t chunk : {size_t(1000), size_t(4), size_t(1)}) {
    SCOPED_TRACE("chunk " + std::to_string(chunk));
    std::vector<Rows> got = run_together(*m.model, streams, chunk);
    for (size_t i = 0; i < streams.size(); ++i) {
      ASSERT_EQ(got[i].size(), streams[i].size());
      for (size_t p = 0; p < streams[i].size(); ++p)
        ASSERT_LE(max_diff(got[i][p], ref[i][p]), kLogitTol) << "stream " << i << " position " << p;
    }
  }
}

// logits_from keeps each chunk's rows from that token on: the same values as all of them, fewer rows.
TEST_P(RuntimeBatching, LogitsFromKeepsEachChunksTail) {
  Loaded m = load(GetParam().fixture, GetParam().window);
  const auto streams = prompts_for(m.model->config());  // 3, 11, 1, 7 tokens
  const std::vector<int64_t> from = {2, 5, 0, 6};
  Engine engine(*m.model, {.kv_tokens = 64});
  std::vector<SeqChunk> chunks;
  for (size_t i = 0; i < streams.size(); ++i) chunks.push_back({engine.add_sequence(), streams[i], std::nullopt, from[i]});
  const Rows got = rows_of(engine.step(chunks, /*all_logits=*/true));
  size_t row = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    const Rows ref = alone(*m.model, streams[i]);
    for (size_t p = static_cast<size_t>(from[i]); p < streams[i].size(); ++p, ++row) {
      ASSERT_LT(row, got.size());
      EXPECT_LE(max_diff(got[row], ref[p]), kLogitTol) << "stream " << i << " position " << p;
    }
  }
  EXPECT_EQ(row, got.size());
}

INSTANTIATE_TEST_SUITE_P(Runtime, RuntimeBatching,
                         ::testing::Values(ModelCase{"opt", 0}, ModelCase{"opt_postln_proj", 0},
                                           ModelCase{"llama_mha", 0}, ModelCase{"llama3_gqa", 0},
                                           ModelCase{"mistral_gqa", 0}, ModelCase{"mistral_gqa", 5},
                                           ModelCase{"qwen2_gqa", 0}),
                         [](const auto& info) {
                           return info.param.fixture + (info.param.window ? "_window" + std::to_string(info.param.window)
                                                                          : std::string());
                         });

// ---- Engine used directly: sequences join and leave between steps.

// A stream's prompt and greedy continuation computed alone, with its logits at every position.
struct Reference {
  std::vector<int32_t> prompt, stream;  // stream = prompt + continuation
  Rows logits;
};

Reference reference(Model& model, std::vector<int32_t> prompt, int64_t new_tokens) {
  GenerateOptions opt;
  opt.max_new_tokens = new_tokens;
  Reference r;
  r.prompt = prompt;
  r.stream = prompt;
  const std::vector<int32_t> continuation = generate(model, {prompt}, opt)[0];
  r.stream.insert(r.stream.end(), continuation.begin(), continuation.end());
  r.logits = alone(model, r.stream);
  return r;
}

// Tracks one sequence of an Engine against its Reference: what to feed next and what must come back.
struct Live {
  const Reference* ref;
  int64_t seq;
  size_t fed = 0;
};

// One step: each live sequence gets its whole prompt (if not started) or its next token; each returned
// logits row must equal the reference's at that position, and its argmax the reference's next token.
void step_and_check(Engine& engine, std::vector<Live*> live) {
  std::vector<SeqChunk> chunks;
  for (Live* l : live) {
    const size_t n = l->fed == 0 ? l->ref->prompt.size() : 1;
    chunks.push_back({l->seq, std::span<const int32_t>(l->ref->stream).subspan(l->fed, n)});
    l->fed += n;
  }
  Rows r = rows_of(engine.step(chunks, /*all_logits=*/false));
  for (size_t i = 0; i < live.size(); ++i) {
    const Live& l = *live[i];
    ASSERT_LT(l.fed, l.ref->stream.size()) << "test feeds past its reference";
    EXPECT_LE(max_diff(r[i], l.ref->logits[l.fed - 1]), kLogitTol) << "seq " << l.seq << " position " << l.fed - 1;
    EXPECT_EQ(argmax(r[i].data(), static_cast<int64_t>(r[i].size())), l.ref->stream[l.fed]) << "seq " << l.seq;
    EXPECT_EQ(engine.length(l.seq), static_cast<int64_t>(l.fed));
  }
}

TEST(Runtime, SequencesJoinAndLeaveBetweenSteps) {
  Loaded m = load("llama3_gqa");
  const auto prompts = prompts_for(m.model->config());  // lengths 3, 11, 1, 7
  std::vector<Reference> ref;
  for (auto& p : prompts) ref.push_back(reference(*m.model, p, 8));
  Engine engine(*m.model, {.kv_tokens = 128, .block_size = 4});
  Live a{&ref[0], engine.add_sequence()}, b{&ref[1], engine.add_sequence()}, c{&ref[2], engine.add_sequence()};
  step_and_check(engine, {&a, &b, &c});  // prefill of three together
  step_and_check(engine, {&a, &b, &c});
  step_and_check(engine, {&c, &a});      // b sits one step out, order changes
  step_and_check(engine, {&a, &b, &c});
  engine.remove_sequence(b.seq);         // b leaves; its blocks go back to the pool ...
  Live d{&ref[3], engine.add_sequence()};  // ... and d joins: its prefill shares a step with decodes
  step_and_check(engine, {&a, &d, &c});
  for (int i = 0; i < 3; ++i) step_and_check(engine, {&d, &c, &a});
  EXPECT_THROW(engine.length(b.seq), Error);
  EXPECT_NE(d.seq, b.seq) << "sequence ids are not reused";
}

// ---- Paged KV cache.

TEST(Runtime, KvCacheAllocatesReleasesAndReusesBlocks) {
  auto backend = make_cpu_backend();
  KVCache cache(*backend, /*n_layers=*/2, /*n_kv_heads=*/1, /*head_dim=*/2, /*num_blocks=*/4, /*block_size=*/4,
                DType::F32);
  EXPECT_EQ(cache.free_blocks(), 4);
  cache.reserve(0, 5);  // 2 blocks
  EXPECT_EQ(cache.blocks(0).size(), 2u);
  EXPECT_EQ(cache.free_blocks(), 2);
  cache.reserve(0, 8);  // still 2 blocks
  EXPECT_EQ(cache.free_blocks(), 2);
  EXPECT_EQ(cache.slot(0, 5), cache.blocks(0)[1] * 4 + 1);
  EXPECT_THROW(cache.slot(0, 8), Error);  // position 8 is not reserved
  cache.reserve(1, 4);
  const std::vector<int32_t> before = cache.blocks(0);
  try {
    cache.reserve(0, 13);  // needs 2 more, 1 free
    FAIL() << "expected the pool to be exhausted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("KV cache exhausted"));
  }
  EXPECT_EQ(cache.blocks(0), before) << "a failed reserve leaves the sequence's blocks untouched";
  EXPECT_EQ(cache.free_blocks(), 1);
  cache.release(0);
  EXPECT_EQ(cache.free_blocks(), 3);
  EXPECT_THROW(cache.blocks(0), Error);
  cache.reserve(2, 12);  // 3 blocks: exactly the ones 0 gave back plus the free one
  EXPECT_EQ(cache.free_blocks(), 0);
  std::vector<int32_t> all = cache.blocks(1);
  all.insert(all.end(), cache.blocks(2).begin(), cache.blocks(2).end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int32_t>{0, 1, 2, 3})) << "every block owned by exactly one sequence";
  cache.release(7);  // unknown: no effect
  EXPECT_EQ(cache.free_blocks(), 0);
  // A new sequence the pool cannot hold is refused and leaves no (empty) entry behind.
  EXPECT_THROW(cache.reserve(9, 1), Error);
  EXPECT_THROW(cache.blocks(9), Error) << "a failed reserve of a new sequence registers nothing";
  cache.release(1);
  cache.reserve(9, 0);  // zero tokens: the sequence exists with no blocks
  EXPECT_TRUE(cache.blocks(9).empty());
}

// Prefix caching in the block allocator: published whole blocks outlive their sequence, a new sequence with
// the same leading tokens attaches them (and only whole blocks that match exactly, parent included), cached
// blocks count as free and are evicted least recently released first, a chain's tail before its head.
TEST(Runtime, KvCachePrefixBlocksAreSharedExactlyAndEvictedLast) {
  auto backend = make_cpu_backend();
  KVCache cache(*backend, 1, 1, 2, /*num_blocks=*/6, /*block_size=*/4, DType::F32);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // 2 whole blocks and 2 tokens
  cache.reserve(0, 10);
  cache.publish_prefix(0, std::span<const int32_t>(a).first(6));  // 1 whole block written so far
  EXPECT_EQ(cache.cached_blocks(), 1);
  cache.publish_prefix(0, a);
  EXPECT_EQ(cache.cached_blocks(), 2);
  const std::vector<int32_t> held = cache.blocks(0);

  // While 0 holds them: a second sequence shares them (read-only) and owns the rest.
  EXPECT_EQ(cache.attach_prefix(1, a), 8);
  EXPECT_EQ(std::vector<int32_t>(cache.blocks(1).begin(), cache.blocks(1).end()),
            (std::vector<int32_t>{held[0], held[1]}));
  cache.reserve(1, 12);
  EXPECT_NE(cache.blocks(1)[2], held[2]);
  EXPECT_EQ(cache.free_blocks(), 2);
  EXPECT_THROW(cache.attach_prefix(1, a), Error) << "a prefix attaches to a new sequence only";

  // Only whole blocks, only exact matches: a different second block stops at the first; a different
  // first block matches nothing.
  std::vector<int32_t> b = a;
  b[5] = 99;
  EXPECT_EQ(cache.attach_prefix(2, b), 4);
  std::vector<int32_t> c = a;
  c[0] = 99;
  EXPECT_EQ(cache.attach_prefix(3, c), 0);
  EXPECT_EQ(cache.attach_prefix(4, std::span<const int32_t>(a).first(7)), 4) << "7 tokens: one whole block";
  for (int64_t s : {1, 2, 3, 4}) cache.release(s);
  cache.release(0);
  EXPECT_EQ(cache.free_blocks(), 6) << "cached blocks nobody holds count as free";
  EXPECT_EQ(cache.cached_blocks(), 2);

  // After every holder left the blocks are still there for a newcomer.
  EXPECT_EQ(cache.attach_prefix(5, a), 8);
  EXPECT_EQ(cache.blocks(5)[0], held[0]);
  cache.release(5);

  // Pressure: 4 never-cached blocks go first, then the chain's tail, then its head.
  cache.reserve(6, 16);
  EXPECT_EQ(cache.cached_blocks(), 2);
  cache.reserve(6, 20);
  EXPECT_EQ(cache.cached_blocks(), 1) << "the tail was evicted";
  EXPECT_EQ(cache.attach_prefix(7, a), 4) << "the head is still cached";
  cache.release(7);
  cache.reserve(6, 24);
  EXPECT_EQ(cache.cached_blocks(), 0);
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_EQ(cache.attach_prefix(8, a), 0);
  cache.release(8);
  cache.release(6);

  // drop_cached forgets them all.
  cache.reserve(10, 8);
  cache.publish_prefix(10, std::span<const int32_t>(a).first(8));
  cache.release(10);
  EXPECT_EQ(cache.cached_blocks(), 2);
  cache.drop_cached();
  EXPECT_EQ(cache.cached_blocks(), 0);
  EXPECT_EQ(cache.free_blocks(), 6);
  EXPECT_EQ(cache.attach_prefix(13, a), 0);
  cache.release(13);

  // Two sequences computing the same prefix: the second's copy stays its own, and the chain goes on
  // through the first's blocks (its third block, published after, is found behind them).
  const std::vector<int32_t> d = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  cache.reserve(20, 8);
  cache.reserve(21, 12);
  cache.publish_prefix(20, std::span<const int32_t>(d).first(8));
  cache.publish_prefix(21, d);
  EXPECT_EQ(cache.cached_blocks(), 3);
  EXPECT_EQ(cache.attach_prefix(22, d), 12);
  EXPECT_EQ(cache.blocks(22)[0], cache.blocks(20)[0]);
  EXPECT_EQ(cache.blocks(22)[2], cache.blocks(21)[2]);
  for (int64_t s : {20, 21, 22}) cache.release(s);
  EXPECT_EQ(cache.free_blocks(), 6);
}

// The prefix cache under random use (sequences joining with shared or diverging prefixes, growing a token at a
// time, leaving; a pool small enough to evict all the time), against what the blocks hold: every block a
// sequence attaches was written by a computation of exactly the same leading tokens, no block a sequence
// writes is shared with another sequence, and all blocks come back at the end.
TEST(Runtime, KvCachePrefixSharingStaysExactUnderRandomUse) {
  auto backend = make_cpu_backend();
  constexpr int64_t kBlocks = 14, kBs = 2;
  KVCache cache(*backend, 1, 1, 2, kBlocks, kBs, DType::F32);
  struct Live {
    std::vector<int32_t> tokens;  // computed: positions [0, tokens.size())
    int64_t attached = 0;         // blocks [0, attached) shared, the rest its own
  };
  std::map<int64_t, Live> live;
  std::map<int32_t, std::vector<int32_t>> wrote;  // block -> the tokens up to its end when it was last filled
  uint32_t x = 12345;
  auto rnd = [&](uint32_t n) {
    x = x * 1664525u + 1013904223u;
    return (x >> 8) % n;
  };
  const std::vector<std::vector<int32_t>> bases = {{1, 2, 1, 2, 1, 2, 1, 2}, {1, 2, 2, 1, 1, 1, 2, 2}, {2, 2, 2, 2, 1, 1, 1, 1}};
  // The sequence computed its new positions: its own full blocks hold its prefix; then it publishes.
  auto computed = [&](int64_t id, Live& l) {
    const std::vector<int32_t>& b = cache.blocks(id);
    for (int64_t i = l.attached; i < static_cast<int64_t>(l.tokens.size()) / kBs; ++i)
      wrote[b[static_cast<size_t>(i)]] = std::vector<int32_t>(l.tokens.begin(), l.tokens.begin() + (i + 1) * kBs);
    cache.publish_prefix(id, l.tokens);
  };
  int64_t next = 0, attached_total = 0;
  for (int op = 0; op < 4000; ++op) {
    const uint32_t kind = rnd(10);
    if (kind < 4 || live.empty()) {  // a new sequence: a prefix of a base, then random tokens
      Live l;
      const auto& base = bases[rnd(3)];
      l.tokens.assign(base.begin(), base.begin() + rnd(9));
      for (uint32_t t = rnd(4); t > 0; --t) l.tokens.push_back(static_cast<int32_t>(1 + rnd(2)));
      if (l.tokens.empty()) l.tokens.push_back(1);
      const int64_t id = next++;
      const int64_t got = cache.attach_prefix(id, std::span<const int32_t>(l.tokens).first(l.tokens.size() - 1));
      ASSERT_EQ(got % kBs, 0);
      l.attached = got / kBs;
      attached_total += l.attached;
      for (int64_t i = 0; i < l.attached; ++i) {
        const int32_t b = cache.blocks(id)[static_cast<size_t>(i)];
        ASSERT_TRUE(wrote.contains(b)) << "attached block " << b << " was never filled";
        ASSERT_EQ(wrote[b], std::vector<int32_t>(l.tokens.begin(), l.tokens.begin() + (i + 1) * kBs))
            << "block " << b << " holds another prefix (op " << op << ")";
      }
      const int64_t need = (static_cast<int64_t>(l.tokens.size()) + kBs - 1) / kBs - l.attached;
      if (need > cache.free_blocks()) {
        cache.release(id);
        continue;
      }
      cache.reserve(id, static_cast<int64_t>(l.tokens.size()));
      computed(id, l);
      live[id] = l;
    } else if (kind < 7) {  // a live sequence decodes a token
      auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rnd(static_cast<uint32_t>(live.size()))));
      Live& l = it->second;
      const int64_t n = static_cast<int64_t>(l.tokens.size()) + 1;
      if ((n + kBs - 1) / kBs > static_cast<int64_t>(cache.blocks(it->first).size()) && cache.free_blocks() == 0) continue;
      cache.reserve(it->first, n);
      l.tokens.push_back(static_cast<int32_t>(1 + rnd(2)));
      computed(it->first, l);
    } else {  // one leaves
      auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rnd(static_cast<uint32_t>(live.size()))));
      cache.release(it->first);
      live.erase(it);
    }
    // No block a sequence will still write (one holding a position past its length) is held by anyone else.
    std::map<int32_t, int> writable, held;
    for (const auto& [id, l] : live) {
      const std::vector<int32_t>& b = cache.blocks(id);
      for (size_t i = 0; i < b.size(); ++i) {
        held[b[i]]++;
        if ((static_cast<int64_t>(i) + 1) * kBs > static_cast<int64_t>(l.tokens.size())) writable[b[i]]++;
      }
    }
    for (const auto& [b, n] : writable)
      ASSERT_EQ(held[b], 1) << "block " << b << " is written by one sequence and held by another (op " << op << ")";
    ASSERT_LE(static_cast<int64_t>(held.size()) + cache.free_blocks(), kBlocks);
  }
  EXPECT_GT(attached_total, 500) << "the prefixes were shared";
  for (const auto& [id, l] : live) cache.release(id);
  EXPECT_EQ(cache.free_blocks(), kBlocks);
}

// A full cache refuses a sequence cleanly; once another leaves, the newcomer reuses its blocks (still
// holding the old K/V) and gets exactly its alone results.
TEST(Runtime, EngineReusesReleasedBlocks) {
  Loaded m = load("llama_mha");
  const int64_t vocab = m.model->config().vocab_size;
  const Reference ra = reference(*m.model, tokens(18, 1, vocab), 3);
  const Reference rb = reference(*m.model, tokens(13, 2, vocab), 3);
  Engine engine(*m.model, {.kv_tokens = 24, .block_size = 8});  // 3 blocks
  Live a{&ra, engine.add_sequence()};
  step_and_check(engine, {&a});  // 18 tokens: 3 blocks
  Live b{&rb, engine.add_sequence()};
  try {
    step_and_check(engine, {&b});
    FAIL() << "expected the cache to be full";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("KV cache exhausted"));
  }
  EXPECT_EQ(engine.length(b.seq), 0) << "a refused step changes nothing";
  b.fed = 0;
  step_and_check(engine, {&a});  // a carries on unaffected
  engine.remove_sequence(a.seq);
  step_and_check(engine, {&b});
  step_and_check(engine, {&b});
  step_and_check(engine, {&b});
}

// Invalid steps are refused before anything is computed: the engine keeps working afterwards.
TEST(RuntimeBadInput, EngineRefusesInvalidStepsAndCarriesOn) {
  Loaded m = load("opt");  // context 128
  const ModelConfig& c = m.model->config();
  const Reference r = reference(*m.model, tokens(5, 3, c.vocab_size), 2);
  Engine engine(*m.model, {.kv_tokens = 256});
  Live l{&r, engine.add_sequence()};
  auto error_of = [&](const std::vector<SeqChunk>& chunks) -> std::string {
    try {
      engine.step(chunks, false);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  const std::vector<int32_t> too_big = {1, static_cast<int32_t>(c.vocab_size)}, negative = {-1}, empty;
  const std::vector<int32_t> too_long(c.max_positions + 1, 3);
  EXPECT_THAT(error_of({{l.seq, too_big}}), HasSubstr("token id 512 is out of range for a vocabulary of 512"));
  EXPECT_THAT(error_of({{l.seq, negative}}), HasSubstr("token id -1 is out of range"));
  EXPECT_THAT(error_of({{l.seq, empty}}), HasSubstr("no tokens"));
  EXPECT_THAT(error_of({{l.seq, r.prompt, std::nullopt, 5}}), HasSubstr("logits_from 5 outside its 5 tokens"));
  EXPECT_THAT(error_of({{l.seq, r.prompt, std::nullopt, -1}}), HasSubstr("logits_from -1 outside"));
  EXPECT_THAT(error_of({{l.seq + 100, r.prompt}}), HasSubstr("unknown sequence"));
  EXPECT_THAT(error_of({{l.seq, too_long}}), HasSubstr("exceeds the model's context length of 128"));
  EXPECT_THAT(error_of({}), HasSubstr("empty step"));
  // Both chunks would be placed at the sequence's current length.
  EXPECT_THAT(error_of({{l.seq, r.prompt}, {l.seq, r.prompt}}), HasSubstr("appears more than once"));
  EXPECT_EQ(engine.length(l.seq), 0);
  step_and_check(engine, {&l});
  step_and_check(engine, {&l});
}

TEST(RuntimeBadInput, GenerateRefusesInvalidRequests) {
  Loaded m = load("opt");
  GenerateOptions opt;
  auto error_of = [&](const std::vector<std::vector<int32_t>>& prompts) -> std::string {
    try {
      generate(*m.model, prompts, opt);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_THAT(error_of({}), HasSubstr("no prompts"));
  EXPECT_THAT(error_of({{1, 2}, {}}), HasSubstr("empty prompt"));
  opt.max_new_tokens = 8;
  EXPECT_THAT(error_of({{1}, std::vector<int32_t>(121, 1)}), HasSubstr("exceeds the model's context length of 128"));
  EXPECT_EQ(error_of({std::vector<int32_t>(120, 1)}), "") << "exactly the context is allowed";
}

// ---- Sampler.

std::vector<float> random_logits(int64_t n, uint32_t seed) {
  std::vector<float> l;
  for (int32_t t : tokens(n, seed, 1 << 20)) l.push_back(static_cast<float>(t) / (1 << 17) - 4.0f);
  return l;
}

std::vector<int32_t> draw(Sampler& s, const std::vector<float>& logits, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(s.sample(logits.data(), static_cast<int64_t>(logits.size())));
  return out;
}

TEST(RuntimeSampler, GreedyIsArgmax) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const std::vector<float> l = random_logits(100, seed);
    const int32_t best = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    Sampler s({.temperature = 0.0f, .seed = seed}, 0);
    EXPECT_EQ(s.sample(l.data(), 100), best);
    EXPECT_EQ(argmax(l.data(), 100), best);
  }
  const std::vector<float> ties = {0.0f, 3.0f, 1.0f, 3.0f};
  EXPECT_EQ(argmax(ties.data(), 4), 1) << "ties go to the lowest id";
}

TEST(RuntimeSampler, SeedsAndStreamsAreReproducibleAndDistinct) {
  const std::vector<float> l(32, 0.0f);  // uniform: every draw is pure randomness
  const SamplingParams p{.temperature = 1.0f, .seed = 42};
  Sampler a(p, 0), b(p, 0), other_stream(p, 1), other_seed({.temperature = 1.0f, .seed = 43}, 0);
  const auto da = draw(a, l, 200);
  EXPECT_EQ(draw(b, l, 200), da);
  EXPECT_NE(draw(other_stream, l, 200), da);
  EXPECT_NE(draw(other_seed, l, 200), da);
  EXPECT_GT(std::set<int32_t>(da.begin(), da.end()).size(), 20u) << "draws should cover most of the vocabulary";
}

TEST(RuntimeSampler, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> l = random_logits(50, 9);
  const int32_t best = argmax(l.data(), 50);
  for (float temperature : {0.3f, 1.0f, 10.0f, 1000.0f}) {
    Sampler k1({.temperature = temperature, .top_k = 1, .seed = 1}, 0);
    Sampler p0({.temperature = temperature, .top_p = 1e-6f, .seed = 1}, 0);
    EXPECT_EQ(draw(k1, l, 100), std::vector<int32_t>(100, best)) << "temperature " << temperature;
    EXPECT_EQ(draw(p0, l, 100), std::vector<int32_t>(100, best)) << "temperature " << temperature;
  }
}

TEST(RuntimeBadInput, SamplerRejectsInvalidParameters) {
  EXPECT_THROW(Sampler({.temperature = -1.0f}, 0), Error);
  EXPECT_THROW(Sampler({.top_k = -1}, 0), Error);
  EXPECT_THROW(Sampler({.top_p = 0.0f}, 0), Error);
  EXPECT_THROW(Sampler({.top_p = 1.5f}, 0), Error);
}

// Frequencies over 20000 draws against the distribution the parameters define, stated here independently:
// softmax(logits / T) restricted to the `kept` ids and renormalised.
struct FrequencyCase {
  std::string name;
  SamplingParams params;
  std::vector<int32_t> kept;
};

void PrintTo(const FrequencyCase& c, std::ostream* os) { *os << c.name; }

class RuntimeSamplerFrequencies : public ::testing::TestWithParam<FrequencyCase> {};

TEST_P(RuntimeSamplerFrequencies, MatchTheDistribution) {
  // Ids ordered by logit: 1 (2.0), 3 (1.0), 0 (0.5), 2 (-1.0). At T = 1 the probabilities are
  // 0.6095, 0.2242, 0.1360, 0.0304: the top-0.8 nucleus is {1, 3}.
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.0f};
  const FrequencyCase& c = GetParam();
  std::vector<double> expected(4, 0.0);
  double z = 0;
  for (int32_t id : c.kept) z += expected[id] = std::exp(logits[id] / c.params.temperature);
  for (double& e : expected) e /= z;
  Sampler s(c.params, 0);
  const int n = 20000;
  std::vector<int> count(4, 0);
  for (int32_t id : draw(s, logits, n)) ++count[id];
  double chi2 = 0;
  for (int id = 0; id < 4; ++id) {
    if (expected[id] == 0) {
      EXPECT_EQ(count[id], 0) << "id " << id << " is outside the candidate set";
      continue;
    }
    const double e = expected[id] * n;
    chi2 += (count[id] - e) * (count[id] - e) / e;
  }
  // At most 3 degrees of freedom: chi-square above 25 has probability ~1e-5 for a correct sampler, while a
  // wrong temperature or cut moves it into the hundreds.
  EXPECT_LT(chi2, 25.0) << count[0] << " " << count[1] << " " << count[2] << " " << count[3];
}

INSTANTIATE_TEST_SUITE_P(
    Runtime, RuntimeSamplerFrequencies,
    ::testing::Values(FrequencyCase{"T1", {.temperature = 1.0f, .seed = 1}, {0, 1, 2, 3}},
                      FrequencyCase{"T0_5", {.temperature = 0.5f, .seed = 2}, {0, 1, 2, 3}},
                      FrequencyCase{"T2", {.temperature = 2.0f, .seed = 3}, {0, 1, 2, 3}},
                      FrequencyCase{"TopK2", {.temperature = 1.0f, .top_k = 2, .seed = 4}, {1, 3}},
                      FrequencyCase{"TopP0_8", {.temperature = 1.0f, .top_p = 0.8f, .seed = 5}, {1, 3}},
                      FrequencyCase{"TopK3TopP0_95", {.temperature = 1.0f, .top_k = 3, .top_p = 0.95f, .seed = 6},
                                    {0, 1, 3}}),
    [](const auto& info) { return info.param.name; });

// ---- Perplexity.

// Independent expectation: each window alone through the Engine, -log softmax in double by hand.
PerplexityResult expected_perplexity(Model& model, const std::vector<std::vector<int32_t>>& windows) {
  PerplexityResult r;
  for (auto& w : windows) {
    Rows rows = alone(model, w);
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      const std::vector<float>& l = rows[i];
      const double mx = *std::max_element(l.begin(), l.end());
      double sum = 0;
      for (float v : l) sum += std::exp(v - mx);
      r.nll_sum += mx + std::log(sum) - l[w[i + 1]];
      ++r.scored;
    }
  }
  return r;
}

std::vector<int32_t> slice(const std::vector<int32_t>& v, size_t begin, size_t end, int32_t bos = -1) {
  std::vector<int32_t> out;
  if (bos >= 0) out.push_back(bos);
  out.insert(out.end(), v.begin() + begin, v.begin() + std::min(end, v.size()));
  return out;
}

void expect_same(const PerplexityResult& got, const PerplexityResult& want) {
  EXPECT_EQ(got.scored, want.scored);
  EXPECT_NEAR(got.nll_sum, want.nll_sum, 1e-6 * want.nll_sum);
  EXPECT_NEAR(got.perplexity(), std::exp(want.nll_sum / want.scored), 1e-6 * got.perplexity());
}

TEST(RuntimePerplexity, IsExpOfMeanNllOverWindows) {
  Loaded m = load("llama_mha");
  const auto text = tokens(37, 11, m.model->config().vocab_size);
  // ctx 8, no BOS: windows [0,8) [8,16) [16,24) [24,32) [32,37); a window's first token is not scored.
  std::vector<std::vector<int32_t>> windows;
  for (size_t b = 0; b < text.size(); b += 8) windows.push_back(slice(text, b, b + 8));
  const PerplexityResult want = expected_perplexity(*m.model, windows);
  EXPECT_EQ(want.scored, 32);
  // Batched windows (3 per pass, so the last pass is partial) and one at a time give the same answer.
  for (int64_t batch : {3, 1}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    expect_same(perplexity(*m.model, text, 8, -1, 0, batch), want);
  }
  const double ppl = perplexity(*m.model, text, 8, -1, 0, 3).perplexity();
  EXPECT_GT(ppl, 1.0);
  EXPECT_LT(ppl, 2.0 * m.model->config().vocab_size) << "a random model is near uniform, not far worse";
}

TEST(RuntimePerplexity, WithBosEveryWindowStartsWithBosAndScoresAllItsText) {
  Loaded m = load("llama_mha");
  const int32_t bos = m.model->config().bos_id;
  ASSERT_GE(bos, 0);
  const auto text = tokens(37, 12, m.model->config().vocab_size);
  // ctx 8 with BOS: windows hold BOS + 7 text tokens; every text token is scored, including the last 2.
  std::vector<std::vector<int32_t>> windows;
  for (size_t b = 0; b < text.size(); b += 7) windows.push_back(slice(text, b, b + 7, bos));
  const PerplexityResult want = expected_perplexity(*m.model, windows);
  EXPECT_EQ(want.scored, 37);
  expect_same(perplexity(*m.model, text, 8, bos, 0, 4), want);
}

TEST(RuntimePerplexity, LeftoverAndLimit) {
  Loaded m = load("llama_mha");
  const auto text = tokens(17, 13, m.model->config().vocab_size);
  // Without BOS a final window of one token predicts nothing: 17 tokens in windows of 8 score 7 + 7.
  expect_same(perplexity(*m.model, text, 8, -1, 0, 2),
              expected_perplexity(*m.model, {slice(text, 0, 8), slice(text, 8, 16)}));
  // max_scored 10: the first window's 7, then the first 3 predictions of the second.
  expect_same(perplexity(*m.model, text, 8, -1, 10, 2),
              expected_perplexity(*m.model, {slice(text, 0, 8), slice(text, 8, 12)}));
}

TEST(RuntimeBadInput, PerplexityRefusesInvalidRequests) {
  Loaded m = load("opt");  // context 128
  const auto text = tokens(10, 1, 512);
  EXPECT_THROW(perplexity(*m.model, text, 1, -1, 0, 1), Error);
  EXPECT_THROW(perplexity(*m.model, text, 129, -1, 0, 1), Error);
  EXPECT_THROW(perplexity(*m.model, text, 8, -1, 0, 0), Error);
  EXPECT_THROW(perplexity(*m.model, {5}, 8, -1, 0, 1), Error);  // one token, no BOS: nothing to score
  EXPECT_THROW(perplexity(*m.model, {}, 8, 2, 0, 1), Error);
}

}  // namespace
