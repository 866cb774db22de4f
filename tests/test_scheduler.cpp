// The continuous-batching scheduler (runtime/scheduler.h) on the CPU backend: every request's output through
// the scheduler equals the same prompt decoded alone — arriving together or staggered, with chunked
// prefill, queueing and preemption forced by small limits —, sparse decode tokens in mixed steps select as
// in decode-only steps, and the stop conditions, cancellation and limits behave as documented.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <thread>

#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/scheduler.h"
#include "sparse/router_sparsity.h"
#include "sparse/routers.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;

namespace {

struct Loaded {
  Checkpoint ck;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};

Loaded load(const std::string& rel) {
  Loaded m;
  m.ck = load_checkpoint(test::shared_path(rel));
  m.backend = make_cpu_backend();
  m.model = make_model(m.ck, *m.backend);
  return m;
}

Loaded& stories() {
  static Loaded s = load("models/stories260K/stories260K.gguf");
  return s;
}

// Greedy decoding of one prompt alone, straight on an Engine (prefill, then one decode step per token,
// argmax on the host): the reference every scheduled request must match. With sparsity, decode-only steps.
std::vector<int32_t> alone(Model& model, const std::vector<int32_t>& prompt, int64_t n, Sparsity* sparsity = nullptr,
                           std::vector<float>* margins = nullptr) {
  Engine e(model, {.kv_tokens = static_cast<int64_t>(prompt.size()) + n + 16, .sparsity = sparsity});
  const int64_t seq = e.add_sequence();
  Tensor logits = e.step({{seq, prompt}}, false);
  std::vector<int32_t> out;
  const int64_t V = model.config().vocab_size;
  while (static_cast<int64_t>(out.size()) < n) {
    const float* row = logits.data<float>();
    const int32_t best = static_cast<int32_t>(std::max_element(row, row + V) - row);
    if (margins) {  // the gap to the runner-up: how close a near-tie is
      std::vector<float> sorted(row, row + V);
      std::nth_element(sorted.begin(), sorted.begin() + 1, sorted.end(), std::greater<float>());
      margins->push_back(sorted[0] - sorted[1]);
    }
    out.push_back(best);
    if (static_cast<int64_t>(out.size()) < n) logits = e.step({{seq, std::span<const int32_t>(&out.back(), 1)}}, false);
  }
  return out;
}

// n deterministic pseudo-random prompts of lengths in [lo, hi] over ids [3, vocab).
std::vector<std::vector<int32_t>> prompts(int n, int64_t lo, int64_t hi, int64_t vocab, uint32_t seed) {
  std::vector<std::vector<int32_t>> out;
  uint32_t x = seed * 2654435761u + 7u;
  auto next = [&] { return x = x * 1664525u + 1013904223u; };
  for (int i = 0; i < n; ++i) {
    const int64_t len = lo + static_cast<int64_t>((next() >> 8) % static_cast<uint32_t>(hi - lo + 1));
    std::vector<int32_t> p;
    for (int64_t j = 0; j < len; ++j) p.push_back(static_cast<int32_t>(3 + (next() >> 8) % (vocab - 3)));
    out.push_back(p);
  }
  return out;
}

struct Outcome {
  std::vector<int32_t> tokens;
  std::string text;
  std::optional<FinishReason> finish;
  int64_t events = 0;
};

// Everything a stream delivered, read after the loop ran.
Outcome drain(RequestStream& s) {
  Outcome o;
  while (auto e = s.next(Clock::now())) {
    ++o.events;
    if (e->token) o.tokens.push_back(*e->token);
    o.text += e->text;
    if (e->finish) o.finish = e->finish;
  }
  return o;
}

Request greedy(std::vector<int32_t> prompt, int64_t max_tokens) {
  Request r;
  r.prompt = std::move(prompt);
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  return r;
}

}  // namespace

// 64 requests of mixed prompt lengths through 4 running sequences and 24-token steps (chunked prefill,
// queueing, mixed steps): each equals its prompt decoded alone, all at once and with arrivals spread over
// the run; the cache is empty afterwards.
TEST(Scheduler, EveryRequestEqualsItsPromptAlone) {
  for (const char* rel : {"models/stories260K/stories260K.gguf", "fixtures/hf/llama3_gqa", "fixtures/hf/opt"}) {
    SCOPED_TRACE(rel);
    Loaded m = load(rel);
    const auto ps = prompts(64, 1, 40, m.ck.config.vocab_size, 3);
    std::vector<std::vector<int32_t>> want;
    for (size_t i = 0; i < ps.size(); ++i) want.push_back(alone(*m.model, ps[i], 3 + static_cast<int64_t>(i % 9)));
    for (bool staggered : {false, true}) {
      SCOPED_TRACE(staggered ? "staggered" : "together");
      Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 24, .kv_tokens = 4096});
      std::vector<std::shared_ptr<RequestStream>> streams;
      for (size_t i = 0; i < ps.size(); ++i) {
        streams.push_back(sched.submit(greedy(ps[i], static_cast<int64_t>(want[i].size()))));
        if (staggered) sched.step();  // one arrival per step
      }
      sched.run_until_idle();
      for (size_t i = 0; i < ps.size(); ++i) {
        const Outcome o = drain(*streams[i]);
        EXPECT_EQ(o.tokens, want[i]) << "request " << i;
        EXPECT_EQ(o.finish, FinishReason::length) << "request " << i;
      }
      EXPECT_GT(sched.stats().mixed_steps, 0);
      EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks()) << "every block came back";
      EXPECT_EQ(sched.running(), 0);
      EXPECT_EQ(sched.waiting(), 0);
    }
  }
}

