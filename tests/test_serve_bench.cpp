// The serving benchmark (bench/serve_bench.h, polar bench-serve): workloads are reproducible and independent
// of the rate, percentiles follow numpy's definition, every request of a run produces exactly its output
// length with timings in order, and the command's outputs (table, JSON, CSV) and its errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "bench/serve_bench.h"
#include "bench/shapes.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;

namespace {

constexpr double kAllAtOnce = std::numeric_limits<double>::infinity();

std::string describe(const test::RunResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout\n" + r.out + "\n--- stderr\n" + r.err;
}

}  // namespace

TEST(ServeWorkload, SameRequestsAtEveryRateAndArrivalsArePoisson) {
  ServeWorkloadOptions o;
  o.requests = 4000;
  o.prompt = {3, 9};
  o.output = {1, 5};
  o.seed = 7;
  const auto at_once = make_serve_workload(o, 100, kAllAtOnce);
  const auto poisson = make_serve_workload(o, 100, 50.0);
  ASSERT_EQ(at_once.size(), 4000u);
  ASSERT_EQ(poisson.size(), 4000u);
  int64_t short_prompts = 0;
  for (size_t i = 0; i < at_once.size(); ++i) {
    EXPECT_EQ(at_once[i].prompt, poisson[i].prompt);
    EXPECT_EQ(at_once[i].output, poisson[i].output);
    EXPECT_EQ(at_once[i].arrival_s, 0.0);
    const int64_t len = static_cast<int64_t>(at_once[i].prompt.size());
    ASSERT_GE(len, 3);
    ASSERT_LE(len, 9);
    short_prompts += len == 3;
    ASSERT_GE(at_once[i].output, 1);
    ASSERT_LE(at_once[i].output, 5);
    for (int32_t id : at_once[i].prompt) ASSERT_TRUE(id >= 0 && id < 100);
    if (i > 0) {
      ASSERT_GE(poisson[i].arrival_s, poisson[i - 1].arrival_s);
    }
  }
  EXPECT_GT(short_prompts, 0) << "the lower end of the range is drawn";
  // 3999 exponential gaps of mean 1/50 s: their mean is within 5% (over 3 standard errors) of 0.02 s.
  EXPECT_NEAR(poisson.back().arrival_s / 3999, 0.02, 0.001);
  EXPECT_EQ(make_serve_workload(o, 100, 50.0).back().arrival_s, poisson.back().arrival_s) << "seeded";
  o.seed = 8;
  EXPECT_NE(make_serve_workload(o, 100, kAllAtOnce)[0].prompt, at_once[0].prompt);
}

// --prefix-len: every prompt starts with the same tokens, and the requests' own tokens are those of the
// workload without it.
TEST(ServeWorkload, SharedPrefixLeavesTheRequestsOwnTokensAlone) {
  ServeWorkloadOptions o;
  o.requests = 50;
  o.prompt = {3, 9};
  o.seed = 3;
  const auto plain = make_serve_workload(o, 100, kAllAtOnce);
  o.shared_prefix = 20;
  const auto shared = make_serve_workload(o, 100, kAllAtOnce);
  ASSERT_EQ(shared.size(), plain.size());
  const std::vector<int32_t> prefix(shared[0].prompt.begin(), shared[0].prompt.begin() + 20);
  EXPECT_NE(prefix, std::vector<int32_t>(shared[1].prompt.begin() + 1, shared[1].prompt.begin() + 21));
  for (size_t i = 0; i < shared.size(); ++i) {
    ASSERT_EQ(shared[i].prompt.size(), plain[i].prompt.size() + 20);
    EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), shared[i].prompt.begin()));
    EXPECT_TRUE(std::equal(plain[i].prompt.begin(), plain[i].prompt.end(), shared[i].prompt.begin() + 20));
    EXPECT_EQ(shared[i].output, plain[i].output);
  }
}

