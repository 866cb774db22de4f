// Tensor parallelism on the CPU (docs/parallel.md): the in-process communicator's collectives over 1-4
// rank threads, and every fixture model and stories260K split over 2-4 ranks giving the logits of one rank
// (within 1e-5, scaled as test_util.h measures) and the same greedy text, dense and sparse; global head
// selection choosing exactly the heads and MLP neurons of one rank, balanced k/N per rank; each rank's KV
// bytes per token; the thread that steps the engine bound to rank 0; bad --tp values refused. CUDA: NCCL with
// one rank equals the plain path (skipped without a GPU).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <omp.h>
#include <set>
#include <thread>

#include "io/checkpoint.h"
#include "model/model.h"
#include "ops/communicator.h"
#include "ops/cuda_devices.h"
#include "runtime/engine.h"
#include "runtime/rank_threads.h"
#include "runtime/scheduler.h"
#include "sparse/random_sparsity.h"
#include "sparse/router_sparsity.h"
#include "sparse/routers.h"
#include "test_util.h"

namespace polar {
namespace {

constexpr double kTol = 1e-5;

std::span<const float> floats(const Tensor& t) { return {t.data<float>(), static_cast<size_t>(t.numel())}; }

// Every rank's communicator over CPU backends, each rank run on its own thread by RankThreads.
struct CpuGroup {
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Communicator>> comms;
  explicit CpuGroup(int n) {
    std::vector<Backend*> ptrs;
    for (int r = 0; r < n; ++r) {
      backends.push_back(make_cpu_backend(n));
      ptrs.push_back(backends.back().get());
    }
    comms = make_communicators(ptrs);
  }
};

// Value i of rank r's tensor: a few mantissa bits' worth of spread, so the order of summation shows.
// (volatile: computed once and rounded to float the same way wherever it is called, never contracted.)
float value(int r, int64_t i) {
  volatile float v = 1.0f / static_cast<float>(3 + r * 7 + i % 11);
  volatile float w = static_cast<float>(i) * 1e-3f;
  return v + w;
}

TEST(Communicator, AllReduceSumsInRankOrderOverOneToFourRanks) {
  for (int n = 1; n <= 4; ++n)
    for (int64_t len : {1, 7, 1001}) {
      SCOPED_TRACE(testing::Message() << n << " ranks, " << len << " elements");
      CpuGroup g(n);
      std::vector<Tensor> t(static_cast<size_t>(n));
      RankThreads threads(n);
      threads.run([&](int r) {
        t[r] = Tensor::empty(DType::F32, {len});
        for (int64_t i = 0; i < len; ++i) t[r].data<float>()[i] = value(r, i);
        g.comms[r]->all_reduce_sum(t[r]);
      });
      for (int64_t i = 0; i < len; ++i) {
        float want = value(0, i);  // rank order 0..N-1, exactly as documented
        for (int r = 1; r < n; ++r) want += value(r, i);
        for (int r = 0; r < n; ++r) ASSERT_EQ(t[r].data<float>()[i], want) << "rank " << r << " element " << i;
      }
    }
}

TEST(Communicator, AllGatherConcatenatesAlongDimZeroInRankOrder) {
  for (int n = 1; n <= 4; ++n) {
    CpuGroup g(n);
    std::vector<Tensor> out(static_cast<size_t>(n));
    RankThreads threads(n);
    threads.run([&](int r) {
      Tensor in = Tensor::empty(DType::I32, {3, 5});
      for (int64_t i = 0; i < 15; ++i) in.data<int32_t>()[i] = r * 100 + static_cast<int32_t>(i);
      out[r] = Tensor::empty(DType::I32, {3 * n, 5});
      g.comms[r]->all_gather(in, out[r]);
    });
    for (int r = 0; r < n; ++r)
      for (int q = 0; q < n; ++q)
        for (int64_t i = 0; i < 15; ++i) ASSERT_EQ(out[r].data<int32_t>()[q * 15 + i], q * 100 + i);
  }
}

TEST(Communicator, ARankThatFailsReleasesTheOthersWithAnError) {
  CpuGroup g(3);
  RankThreads threads(3);
  const std::string err = test::error_of([&] {
    threads.run([&](int r) {
      if (r == 1) {
        g.comms[1]->abort();
        fail("rank 1 broke");
      }
      Tensor t = Tensor::zeros(DType::F32, {4});
      g.comms[r]->all_reduce_sum(t);  // would wait for rank 1 forever
    });
  });
  EXPECT_NE(err.find("another rank failed"), std::string::npos) << err;
}

// A model over n CPU ranks (n = 1: the plain model, no communicator).
struct TpModel {
  CpuGroup group;
  std::unique_ptr<Model> model;
  TpModel(const Checkpoint& ck, int n) : group(n) {
    if (n == 1) {
      group.comms.clear();
      model = make_model(ck, *group.backends[0]);
      return;
    }
    std::vector<Backend*> backends;
    std::vector<Communicator*> comms;
    for (int r = 0; r < n; ++r) {
      backends.push_back(group.backends[r].get());
      comms.push_back(group.comms[r].get());
    }
    model = make_model(ck, backends, comms);
  }
};

std::vector<std::string> model_paths() {
  std::vector<std::string> paths;
  for (const char* name : {"opt", "opt_postln_proj", "llama_mha", "llama3_gqa", "mistral_gqa", "qwen2_gqa"})
    paths.push_back(test::shared_path(std::string("fixtures/hf/") + name));
  paths.push_back(test::shared_path("models/stories260K/stories260K.gguf"));
  return paths;
}

// The logits of a prompt read in one chunk (all rows), then of `decode` greedy steps (one row each), and
// the greedy tokens.
struct Decoded {
  std::vector<Tensor> logits;
  std::vector<int32_t> tokens;
};

Decoded greedy(Model& model, Sparsity* sparsity, const std::vector<int32_t>& prompt, int decode) {
  Engine engine(model, {.kv_tokens = 64, .sparsity = sparsity});
  const int64_t seq = engine.add_sequence();
  Decoded run;
  run.logits.push_back(engine.step({{seq, prompt}}, /*all_logits=*/true));
  auto next = [&](const Tensor& rows) {
    const float* last = rows.data<float>() + (rows.dim(0) - 1) * rows.dim(1);
    return static_cast<int32_t>(std::max_element(last, last + rows.dim(1)) - last);
  };
  for (int i = 0; i < decode; ++i) {
    run.tokens.push_back(next(run.logits.back()));
    run.logits.push_back(engine.step({{seq, std::span<const int32_t>(&run.tokens.back(), 1)}}, false));
  }
  return run;
}

void expect_same_run(const Decoded& tp, const Decoded& one) {
  ASSERT_EQ(tp.logits.size(), one.logits.size());
  for (size_t i = 0; i < one.logits.size(); ++i)
    EXPECT_LE(test::scaled_diff(floats(tp.logits[i]), floats(one.logits[i])), kTol) << "step " << i;
  EXPECT_EQ(tp.tokens, one.tokens);
}

const std::vector<int32_t> kPrompt = {1, 20, 30, 45, 8, 9, 77, 100, 13, 5};

TEST(TensorParallel, EveryModelSplitOverTwoToFourRanksGivesTheLogitsAndTextOfOne) {
  int gqa_replicated = 0;
  for (const std::string& path : model_paths()) {
    SCOPED_TRACE(path);
    const Checkpoint ck = load_checkpoint(path);
    const ModelConfig& c = ck.config;
    TpModel one(ck, 1);
    const Decoded want = greedy(*one.model, nullptr, kPrompt, 8);
    const std::vector<int> sizes = tp_sizes(c, 4);
    ASSERT_GE(sizes.size(), 2u) << "every fixture splits over 2 ranks at least";
    for (int n : sizes) {
      if (n == 1) continue;
      SCOPED_TRACE(testing::Message() << "--tp " << n);
      TpModel tp(ck, n);
      EXPECT_EQ(tp.model->dims().heads, c.n_heads / n);
      if (c.n_kv_heads < n) {
        ++gqa_replicated;
        EXPECT_EQ(tp.model->dims().kv_heads, 1);
      }
      expect_same_run(greedy(*tp.model, nullptr, kPrompt, 8), want);
    }
  }
  EXPECT_GT(gqa_replicated, 0) << "a GQA model with fewer KV heads than ranks (replicated KV heads) was run";
}

// Model::kv_bytes_per_token is what each rank's KV cache holds per token (its stores, the scratch block
// included, over their slots): at --tp 2 half the model's K/V, at --tp 4 — more ranks than llama3_gqa's 2 KV
// heads, each rank caching one replicated head — as much as at --tp 2, so the 4 ranks hold twice the model's.
TEST(TensorParallel, KvBytesPerTokenAreWhatEachRankCaches) {
  const Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  const ModelConfig& c = ck.config;
  ASSERT_EQ(c.n_kv_heads, 2);
  const int64_t model_per_token = c.n_layers * 2 * c.n_kv_heads * c.head_dim * 4;  // fp32 on the CPU
  for (const auto& [n, per_rank] :
       std::vector<std::pair<int, int64_t>>{{1, model_per_token}, {2, model_per_token / 2}, {4, model_per_token / 2}}) {
    SCOPED_TRACE(testing::Message() << "--tp " << n);
    TpModel tp(ck, n);
    Engine engine(*tp.model, {.kv_tokens = 64});
    const int64_t slots = (engine.cache().num_blocks() + 1) * engine.cache().block_size();
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(tp.model->rank(r).kv_bytes_per_token(), per_rank) << "rank " << r;
      int64_t held = 0;
      for (const KVLayer& l : engine.cache().layers(r)) held += static_cast<int64_t>(l.k.nbytes() + l.v.nbytes());
      EXPECT_EQ(held, slots * tp.model->rank(r).kv_bytes_per_token()) << "rank " << r;
    }
  }
}

// The thread that steps the engine need not be the one that loaded the model: polar serve runs the
// scheduler's loop on a thread of its own, whose device work must go to rank 0's device (--device cuda:N),
// not to the thread's default. The Engine binds rank 0's backend to whichever thread steps it
// (Backend::bind_thread: cudaSetDevice on CUDA); a CPU rank's binding, its share of OpenMP's threads, shows.
TEST(TensorParallel, TheThreadThatRunsTheSchedulerLoopIsBoundToRankZero) {
  int fresh = 0;  // OpenMP's threads on a new thread, until a backend binds it
  std::thread([&] { fresh = omp_get_max_threads(); }).join();
  const int share = std::max(1, omp_get_max_threads() / 2);  // a rank's, of make_cpu_backend(2) made on this thread
  if (share == fresh) GTEST_SKIP() << "one OpenMP thread: a rank's share of them is no different";
  const Checkpoint ck = load_checkpoint(test::shared_path("models/stories260K/stories260K.gguf"));
  TpModel tp(ck, 2);
  Scheduler sched(*tp.model, {.max_seqs = 1, .max_batch_tokens = 16, .kv_tokens = 64});
  Request r;
  r.prompt = kPrompt;
  r.params.max_tokens = 2;
  const auto stream = sched.submit(r);
  int bound = 0;
  std::thread loop([&] {
    sched.run_until_idle();
    bound = omp_get_max_threads();
  });
  loop.join();
  EXPECT_TRUE(stream->finished());
  EXPECT_EQ(bound, share) << "a new thread has " << fresh;
}

// Rank r's selections [T, m] in whole-model numbering (padding dropped), merged over the ranks: what the
// group attends with (or, for MLP neurons, applies).
std::vector<std::set<int32_t>> merged(const std::vector<Tensor>& own, const std::vector<int64_t>& first,
                                      const std::vector<int64_t>& count) {
  std::vector<std::set<int32_t>> out(static_cast<size_t>(own[0].dim(0)));
  for (size_t r = 0; r < own.size(); ++r)
    for (int64_t t = 0; t < own[r].dim(0); ++t)
      for (int64_t j = 0; j < own[r].dim(1); ++j) {
        const int32_t u = own[r].data<int32_t>()[t * own[r].dim(1) + j];
        EXPECT_LE(u, count[r]) << "an entry past the rank's units and its padding";
        if (u < count[r]) out[t].insert(static_cast<int32_t>(first[r] + u));
      }
  return out;
}

std::vector<std::set<int32_t>> rows_of(const Tensor& idx) {
  std::vector<std::set<int32_t>> out(static_cast<size_t>(idx.dim(0)));
  for (int64_t t = 0; t < idx.dim(0); ++t)
    out[t] = std::set<int32_t>(idx.data<int32_t>() + t * idx.dim(1), idx.data<int32_t>() + (t + 1) * idx.dim(1));
  return out;
}

std::unique_ptr<RouterSparsity> sparsity_for(Model& model, const Routers& routers, TpHeads mode) {
  auto first = std::make_unique<RouterSparsity>(model, routers, 0.5, Granularity::Group, mode);
  for (int r = 1; r < model.ranks(); ++r)
    first->add_rank(std::make_unique<RouterSparsity>(model.rank(r), routers, 0.5, Granularity::Group, mode));
  return first;
}

TEST(TensorParallel, GlobalSelectionIsOneRanksSelectionAndGivesItsLogits) {
  for (const std::string& path : model_paths()) {
    SCOPED_TRACE(path);
    const Checkpoint ck = load_checkpoint(path);
    const ModelConfig& c = ck.config;
    const Routers routers = random_routers(c, model_fingerprint(ck), 7);
    TpModel one(ck, 1);
    auto one_sparsity = sparsity_for(*one.model, routers, TpHeads::Global);
    if (!c.gated_mlp) {
      EXPECT_LT(one_sparsity->mlp_neurons_kept(1, 1), c.ffn) << "OPT's decode steps gather MLP neurons (padded per rank)";
    }
    const Decoded want = greedy(*one.model, one_sparsity.get(), kPrompt, 8);
    for (int n : tp_sizes(c, 4)) {
      if (n == 1) continue;
      SCOPED_TRACE(testing::Message() << "--tp " << n);
      TpModel tp(ck, n);
      auto sparsity = sparsity_for(*tp.model, routers, TpHeads::Global);
      expect_same_run(greedy(*tp.model, sparsity.get(), kPrompt, 8), want);
      // The selections themselves at layer 1 for 5 tokens of random router input: the ranks' KV heads and
      // MLP neurons together are exactly one rank's.
      Tensor h = one.group.backends[0]->random_uniform(DType::F32, {5, c.hidden}, -1, 1, 3);
      const std::set<int32_t> none;
      std::vector<Tensor> heads, neurons;
      std::vector<int64_t> kv0, kvn, f0, fn;
      for (int r = 0; r < n; ++r) {
        Sparsity& s = sparsity->rank(r);
        heads.push_back(s.attention_heads(1, h));
        const ShardDims& d = tp.model->rank(r).dims();
        kv0.push_back(d.kv_head0), kvn.push_back(d.kv_heads), f0.push_back(d.ffn0), fn.push_back(d.ffn);
        StepLayout layout;
        layout.live_tokens = Tensor::empty(DType::I32, {1});
        layout.live_tokens.data<int32_t>()[0] = 5;
        Tensor mlp = s.mlp_neurons(1, h, layout);
        if (mlp.defined()) neurons.push_back(mlp.reshape({1, mlp.numel()}));
      }
      EXPECT_EQ(merged(heads, kv0, kvn), rows_of(one_sparsity->attention_heads(1, h)));
      StepLayout layout;
      layout.live_tokens = Tensor::empty(DType::I32, {1});
      layout.live_tokens.data<int32_t>()[0] = 5;
      Tensor mlp = one_sparsity->mlp_neurons(1, h, layout);
      ASSERT_EQ(mlp.defined(), !neurons.empty());
      if (mlp.defined()) {
        EXPECT_EQ(merged(neurons, f0, fn)[0], rows_of(mlp.reshape({1, mlp.numel()}))[0]);
      }
    }
  }
}

TEST(TensorParallel, QueryHeadSelectionAndOtherSelectorsKeepOneRanksChoice) {
  // llama3_gqa: 8 query heads over 2 KV heads, so at --tp 4 each KV head is on two ranks. Per-query-head
  // selection (keep_heads on each rank's query heads) and the random selector, localised the same way.
  const Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama3_gqa"));
  for (Granularity g : {Granularity::Group, Granularity::Head}) {
    auto selector = [&](Model& model) {
      auto first = std::make_unique<RandomSparsity>(model, 0.5, 3, g);
      for (int r = 1; r < model.ranks(); ++r) first->add_rank(std::make_unique<RandomSparsity>(model.rank(r), 0.5, 3, g));
      return first;
    };
    TpModel one(ck, 1);
    auto s1 = selector(*one.model);
    const Decoded want = greedy(*one.model, s1.get(), kPrompt, 6);
    for (int n : {2, 4}) {
      SCOPED_TRACE(testing::Message() << granularity_name(g) << ", --tp " << n);
      TpModel tp(ck, n);
      auto sn = selector(*tp.model);
      expect_same_run(greedy(*tp.model, sn.get(), kPrompt, 6), want);
    }
  }
}

TEST(TensorParallel, ScoredSparsePassesMatchOneRank) {
  // perplexity / eval: each token scored as its own sparse decode step, per-token MLP sets included.
  const Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/opt"));
  const Routers routers = random_routers(ck.config, model_fingerprint(ck), 11);
  auto scored = [&](Model& model, Sparsity& sparsity) {
    Engine engine(model, {.kv_tokens = 64, .sparsity = &sparsity});
    return engine.step({{engine.add_sequence(), kPrompt, std::optional<int64_t>(1)}}, true);
  };
  TpModel one(ck, 1), two(ck, 2);
  auto s1 = sparsity_for(*one.model, routers, TpHeads::Global), s2 = sparsity_for(*two.model, routers, TpHeads::Global);
  EXPECT_LE(test::scaled_diff(floats(scored(*two.model, *s2)), floats(scored(*one.model, *s1))), kTol);
}

TEST(TensorParallel, BalancedSelectionTakesKOverNOfEachRanksOwnHeads) {
  const Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/llama_mha"));  // 8 heads
  const Routers routers = random_routers(ck.config, model_fingerprint(ck), 5);
  TpModel tp(ck, 2);
  auto sparsity = sparsity_for(*tp.model, routers, TpHeads::Balanced);
  Tensor h = tp.group.backends[0]->random_uniform(DType::F32, {6, ck.config.hidden}, -1, 1, 9);
  for (int r = 0; r < 2; ++r) {
    const Tensor idx = sparsity->rank(r).attention_heads(2, h);
    ASSERT_EQ(idx.shape(), (Shape{6, 2})) << "k = 4 of 8 heads: 2 of each rank's 4";
    for (const std::set<int32_t>& row : rows_of(idx)) {
      EXPECT_EQ(row.size(), 2u);
      EXPECT_LT(*row.rbegin(), 4) << "the rank's own heads, no padding";
    }
  }
  // It decodes (another selection than one rank's, so no logits to compare).
  const Decoded run = greedy(*tp.model, sparsity.get(), kPrompt, 4);
  for (const Tensor& l : run.logits)
    for (float v : floats(l)) ASSERT_TRUE(std::isfinite(v));
}

TEST(TensorParallel, UnevenSplitsNameTheSizesThatWork) {
  const Checkpoint ck = load_checkpoint(test::shared_path("fixtures/hf/opt"));  // 4 heads, 256 neurons
  const std::string err = test::error_of([&] { TpModel tp(ck, 3); });
  EXPECT_NE(err.find("--tp 3 does not split"), std::string::npos) << err;
  EXPECT_NE(err.find("1, 2, 4"), std::string::npos) << err;
}

TEST(TensorParallelCli, TpTwoGeneratesTheTextOfOneAndBadValuesFail) {
  const std::string model = test::shared_path("models/stories260K/stories260K.gguf");
  auto gen = [&](const std::string& tp) {
    return test::run_polar({"generate", "-m", model, "--prompt", "Once upon a time", "-n", "16", "--tp", tp});
  };
  const test::RunResult one = gen("1"), two = gen("2");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  ASSERT_EQ(two.exit_code, 0) << two.err;
  EXPECT_EQ(two.out, one.out);
  const test::RunResult comm = test::run_polar(
      {"generate", "-m", model, "--prompt", "Once upon a time", "-n", "16", "--tp", "1", "--tp-comm"});
  ASSERT_EQ(comm.exit_code, 0) << comm.err;
  EXPECT_EQ(comm.out, one.out) << "--tp 1 through a one-rank communicator";
  // Scored passes through the command (perplexity), dense and sparse with random routers.
  test::TempDir dir;
  const std::string routers = dir.path("r.safetensors");
  ASSERT_EQ(test::run_polar({"routers", "--random", "-m", model, "-o", routers}).exit_code, 0);
  auto perplexity = [&](const std::string& tp, bool sparse) {
    std::vector<std::string> args = {"perplexity", "-m", model, "--text", test::shared_path("data/text/wikitext2_test.txt"),
                                     "--ctx", "64", "--max-tokens", "2000", "--tp", tp};
    if (sparse) args.insert(args.end(), {"--routers", routers, "--density", "0.5"});
    const test::RunResult r = test::run_polar(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    const size_t at = r.out.find("perplexity ");
    return at == std::string::npos ? -1.0 : std::stod(r.out.substr(at + 11));
  };
  for (bool sparse : {false, true}) {
    const double want = perplexity("1", sparse);
    EXPECT_GT(want, 1.0);
    EXPECT_NEAR(perplexity("2", sparse), want, 1e-5 * want) << (sparse ? "sparse" : "dense");
  }
  const test::RunResult three = gen("3");  // stories260K: 8 heads, 4 KV heads
  EXPECT_NE(three.exit_code, 0);
  EXPECT_NE(three.err.find("--tp 3 does not split"), std::string::npos) << three.err;
  const test::RunResult zero = gen("0");
  EXPECT_NE(zero.exit_code, 0);
  EXPECT_NE(zero.err.find("--tp"), std::string::npos) << zero.err;
  // Devices: --devices names GPUs, and one GPU cannot hold several ranks (both refused before any device
  // is touched, so this runs without a GPU too).
  const test::RunResult cpu_devices = test::run_polar({"logits", "-m", model, "--tokens", "1,2", "-o", "/tmp/x", "--tp", "2", "--devices", "0,1"});
  EXPECT_NE(cpu_devices.exit_code, 0);
  EXPECT_NE(cpu_devices.err.find("--devices names CUDA devices"), std::string::npos) << cpu_devices.err;
  const test::RunResult one_gpu = test::run_polar({"logits", "-m", model, "--tokens", "1,2", "-o", "/tmp/x", "--tp", "2", "--device", "cuda:1"});
  EXPECT_NE(one_gpu.exit_code, 0);
  EXPECT_NE(one_gpu.err.find("is one GPU"), std::string::npos) << one_gpu.err;
  const test::RunResult calibrate = test::run_polar({"calibrate", "-m", model, "--tp", "2", "--text", model, "-o", "/nonexistent/x"});
  EXPECT_NE(calibrate.exit_code, 0);
  EXPECT_NE(calibrate.err.find("without --tp"), std::string::npos) << calibrate.err;
}

// CUDA: the model through an NCCL communicator of one rank (every all-reduce issued, on the backend's
// stream, inside the decode graphs) gives exactly the plain path's logits.
TEST(TensorParallelCuda, OneRankThroughNcclEqualsThePlainPath) {
  if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device (or a build without CUDA)";
  const Checkpoint ck = load_checkpoint(test::shared_path("models/stories260K/stories260K.gguf"));
  auto be = make_backend("cuda", DType::F16);
  auto comms = make_communicators({be.get()});
  auto plain = make_model(ck, *be);
  auto nccl = make_model(ck, {be.get()}, {comms[0].get()});
  ASSERT_NE(nccl->shard().comm, nullptr);
  const Decoded want = greedy(*plain, nullptr, kPrompt, 8), got = greedy(*nccl, nullptr, kPrompt, 8);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  for (size_t i = 0; i < want.logits.size(); ++i)
    EXPECT_EQ(test::scaled_diff(floats(got.logits[i]), floats(want.logits[i])), 0.0) << "step " << i;
  EXPECT_EQ(got.tokens, want.tokens);
}

}  // namespace
}  // namespace polar