// A cache too small for every running sequence at once: the most recently admitted ones are preempted and
// recomputed, and every request still produces what it would have alone.
TEST(Scheduler, PreemptionLosesNoRequestAndChangesNoOutput) {
  Loaded& m = stories();
  const auto ps = prompts(12, 5, 20, m.ck.config.vocab_size, 5);
  Scheduler sched(*m.model, {.max_seqs = 8, .max_batch_tokens = 64, .kv_tokens = 96, .block_size = 8});
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<std::vector<int32_t>> want;
  std::vector<std::vector<float>> margins(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    want.push_back(alone(*m.model, ps[i], 40, nullptr, &margins[i]));
    streams.push_back(sched.submit(greedy(ps[i], 40)));
  }
  sched.run_until_idle();
  EXPECT_GT(sched.stats().preemptions, 0) << "the cache holds 96 tokens, the requests need up to 8 x 60";
  for (size_t i = 0; i < ps.size(); ++i) {
    const Outcome o = drain(*streams[i]);
    // A recomputed sequence reads its tokens as a prompt (one GEMM over them) instead of one by one, so
    // its logits differ by float rounding; only a near-tie could flip a greedy choice, and none is.
    EXPECT_EQ(o.tokens, want[i]) << "request " << i << ", smallest top-2 margin "
                                 << *std::min_element(margins[i].begin(), margins[i].end());
    EXPECT_EQ(o.finish, FinishReason::length);
  }
  EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
}

// Sparse decode tokens in mixed steps: a request decoding beside another's prompt chunks produces exactly
// what it produces alone in decode-only steps (its own heads; for OPT the MLP neuron set chosen over the
// step's decode tokens only). Density 1 equals dense.
TEST(Scheduler, SparseDecodeTokensInMixedStepsSelectAsInDecodeOnlySteps) {
  for (const char* rel : {"fixtures/hf/llama3_gqa", "fixtures/hf/opt", "fixtures/hf/llama_mha"}) {
    SCOPED_TRACE(rel);
    Loaded m = load(rel);
    const Routers routers = random_routers(m.ck.config, model_fingerprint(m.ck), 7, 16);
    RouterSparsity half(*m.model, routers, 0.5);
    const auto ps = prompts(2, 6, 6, m.ck.config.vocab_size, 9);
    const std::vector<int32_t> long_prompt = prompts(1, 60, 60, m.ck.config.vocab_size, 11)[0];
    const std::vector<int32_t> want = alone(*m.model, ps[0], 12, &half);
    EXPECT_NE(want, alone(*m.model, ps[0], 12)) << "the sparse decode differs from the dense one";
    // Request 0 decodes while request 1's 60-token prompt is read 4 tokens a step beside it; request 0
    // finishes first, so neither decodes beside the other (OPT's decode batches share one neuron set, so a
    // batch of two would select differently from either alone, by definition).
    Scheduler sched(*m.model, {.max_seqs = 2, .max_batch_tokens = 5, .kv_tokens = 512, .sparsity = &half});
    auto first = sched.submit(greedy(ps[0], 12));
    sched.step();  // prefill of request 0 alone
    auto second = sched.submit(greedy(long_prompt, 4));
    sched.run_until_idle();
    EXPECT_GE(sched.stats().mixed_steps, 11);
    EXPECT_EQ(drain(*first).tokens, want);
    EXPECT_EQ(drain(*second).tokens, alone(*m.model, long_prompt, 4, &half));
    // Density 1: the dense model's tokens.
    RouterSparsity full(*m.model, routers, 1.0);
    if (routers.mlp_k) continue;  // (OPT's k table keeps MLP sparsity at density 1)
    Scheduler dense_sched(*m.model, {.max_seqs = 2, .max_batch_tokens = 5, .kv_tokens = 512, .sparsity = &full});
    auto d = dense_sched.submit(greedy(ps[0], 12));
    dense_sched.run_until_idle();
    EXPECT_EQ(drain(*d).tokens, alone(*m.model, ps[0], 12));
  }
}