TEST(ServeWorkload, PromptsAreCutFromTheCorpus) {
  ServeWorkloadOptions o;
  o.requests = 50;
  o.prompt = {4, 10};
  for (int32_t i = 0; i < 30; ++i) o.corpus.push_back(1000 + i);
  for (const ServeRequestSpec& r : make_serve_workload(o, 5000, kAllAtOnce))
    for (size_t k = 1; k < r.prompt.size(); ++k) ASSERT_EQ(r.prompt[k], r.prompt[k - 1] + 1) << "a contiguous cut";
  o.prompt = {4, 31};
  EXPECT_THAT(test::error_of([&] { make_serve_workload(o, 5000, kAllAtOnce); }),
              HasSubstr("the text has 30 tokens, fewer than the longest prompt of 31"));
  o.corpus.clear();
  o.prompt = {0, 3};
  EXPECT_THAT(test::error_of([&] { make_serve_workload(o, 5000, kAllAtOnce); }), HasSubstr("need 1 <= lo <= hi"));
  o.prompt = {2, 3};
  EXPECT_THAT(test::error_of([&] { make_serve_workload(o, 5000, 0.0); }), HasSubstr("request rate must be > 0"));
}

TEST(ServePercentiles, InterpolateLikeNumpy) {
  // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3, 7.6, 9.76]
  const Percentiles p = percentiles({10, 2, 4, 1, 3});
  EXPECT_DOUBLE_EQ(p.mean, 4.0);
  EXPECT_DOUBLE_EQ(p.p50, 3.0);
  EXPECT_NEAR(p.p90, 7.6, 1e-12);
  EXPECT_NEAR(p.p99, 9.76, 1e-12);
  const Percentiles one = percentiles({5});
  EXPECT_EQ(one.p50, 5.0);
  EXPECT_EQ(one.p99, 5.0);
  EXPECT_EQ(percentiles({}).p99, 0.0);
}

// A run on a tiny synthetic model: every request produces exactly its output length, the timings are in
// order, and the counts add up; a second run on the same scheduler reuses its decode graphs' slots.
TEST(ServeBench, EveryRequestProducesItsOutputLength) {
  const ModelConfig c = shape_config("tiny-llama");
  Checkpoint ck = synthetic_checkpoint(c, "tiny", 1);
  auto backend = make_cpu_backend();
  auto model = make_model(ck, *backend);
  ServeWorkloadOptions o;
  o.requests = 24;
  o.prompt = {1, 30};
  o.output = {1, 12};
  Scheduler sched(*model, {.max_seqs = 5, .max_batch_tokens = 16, .kv_tokens = 2048});
  for (double rate : {kAllAtOnce, 400.0}) {
    SCOPED_TRACE(rate);
    const auto reqs = make_serve_workload(o, c.vocab_size, rate);
    const ServeResult r = run_serve_bench(sched, reqs);
    int64_t prompt = 0, output = 0;
    for (const auto& q : reqs) {
      prompt += static_cast<int64_t>(q.prompt.size());
      output += q.output;
    }
    EXPECT_EQ(r.requests, 24);
    EXPECT_EQ(r.prompt_tokens, prompt);
    EXPECT_EQ(r.output_tokens, output);
    EXPECT_EQ(r.stats.generated_tokens, output);
    EXPECT_EQ(r.stats.prompt_tokens, prompt);
    EXPECT_GE(r.duration_s, reqs.back().arrival_s);
    EXPECT_GT(r.ttft_ms.p50, 0);
    EXPECT_LE(r.ttft_ms.p99, r.e2e_ms.p99);
    EXPECT_LE(r.ttft_ms.p50, r.ttft_ms.p90);
    EXPECT_LE(r.ttft_ms.p90, r.ttft_ms.p99);
    EXPECT_LE(r.mean_batch, 5.0);
    EXPECT_GT(r.mean_batch, 0.0);
    EXPECT_NEAR(r.output_tokens_per_s, static_cast<double>(output) / r.duration_s, 1e-9 * r.output_tokens_per_s);
    EXPECT_GT(r.schedule_share, 0.0);
    EXPECT_LT(r.schedule_share, 1.0);
    EXPECT_EQ(r.stats.steps, r.stats.decode_only_steps + r.stats.mixed_steps + r.stats.prefill_only_steps);
    EXPECT_EQ(sched.running(), 0);
    EXPECT_EQ(sched.cache().free_blocks(), sched.cache().num_blocks()) << "every block came back";
  }
}

// A shared prefix is read once per run and served from the prefix cache to the requests admitted after it
// is; each run starts with an empty cache, so two runs of the same requests hit the same amount.
TEST(ServeBench, SharedPrefixIsServedFromTheCacheAndEachRunStartsEmpty) {
  const ModelConfig c = shape_config("tiny-llama");
  Checkpoint ck = synthetic_checkpoint(c, "tiny", 1);
  auto backend = make_cpu_backend();
  auto model = make_model(ck, *backend);
  ServeWorkloadOptions o;
  o.requests = 12;
  o.prompt = {1, 10};
  o.output = {2, 4};
  o.shared_prefix = 48;  // 3 blocks of 16
  Scheduler sched(*model, {.max_seqs = 3, .max_batch_tokens = 64, .kv_tokens = 2048});
  const auto reqs = make_serve_workload(o, c.vocab_size, kAllAtOnce);
  const ServeResult first = run_serve_bench(sched, reqs);
  const ServeResult second = run_serve_bench(sched, reqs);
  EXPECT_GE(first.stats.prefix_hit_tokens, 48 * (12 - 3)) << "all but the first batch find the prefix";
  EXPECT_EQ(second.stats.prefix_hit_tokens, first.stats.prefix_hit_tokens);
  EXPECT_EQ(first.stats.prompt_tokens + first.stats.prefix_hit_tokens, first.prompt_tokens)
      << "every prompt token is either read or found cached";
  EXPECT_EQ(first.output_tokens, second.output_tokens);
}

TEST(BenchServeCli, JsonCsvAndTableAgree) {
  test::TempDir tmp;
  test::RunResult r = test::run_polar({"bench-serve", "--shape", "tiny-llama", "--density", "0.5", "--requests", "12",
                                       "--prompt-len", "4-20", "--output-len", "3", "--request-rate", "300,inf",
                                       "--max-seqs", "4", "--max-batch-tokens", "16", "--json", "--csv",
                                       tmp.path("s.csv")});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["runs"].size(), 4u) << "dense and sparse at two rates";
  EXPECT_EQ(j["runs"][0]["mode"], "dense");
  EXPECT_EQ(j["runs"][1]["rate"], "inf");
  EXPECT_EQ(j["runs"][2]["mode"], "sparse");
  for (const auto& run : j["runs"]) {
    EXPECT_EQ(run["requests"], 12);
    EXPECT_EQ(run["output_tokens"], 36);
    EXPECT_GT(run["output_tok_per_s"].get<double>(), 0);
    EXPECT_LE(run["ttft_ms"]["p50"].get<double>(), run["ttft_ms"]["p99"].get<double>());
  }
  ASSERT_EQ(j["sparse_vs_dense"].size(), 2u);
  EXPECT_GT(j["sparse_vs_dense"][0]["output_throughput_ratio"].get<double>(), 0);
  EXPECT_THAT(r.err, HasSubstr("dense, request rate 300"));
  std::ifstream csv(tmp.path("s.csv"));
  std::string header, line;
  ASSERT_TRUE(std::getline(csv, header));
  EXPECT_EQ(header.rfind("shape,mode,rate,requests,duration_s,req_per_s,output_tok_per_s", 0), 0u) << header;
  int rows = 0;
  while (std::getline(csv, line)) rows += !line.empty();
  EXPECT_EQ(rows, 4);
  // The CSV read back (for machines without gnuplot): the same table and comparison.
  test::RunResult again = test::run_polar({"bench-serve", "--from-csv", tmp.path("s.csv")});
  ASSERT_EQ(again.exit_code, 0) << describe(again);
  EXPECT_THAT(again.out, HasSubstr("tiny-llama   sparse   300"));
  EXPECT_THAT(again.out, HasSubstr("sparse vs dense at rate inf: output tokens/s x"));
  std::ofstream(tmp.path("bad.csv")) << "shape,mode\n";
  test::RunResult bad = test::run_polar({"bench-serve", "--from-csv", tmp.path("bad.csv")});
  EXPECT_EQ(bad.exit_code, 1) << describe(bad);
  EXPECT_THAT(bad.err, HasSubstr("not a polar bench-serve CSV")) << describe(bad);

  test::RunResult table = test::run_polar({"bench-serve", "--shape", "tiny-opt", "--requests", "3", "--prompt-len",
                                           "5", "--output-len", "2"});
  ASSERT_EQ(table.exit_code, 0) << describe(table);
  EXPECT_THAT(table.out, HasSubstr("tiny-opt     dense    inf")) << "dense only without sparsity";
}