// Automatic prefix caching: requests that share a system prompt read it once; a conversation's next turn
// (its earlier prompt and answer, then a new message) reuses the earlier turn's blocks — the answer's too
// with a dense engine, only the prompt's with sparse decoding (a sparse step's K/V are not a prompt's) —,
// a recomputed (preempted) sequence reuses its own, and every output equals its prompt decoded alone.
TEST(Scheduler, PrefixCacheReusesSharedPrefixesAndChangesNoOutput) {
  for (const char* rel : {"models/stories260K/stories260K.gguf", "fixtures/hf/llama3_gqa", "fixtures/hf/opt"}) {
    SCOPED_TRACE(rel);
    Loaded m = load(rel);
    const int64_t V = m.ck.config.vocab_size, bs = 8;
    const std::vector<int32_t> system = prompts(1, 40, 40, V, 21)[0];  // 5 whole blocks
    const auto users = prompts(6, 3, 12, V, 22);
    std::vector<std::vector<int32_t>> ps;
    for (const auto& u : users) {
      ps.push_back(system);
      ps.back().insert(ps.back().end(), u.begin(), u.end());
    }
    const Routers routers = random_routers(m.ck.config, model_fingerprint(m.ck), 7, 16);
    RouterSparsity half(*m.model, routers, 0.5);
    for (Sparsity* sparsity : {static_cast<Sparsity*>(nullptr), static_cast<Sparsity*>(&half)}) {
      SCOPED_TRACE(sparsity ? "sparse" : "dense");
      Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 2048, .block_size = bs,
                                 .sparsity = sparsity});
      auto first = sched.submit(greedy(ps[0], 8));
      sched.run_until_idle();
      const std::vector<int32_t> first_out = drain(*first).tokens;
      EXPECT_EQ(first_out, alone(*m.model, ps[0], 8, sparsity));
      EXPECT_EQ(sched.stats().prefix_hit_tokens, 0);
      EXPECT_EQ(sched.stats().prefix_query_tokens, static_cast<int64_t>(ps[0].size()) - 1);
      // The other users' requests, together (one after another when sparse: OPT's decode batches share one
      // neuron set, so a batch would not select as each alone does): each finds the system prompt's 5 blocks.
      std::vector<std::shared_ptr<RequestStream>> streams;
      for (size_t i = 1; i < ps.size(); ++i) {
        streams.push_back(sched.submit(greedy(ps[i], 6)));
        if (sparsity) sched.run_until_idle();
      }
      sched.run_until_idle();
      EXPECT_GE(sched.stats().prefix_hit_tokens, 5 * 40);
      for (size_t i = 1; i < ps.size(); ++i)
        EXPECT_EQ(drain(*streams[i - 1]).tokens, alone(*m.model, ps[i], 6, sparsity)) << "request " << i;
      // The first conversation's next turn: its prompt, the answer (whose last token was never fed), a new
      // message.
      std::vector<int32_t> turn = ps[0];
      turn.insert(turn.end(), first_out.begin(), first_out.end());
      turn.insert(turn.end(), users[5].begin(), users[5].end());
      const int64_t computed = static_cast<int64_t>(ps[0].size() + first_out.size()) - 1;
      const int64_t expect_hit = (sparsity ? static_cast<int64_t>(ps[0].size()) : computed) / bs * bs;
      const int64_t hits_before = sched.stats().prefix_hit_tokens;
      auto next = sched.submit(greedy(turn, 5));
      sched.run_until_idle();
      EXPECT_EQ(sched.stats().prefix_hit_tokens - hits_before, expect_hit);
      EXPECT_EQ(drain(*next).tokens, alone(*m.model, turn, 5, sparsity));
      EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks()) << "cached blocks count as free";
      EXPECT_GT(sched.gauges().kv_blocks_cached, 0);
      // Reset: the same prompt is computed in full.
      sched.reset_prefix_cache();
      const int64_t hits_reset = sched.stats().prefix_hit_tokens;
      auto again = sched.submit(greedy(ps[1], 2));
      sched.run_until_idle();
      EXPECT_EQ(sched.stats().prefix_hit_tokens, hits_reset);
      drain(*again);
    }
    // Off: nothing is looked up.
    Scheduler off(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 2048, .block_size = bs,
                             .prefix_caching = false});
    for (int r = 0; r < 2; ++r) {
      auto s = off.submit(greedy(ps[0], 2));
      off.run_until_idle();
      drain(*s);
    }
    EXPECT_EQ(off.stats().prefix_query_tokens, 0);
    EXPECT_EQ(off.stats().prefix_hit_tokens, 0);
    EXPECT_EQ(off.gauges().kv_blocks_cached, 0);
  }
}

// The choices of one prompt (submit_choices) read it once: the later ones wait for the first to read it and
// attach its whole blocks. Outputs equal the prompt alone; without prefix caching each reads it.
TEST(Scheduler, ChoicesReadTheirPromptOnceThroughThePrefixCache) {
  Loaded& m = stories();
  const std::vector<int32_t> prompt = prompts(1, 45, 45, m.ck.config.vocab_size, 41)[0];
  const std::vector<int32_t> want = alone(*m.model, prompt, 6);
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "off");
    Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 16, .kv_tokens = 1024, .block_size = 8,
                               .prefix_caching = caching});
    const auto streams = sched.submit_choices({greedy(prompt, 6), greedy(prompt, 6), greedy(prompt, 6)});
    sched.run_until_idle();
    for (const auto& st : streams) EXPECT_EQ(drain(*st).tokens, want);
    EXPECT_EQ(sched.stats().prefix_hit_tokens, caching ? 2 * 40 : 0) << "44 tokens looked up: 5 whole blocks";
    EXPECT_EQ(sched.stats().prompt_tokens, caching ? 45 + 2 * 5 : 3 * 45);
    EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
  }
}

// A cache too small for every running sequence at once, with a shared prefix: preempted sequences come back
// through the prefix cache (their own prompt's blocks, or another's), and nothing changes in the outputs.
TEST(Scheduler, PreemptionWithPrefixCachingChangesNoOutput) {
  Loaded& m = stories();
  const int64_t V = m.ck.config.vocab_size;
  const std::vector<int32_t> system = prompts(1, 16, 16, V, 31)[0];
  std::vector<std::vector<int32_t>> ps;
  for (const auto& u : prompts(10, 2, 9, V, 32)) {
    ps.push_back(system);
    ps.back().insert(ps.back().end(), u.begin(), u.end());
  }
  Scheduler sched(*m.model, {.max_seqs = 8, .max_batch_tokens = 64, .kv_tokens = 160, .block_size = 8});
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : ps) streams.push_back(sched.submit(greedy(p, 30)));
  sched.run_until_idle();
  EXPECT_GT(sched.stats().preemptions, 0);
  EXPECT_GT(sched.stats().prefix_hit_tokens, 0);
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(drain(*streams[i]).tokens, alone(*m.model, ps[i], 30)) << i;
  EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
}