// The KV cache line under tensor parallelism: each rank caches its KV heads' share, tiny-llama's 2 KV heads
// one per rank at --tp 2 and, at --tp 4, one replicated head per rank (2 layers x K and V x 16 dims x 4
// bytes = 256 bytes a token per rank), so the line gives both the rank's and the group's size.
TEST(BenchServeCli, KvCacheSizeIsPerRankAndOverTheRanks) {
  for (const auto& [tp, size] : std::vector<std::pair<std::string, std::string>>{
           {"1", "(0.000512 GB)"},
           {"2", "(0.000256 GB per rank, 0.000512 GB over 2 ranks)"},
           {"4", "(0.000256 GB per rank, 0.00102 GB over 4 ranks)"},
       }) {
    test::RunResult r = test::run_polar({"bench-serve", "--shape", "tiny-llama", "--tp", tp, "--kv-tokens", "1000",
                                         "--requests", "2", "--prompt-len", "4", "--output-len", "2", "--warmup", "0"});
    ASSERT_EQ(r.exit_code, 0) << describe(r);
    EXPECT_THAT(r.err, HasSubstr("KV cache: 1000 tokens " + size)) << "--tp " << tp;
  }
}

TEST(BenchServeCli, BadWorkloadsSayWhy) {
  const std::vector<std::string> base = {"bench-serve", "--shape", "tiny-llama", "--requests", "2"};
  struct Case {
    std::vector<std::string> extra;
    std::string expect;
  };
  for (const Case& c : std::vector<Case>{
           {{"--prompt-len", "10-5"}, "--prompt-len: '10-5' is not N or LO-HI"},
           {{"--output-len", "x"}, "--output-len: 'x' is not N or LO-HI"},
           {{"--prompt-len", "0"}, "--prompt-len: '0' is not N or LO-HI"},
           {{"--request-rate", "-2"}, "--request-rate: '-2' is not a positive number"},
           {{"--prompt-len", "200", "--output-len", "100"}, "exceeds the model's context length of 256"},
           {{"--sparse-only"}, "--sparse-only needs sparsity"},
           {{"--dataset", "/nonexistent"}, "has no tokenizer"},
           {{"--max-seqs", "8", "--max-batch-tokens", "4"}, "--max-batch-tokens (4) must be >= --max-seqs (8)"},
       }) {
    std::vector<std::string> args = base;
    args.insert(args.end(), c.extra.begin(), c.extra.end());
    test::RunResult r = test::run_polar(args);
    EXPECT_EQ(r.exit_code, 1) << describe(r);
    EXPECT_THAT(r.err, HasSubstr(c.expect)) << describe(r);
  }
}