// Stop strings that span tokens end the text before them; a stop string's first part is held back until
// it is known not to be one; multi-byte UTF-8 split over tokens arrives whole.
TEST(Scheduler, StopStringsAcrossTokensAndUtf8AcrossTokens) {
  Loaded& m = stories();
  const Tokenizer& tok = *m.ck.tokenizer;
  const std::vector<int32_t> prompt = tok.encode("Once upon a time", true);
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 1024, .tokenizer = &tok});
  auto plain = sched.submit(greedy(prompt, 40));
  sched.run_until_idle();
  const Outcome full = drain(*plain);
  ASSERT_GT(full.text.size(), 30u);
  // A stop string made of the end of one token's text and the start of the next's.
  std::vector<std::string> pieces;
  StreamDecoder dec(tok);
  for (int32_t id : full.tokens) pieces.push_back(dec.push(id));
  size_t i = 3;
  while (pieces[i].size() < 2 || pieces[i + 1].size() < 2) ++i;
  const std::string stop = pieces[i].substr(pieces[i].size() - 2) + pieces[i + 1].substr(0, 2);
  const size_t first_at = full.text.find(stop);
  Request r = greedy(prompt, 40);
  r.params.stop_strings = {"never appears", stop};
  auto stopped = sched.submit(r);
  sched.run_until_idle();
  const Outcome o = drain(*stopped);
  EXPECT_EQ(o.text, full.text.substr(0, first_at));
  EXPECT_EQ(o.finish, FinishReason::stop);
  EXPECT_LT(o.tokens.size(), full.tokens.size());
  // Multi-byte characters: sampled at a high temperature, stories260K produces byte-fallback tokens; the
  // events' texts never split a character and add up to the decoded tokens.
  Request hot = greedy(prompt, 300);
  hot.params.sampling = {.temperature = 3.0f, .seed = 4};
  auto sampled = sched.submit(hot);
  sched.run_until_idle();
  std::string joined;
  std::vector<int32_t> ids;
  bool multibyte = false;
  while (auto e = sampled->next(Clock::now())) {
    const std::string& t = e->text;
    for (char c : t) multibyte |= static_cast<unsigned char>(c) >= 0x80;
    if (!t.empty() && !e->finish) {
      const unsigned char lead = static_cast<unsigned char>(t[0]);
      EXPECT_FALSE(lead >= 0x80 && lead < 0xC0) << "an event starts inside a character";
    }
    if (e->token) ids.push_back(*e->token);
    joined += t;
  }
  EXPECT_TRUE(multibyte) << "the sample produced no multi-byte character: pick another seed";
  StreamDecoder all(tok);  // the events' text continues the prompt's (a first "▁word" keeps its space)
  for (int32_t id : prompt) all.push(id);
  all.flush();
  std::string want_text;
  for (int32_t id : ids) want_text += all.push(id);
  EXPECT_EQ(joined, want_text + all.flush());
}

// max_tokens 0 finishes at once with no token; 1 gives one token; min_tokens keeps EOS away; a stop token
// ends the request (reported, no text).
TEST(Scheduler, TokenLimitsAndStopTokens) {
  Loaded& m = stories();
  const Tokenizer& tok = *m.ck.tokenizer;
  const std::vector<int32_t> prompt = tok.encode("Once upon a time", true);
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 1024, .tokenizer = &tok});
  auto none = sched.submit(greedy(prompt, 0));
  auto one = sched.submit(greedy(prompt, 1));
  const std::vector<int32_t> want = alone(*m.model, prompt, 10);
  Request stop_at_third = greedy(prompt, 10);
  stop_at_third.params.stop_token_ids = {want[2]};
  auto stopped = sched.submit(stop_at_third);
  Request late = stop_at_third;
  late.params.min_tokens = 3;  // the stop token is not sampled as one of the first 3
  auto later = sched.submit(late);
  sched.run_until_idle();
  Outcome o = drain(*none);
  EXPECT_TRUE(o.tokens.empty());
  EXPECT_EQ(o.finish, FinishReason::length);
  EXPECT_EQ(o.events, 1);
  o = drain(*one);
  EXPECT_EQ(o.tokens, std::vector<int32_t>{want[0]});
  EXPECT_EQ(o.finish, FinishReason::length);
  o = drain(*stopped);
  EXPECT_EQ(o.tokens, std::vector<int32_t>(want.begin(), want.begin() + 3));
  EXPECT_EQ(o.finish, FinishReason::stop);
  EXPECT_EQ(o.text, tok.decode({want[0], want[1]}));
  o = drain(*later);
  ASSERT_GE(o.tokens.size(), 3u);
  EXPECT_EQ(std::vector<int32_t>(o.tokens.begin(), o.tokens.begin() + 2), std::vector<int32_t>(want.begin(), want.begin() + 2));
  EXPECT_NE(o.tokens[2], want[2]) << "min_tokens masks the stop token";
}

// Cancellation while the prompt is being read and while decoding, from another thread too: the request
// finishes as cancelled and its blocks come back.
TEST(Scheduler, CancellationMidPromptAndMidDecodeFreesTheBlocks) {
  Loaded& m = stories();
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 8, .kv_tokens = 1024});
  const auto ps = prompts(2, 40, 40, m.ck.config.vocab_size, 13);
  auto reading = sched.submit(greedy(ps[0], 20));
  auto decoding = sched.submit(greedy(ps[1], 400));
  sched.step();  // request 0 reads 8 of its 40 prompt tokens
  reading->cancel();
  for (int i = 0; i < 12; ++i) sched.step();  // request 1 is decoding by now
  std::thread canceller([&] { decoding->cancel(); });
  canceller.join();
  sched.run_until_idle();
  const Outcome a = drain(*reading), b = drain(*decoding);
  EXPECT_EQ(a.finish, FinishReason::cancelled);
  EXPECT_TRUE(a.tokens.empty());
  EXPECT_EQ(b.finish, FinishReason::cancelled);
  EXPECT_FALSE(b.tokens.empty());
  EXPECT_LT(b.tokens.size(), 400u);
  EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
}

// Requests that can never run are refused at submission with the limit named.
TEST(Scheduler, RequestsThatCannotFitAreRefusedAtSubmission) {
  Loaded& m = stories();
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 128});
  const auto ps = prompts(1, 100, 100, m.ck.config.vocab_size, 1);
  EXPECT_THAT(test::error_of([&] { sched.submit(greedy(ps[0], 100)); }), HasSubstr("exceeds the KV cache of 128 tokens"));
  EXPECT_THAT(test::error_of([&] { sched.submit(greedy(ps[0], 500)); }), HasSubstr("context length of 512"));
  EXPECT_THAT(test::error_of([&] { sched.submit(greedy({}, 5)); }), HasSubstr("empty prompt"));
  EXPECT_THAT(test::error_of([&] { sched.submit(greedy({1, 99999}, 5)); }), HasSubstr("token id 99999 is out of range"));
  Request r = greedy({1, 2}, 5);
  r.params.stop_strings = {"x"};
  EXPECT_THAT(test::error_of([&] { sched.submit(r); }), HasSubstr("stop strings need a tokenizer"));
  EXPECT_THAT(test::error_of([&] { Scheduler(*m.model, {.max_seqs = 8, .max_batch_tokens = 4, .kv_tokens = 64}); }),
              HasSubstr("--max-batch-tokens (4) must be >= --max-seqs (8)"));
  EXPECT_EQ(sched.waiting(), 0);
}

// 1000 tiny requests from a client thread while the loop runs on its own: all complete, nothing leaks.
TEST(Scheduler, AThousandTinyRequestsFromAnotherThread) {
  Loaded& m = stories();
  Scheduler sched(*m.model, {.max_seqs = 32, .max_batch_tokens = 256, .kv_tokens = 2048});
  std::thread loop([&] { sched.run(); });
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 1000; ++i) streams.push_back(sched.submit(greedy({1, static_cast<int32_t>(3 + i % 500)}, 2)));
  int64_t tokens = 0;
  for (auto& s : streams)
    while (auto e = s->next(Clock::now() + std::chrono::seconds(60))) {
      tokens += e->token.has_value();
      if (e->finish) break;
    }
  sched.stop();
  loop.join();
  EXPECT_EQ(tokens, 2000);
  for (auto& s : streams) EXPECT_TRUE(s->finished());
  EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
  EXPECT_EQ(sched.running(), 0);
}

// Cancellations from other threads at any moment, while the loop runs: every request still ends with a final
// event (cancelled or not) and every block comes back. (A flag read twice in one step once dropped a
// sequence that was cancelled between the readings without finishing it: its blocks leaked and its stream
// never ended; polar serve's load test found it.)
TEST(Scheduler, CancellationsRacingTheLoopLoseNoStreamAndNoBlock) {
  Loaded& m = stories();
  Scheduler sched(*m.model, {.max_seqs = 16, .max_batch_tokens = 64, .kv_tokens = 4096});
  std::thread loop([&] { sched.run(); });
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 400; ++i) streams.push_back(sched.submit(greedy({1, static_cast<int32_t>(3 + i % 400)}, 24)));
  std::vector<std::thread> cancellers;
  for (int t = 0; t < 4; ++t)
    cancellers.emplace_back([&, t] {
      uint32_t x = 12345u + static_cast<uint32_t>(t);
      for (size_t i = static_cast<size_t>(t); i < streams.size(); i += 4) {
        x = x * 1664525u + 1013904223u;
        std::this_thread::sleep_for(std::chrono::microseconds((x >> 8) % 400));
        if (x % 3 != 0) streams[i]->cancel();
      }
    });
  for (auto& c : cancellers) c.join();
  int ended = 0;
  for (auto& s : streams)
    while (auto e = s->next(Clock::now() + std::chrono::seconds(60)))
      if (e->finish) {
        ++ended;
        break;
      }
  sched.stop();
  loop.join();
  EXPECT_EQ(ended, 400) << "every stream gets its final event";
  EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
}

// OpenAI's presence and frequency penalties, against a reference that applies them by hand to each step's
// logits before the argmax: the same tokens, and the penalties change what is produced.
TEST(Scheduler, PresenceAndFrequencyPenaltiesFollowTheirDefinition) {
  Loaded& m = stories();
  const int64_t V = m.model->config().vocab_size, n = 40;
  const std::vector<int32_t> prompt = {1, 403, 407, 261, 378};  // "Once upon a time"
  auto reference = [&](float presence, float frequency) {
    Engine e(*m.model, {.kv_tokens = 256});
    const int64_t seq = e.add_sequence();
    Tensor logits = e.step({{seq, prompt}}, false);
    std::vector<int32_t> out;
    std::map<int32_t, int> counts;
    while (static_cast<int64_t>(out.size()) < n) {
      std::vector<float> row(logits.data<float>(), logits.data<float>() + V);
      for (const auto& [t, c] : counts) row[t] -= frequency * static_cast<float>(c) + presence;
      out.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
      ++counts[out.back()];
      logits = e.step({{seq, std::span<const int32_t>(&out.back(), 1)}}, false);
    }
    return out;
  };
  auto scheduled = [&](float presence, float frequency) {
    Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 1024});
    Request r = greedy(prompt, n);
    r.params.presence_penalty = presence;
    r.params.frequency_penalty = frequency;
    auto other = sched.submit(greedy({1, 300, 301}, n));  // a batch neighbour without penalties
    auto s = sched.submit(r);
    sched.run_until_idle();
    drain(*other);
    return drain(*s).tokens;
  };
  const auto plain = reference(0, 0);
  for (const auto& [presence, frequency] : std::vector<std::pair<float, float>>{{0.8f, 0}, {0, 1.5f}, {0.5f, 0.7f}, {-0.5f, 0}}) {
    SCOPED_TRACE(testing::Message() << "presence " << presence << ", frequency " << frequency);
    const auto want = reference(presence, frequency);
    EXPECT_EQ(scheduled(presence, frequency), want);
    if (presence > 0 || frequency > 0) {
      EXPECT_NE(want, plain) << "the penalty changes the greedy text";
    }
  }
  EXPECT_EQ(scheduled(0, 0), plain);
  Request bad = greedy(prompt, 4);
  bad.params.frequency_penalty = 3;
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 1024});
  EXPECT_THAT(test::error_of([&] { sched.submit(bad); }), HasSubstr("frequency_penalty must be in [-2, 2], got 3"));
}

namespace {

// What a stream delivered with logprobs: the produced tokens and their log-probabilities, the prompt's, and
// how many events carried prompt log-probabilities.
struct Scored {
  std::vector<int32_t> tokens;
  std::vector<TokenLogprob> produced, prompt;
  int64_t prompt_events = 0;
  std::optional<FinishReason> finish;
};

Scored drain_scored(RequestStream& s) {
  Scored o;
  while (auto e = s.next(Clock::now())) {
    if (e->token) o.tokens.push_back(*e->token);
    if (e->logprob) o.produced.push_back(*e->logprob);
    if (!e->prompt_logprobs.empty()) ++o.prompt_events;
    o.prompt.insert(o.prompt.end(), e->prompt_logprobs.begin(), e->prompt_logprobs.end());
    if (e->finish) o.finish = e->finish;
  }
  return o;
}

// One log-probability against the reference row that scores it: the token's value, and its top n are the
// row's n largest values in descending order, each id carrying its own value.
void expect_scored(const TokenLogprob& got, int32_t token, const std::vector<double>& row, int64_t n) {
  ASSERT_EQ(got.token, token);
  ASSERT_TRUE(got.logprob.has_value());
  EXPECT_NEAR(*got.logprob, row[token], test::scaled_tol(1e-5, row[token]));
  ASSERT_EQ(static_cast<int64_t>(got.top.size()), n);
  std::vector<double> sorted = row;
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  for (int64_t j = 0; j < n; ++j) {
    const auto [id, lp] = got.top[j];
    EXPECT_NEAR(lp, sorted[j], test::scaled_tol(1e-5, sorted[j])) << "top " << j;
    EXPECT_NEAR(lp, row[id], test::scaled_tol(1e-5, row[id])) << "top " << j << " is token " << id;
    if (j > 0) {
      EXPECT_LE(lp, got.top[j - 1].second);
    }
  }
}

// Every scored position of a request against the one-pass reference over its prompt and produced tokens.
void expect_request_scored(Model& model, const Request& r, const Scored& o) {
  std::vector<int32_t> all = r.prompt;
  all.insert(all.end(), o.tokens.begin(), o.tokens.end());
  const auto ref = test::log_softmax_rows(model, all);
  const int64_t P = static_cast<int64_t>(r.prompt.size()), n = r.params.logprobs;
  ASSERT_EQ(o.produced.size(), o.tokens.size());
  for (size_t k = 0; k < o.tokens.size(); ++k) {
    SCOPED_TRACE(testing::Message() << "produced token " << k);
    expect_scored(o.produced[k], o.tokens[k], ref[P - 1 + k], n);
  }
  if (!r.params.echo_logprobs) {
    EXPECT_TRUE(o.prompt.empty());
    return;
  }
  ASSERT_EQ(static_cast<int64_t>(o.prompt.size()), P) << "every prompt token once";
  EXPECT_EQ(o.prompt_events, 1) << "the prompt's log-probabilities come in one event";
  EXPECT_EQ(o.prompt[0].token, r.prompt[0]);
  EXPECT_FALSE(o.prompt[0].logprob.has_value()) << "nothing scores the first prompt token";
  EXPECT_TRUE(o.prompt[0].top.empty());
  for (int64_t p = 1; p < P; ++p) {
    SCOPED_TRACE(testing::Message() << "prompt token " << p);
    expect_scored(o.prompt[p], r.prompt[p], ref[p - 1], n);
  }
}

}  // namespace

// logprobs and echo_logprobs: every produced and prompt token's log-probability and top n are the
// log-softmax of the model's raw logits (one pass over the same tokens), under greedy decoding and under
// sampling with top-k and a penalty (neither changes the reported distribution), through chunked prefill
// in 16-token steps; a prompt-only request (max_tokens 0) reads its prompt and finishes with its scores.
TEST(Scheduler, LogprobsAreTheLogSoftmaxOfTheRawLogits) {
  Loaded& m = stories();
  const auto ps = prompts(8, 2, 40, m.ck.config.vocab_size, 11);
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 16, .kv_tokens = 4096});
  std::vector<Request> requests;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (size_t i = 0; i < ps.size(); ++i) {
    Request r = greedy(ps[i], i == 7 ? 0 : 6);
    r.params.logprobs = static_cast<int64_t>(i % 6);
    r.params.echo_logprobs = i % 2 == 1;
    if (i >= 4) {
      r.params.sampling = {.temperature = 0.9f, .top_k = 40, .seed = i};
      r.params.presence_penalty = i == 5 ? 0.5f : 0;
    }
    requests.push_back(r);
    streams.push_back(sched.submit(r));
  }
  auto plain = sched.submit(greedy(ps[0], 6));  // asks for nothing: no log-probabilities in its events
  sched.run_until_idle();
  EXPECT_GT(sched.stats().mixed_steps, 0);
  for (size_t i = 0; i < ps.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "request " << i << ", prompt of " << ps[i].size());
    const Scored o = drain_scored(*streams[i]);
    EXPECT_EQ(static_cast<int64_t>(o.tokens.size()), requests[i].params.max_tokens);
    EXPECT_EQ(o.finish, FinishReason::length);
    expect_request_scored(*m.model, requests[i], o);
    if (requests[i].params.sampling.temperature == 0)  // greedy: the chosen token is the most likely
      for (const TokenLogprob& t : o.produced) {
        if (!t.top.empty()) {
          EXPECT_EQ(t.top[0].first, t.token);
        }
      }
  }
  const Scored none = drain_scored(*plain);
  EXPECT_EQ(none.tokens.size(), 6u);
  EXPECT_TRUE(none.produced.empty() && none.prompt.empty());
  EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
  Request bad = greedy(ps[0], 2);
  bad.params.logprobs = 21;
  EXPECT_THAT(test::error_of([&] { sched.submit(bad); }), HasSubstr("logprobs must be in [-1, 20], got 21"));
  bad.params.logprobs = -1;
  bad.params.echo_logprobs = true;
  EXPECT_THAT(test::error_of([&] { sched.submit(bad); }), HasSubstr("echo_logprobs needs logprobs >= 0"));
}

// An echoed prompt's scoring rows are bounded per step (max_scored_rows): a 40-token prompt with 3 rows a
// step is read in short chunks over at least 13 steps, beside a request that does not score and reads its
// prompt at once, and both get what they get alone.
TEST(Scheduler, EchoScoringRowsPerStepAreBounded) {
  Loaded& m = stories();
  const auto ps = prompts(2, 40, 40, m.ck.config.vocab_size, 11);
  Request echoed = greedy(ps[0], 4), plain = greedy(ps[1], 4);
  echoed.params.logprobs = 1;
  echoed.params.echo_logprobs = true;
  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .max_scored_rows = 3, .kv_tokens = 256});
  auto se = sched.submit(echoed), sp = sched.submit(plain);
  ASSERT_TRUE(sched.step());
  EXPECT_EQ(sched.stats().prompt_tokens, 3 + 40) << "3 echoed positions to score, and the plain prompt at once";
  sched.run_until_idle();
  EXPECT_GE(sched.stats().steps, 13) << "39 prompt positions to score, 3 a step";
  const Scored o = drain_scored(*se);
  EXPECT_EQ(o.tokens.size(), 4u);
  expect_request_scored(*m.model, echoed, o);
  EXPECT_EQ(drain(*sp).tokens, alone(*m.model, ps[1], 4));
}

// The prompt's log-probabilities through 8-token steps (prompts read in chunks) and a cache too small for
// the batch (sequences preempted and recomputed, their prompts read again): each prompt token scored
// exactly once, with the values of one pass over the whole prompt.
TEST(Scheduler, PromptLogprobsSurviveChunkingAndPreemption) {
  Loaded& m = stories();
  const auto ps = prompts(12, 5, 30, m.ck.config.vocab_size, 5);
  Scheduler sched(*m.model, {.max_seqs = 8, .max_batch_tokens = 8, .kv_tokens = 96, .block_size = 8});
  std::vector<Request> requests;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : ps) {
    Request r = greedy(p, 30);
    r.params.logprobs = 2;
    r.params.echo_logprobs = true;
    requests.push_back(r);
    streams.push_back(sched.submit(r));
  }
  sched.run_until_idle();
  EXPECT_GT(sched.stats().preemptions, 0) << "the cache holds 96 tokens, the requests need up to 8 x 60";
  for (size_t i = 0; i < ps.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "request " << i);
    const Scored o = drain_scored(*streams[i]);
    EXPECT_EQ(o.tokens.size(), 30u);
    expect_request_scored(*m.model, requests[i], o);
  }
  // In the middle of a prompt, by construction: 2-token steps, so b reads its 56-token prompt (7 of the 12
  // blocks, reserved at admission) one token a step beside a's decode token; a grows a block every 8 steps
  // and at 41 tokens (6 blocks) the cache is short: b, the last admitted, is preempted 32 tokens into its
  // prompt, waits for a to finish and reads its prompt again from the start.
  Scheduler small(*m.model, {.max_seqs = 2, .max_batch_tokens = 2, .kv_tokens = 96, .block_size = 8});
  const Request a = greedy(prompts(1, 8, 8, m.ck.config.vocab_size, 7)[0], 60);
  Request b = greedy(prompts(1, 56, 56, m.ck.config.vocab_size, 8)[0], 4);
  b.params.logprobs = 1;
  b.params.echo_logprobs = true;
  auto sa = small.submit(a);
  auto sb = small.submit(b);
  small.run_until_idle();
  EXPECT_EQ(small.stats().preemptions, 1);
  EXPECT_EQ(drain(*sa).tokens.size(), 60u);
  expect_request_scored(*m.model, b, drain_scored(*sb));
}

// The choices of one prompt (submit_choices, the API's n) score an echoed prompt once between them, each
// position by whichever choice reads it first: every choice's first event carries the prompt's
// log-probabilities, the same in all and those of one pass over the prompt, and the scheduler counts the
// prompt's positions scored once — through 3-row scoring steps (the prompt read in short chunks), prompt-only
// choices (max_tokens 0), and a cache too small for the choices together (preempted, prompts read again).
// Choices that do not share their prompt and log-probability parameters are refused, and none is queued.
TEST(Scheduler, ChoicesOfOnePromptScoreItOnce) {
  Loaded& m = stories();
  const std::vector<int32_t> prompt = prompts(1, 40, 40, m.ck.config.vocab_size, 21)[0];
  struct Case {
    const char* name;
    SchedulerOptions options;
    int64_t max_tokens;
  };
  for (const Case& c : std::vector<Case>{
           {"3 scoring rows a step", {.max_seqs = 4, .max_batch_tokens = 64, .max_scored_rows = 3, .kv_tokens = 1024}, 4},
           {"prompt only", {.max_seqs = 4, .max_batch_tokens = 16, .kv_tokens = 1024}, 0},
           {"preempted", {.max_seqs = 3, .max_batch_tokens = 8, .kv_tokens = 96, .block_size = 8}, 12},
       }) {
    SCOPED_TRACE(c.name);
    Scheduler sched(*m.model, c.options);
    std::vector<Request> choices;
    for (uint64_t j = 0; j < 3; ++j) {
      Request r = greedy(prompt, c.max_tokens);
      r.params.logprobs = 2;
      r.params.echo_logprobs = true;
      r.params.sampling = {.temperature = 0.9f, .seed = 5};
      r.params.sample_stream = j;
      choices.push_back(r);
    }
    const auto streams = sched.submit_choices(choices);
    sched.run_until_idle();
    EXPECT_EQ(sched.stats().scored_prompt_tokens, static_cast<int64_t>(prompt.size()) - 1)
        << "each prompt position scored once for the 3 choices";
    if (c.options.kv_tokens == 96) {
      EXPECT_GT(sched.stats().preemptions, 0);
    }
    std::vector<Scored> got;
    for (size_t j = 0; j < streams.size(); ++j) {
      SCOPED_TRACE(testing::Message() << "choice " << j);
      got.push_back(drain_scored(*streams[j]));
      EXPECT_EQ(static_cast<int64_t>(got[j].tokens.size()), c.max_tokens);
      expect_request_scored(*m.model, choices[j], got[j]);
      ASSERT_EQ(got[j].prompt.size(), got[0].prompt.size());
      for (size_t p = 0; p < got[0].prompt.size(); ++p) {
        EXPECT_EQ(got[j].prompt[p].logprob, got[0].prompt[p].logprob) << "prompt token " << p;
        EXPECT_EQ(got[j].prompt[p].top, got[0].prompt[p].top) << "prompt token " << p;
      }
    }
    if (c.max_tokens > 0) {
      EXPECT_NE(got[0].tokens, got[1].tokens) << "each choice samples from its own stream";
    }
    EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks());
  }

  Scheduler sched(*m.model, {.max_seqs = 4, .max_batch_tokens = 64, .kv_tokens = 1024});
  Request a = greedy(prompt, 2);
  a.params.logprobs = 1;
  a.params.echo_logprobs = true;
  Request other_prompt = a, other_logprobs = a, too_long = a;
  other_prompt.prompt.push_back(5);
  other_logprobs.params.logprobs = 2;
  too_long.params.max_tokens = 100000;
  for (const Request& b : {other_prompt, other_logprobs}) {
    EXPECT_THAT(test::error_of([&] { sched.submit_choices({a, b}); }),
                HasSubstr("the choices of one prompt must share the prompt, logprobs and echo_logprobs"));
  }
  EXPECT_THAT(test::error_of([&] { sched.submit_choices({a, too_long}); }), HasSubstr("exceeds the model's context"));
  EXPECT_EQ(sched.waiting(), 0) << "a refused set of choices queues none of them";
  EXPECT_FALSE(sched.step());
}
