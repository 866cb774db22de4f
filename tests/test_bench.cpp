// polar bench: shape presets parse to the real models' configs, synthetic models build and run on the CPU,
// the decode sweep produces sane rows and skips what does not fit, and the command line works as
// documented (table, CSV, JSON, plot, --model, clear errors).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "bench/decode_bench.h"
#include "bench/shapes.h"
#include "io/checkpoint.h"
#include "runtime/engine.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;
using ::testing::Not;
using test::run_polar;
using test::RunResult;

namespace {

struct Synthetic {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  Checkpoint ck;
  std::unique_ptr<Model> model;
  explicit Synthetic(const ModelConfig& config, uint64_t seed = 0) : ck(synthetic_checkpoint(config, "test", seed)) {
    model = make_model(ck, *backend);
  }
};

// Last-token logits of one prompt, on the host.
std::vector<float> prompt_logits(Model& model, const std::vector<int32_t>& prompt) {
  Engine engine(model, {.kv_tokens = 64});
  Tensor logits = engine.step({{engine.add_sequence(), prompt}}, false);
  return std::vector<float>(logits.data<float>(), logits.data<float>() + logits.numel());
}

using test::error_of;

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string describe(const RunResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout\n" + r.out + "\n--- stderr\n" + r.err;
}

const std::string kCsvHeader =
    "shape,batch,ctx,density,step_ms,tokens_per_s,floor_ms,x_floor,gb_per_s,attention_ms,qkv_o_ms,mlp_ms,other_ms,"
    "profiled_ms,read_floor_ms,x_read";

// A copy rate and a read rate twice as high: every point's read floor is half its copy floor.
const MemoryRates kRates{.copy_gbps = 10.0, .read_gbps = 20.0};

}  // namespace

TEST(Bench, ShapesAreTheRealModels) {
  for (const std::string& name : shape_names()) EXPECT_NO_THROW(shape_config(name)) << name;
  const ModelConfig opt = shape_config("opt-6.7b");
  EXPECT_EQ(opt.family, Family::OPT);
  EXPECT_EQ(opt.hidden, 4096);
  EXPECT_EQ(opt.ffn, 4 * opt.hidden);
  EXPECT_EQ(opt.vocab_size, 50272);
  EXPECT_EQ(opt.max_positions, 2048);
  EXPECT_EQ(opt.position_offset, 2);
  EXPECT_TRUE(opt.pre_norm);
  EXPECT_EQ(shape_config("opt-30b").n_heads, 56);
  // The multi-GPU issue's shapes: OPT-66B (head_dim 128) and Llama-3.1-70B (GQA 64/8, llama3 RoPE).
  const ModelConfig opt66 = shape_config("opt-66b");
  EXPECT_EQ(opt66.n_layers, 64);
  EXPECT_EQ(opt66.head_dim, 128);
  EXPECT_EQ(opt66.ffn, 36864);
  const ModelConfig llama70 = shape_config("llama-3.1-70b");
  EXPECT_EQ(llama70.n_layers, 80);
  EXPECT_EQ(llama70.n_heads, 64);
  EXPECT_EQ(llama70.n_kv_heads, 8);
  EXPECT_EQ(llama70.ffn, 28672);
  EXPECT_EQ(llama70.max_positions, 131072);
  const ModelConfig qwen = shape_config("qwen2.5-7b");
  EXPECT_TRUE(qwen.qkv_bias);
  EXPECT_EQ(qwen.n_heads, 28);
  EXPECT_EQ(qwen.n_kv_heads, 4);
  EXPECT_EQ(qwen.head_dim, 128);
  EXPECT_EQ(qwen.ffn, 18944);
  EXPECT_EQ(qwen.vocab_size, 152064);
  EXPECT_EQ(qwen.sliding_window, 0);
  const ModelConfig mistral = shape_config("mistral-7b");
  EXPECT_EQ(mistral.n_kv_heads, 8);
  EXPECT_EQ(mistral.ffn, 14336);
  EXPECT_EQ(mistral.sliding_window, 4096);
  const ModelConfig llama3 = shape_config("llama-3-8b");
  EXPECT_EQ(llama3.rope.theta, 500000.0);
  EXPECT_EQ(llama3.vocab_size, 128256);
  EXPECT_EQ(shape_config("llama-3.1-8b").rope.scaling, RopeScaling::Llama3);
  EXPECT_EQ(shape_config("llama-2-13b").n_layers, 40);
}

TEST(Bench, UnknownShapeListsTheKnownOnes) {
  const std::string msg = error_of([] { shape_config("llama-9b"); });
  EXPECT_THAT(msg, HasSubstr("unknown shape 'llama-9b'"));
  for (const std::string& name : shape_names()) EXPECT_THAT(msg, HasSubstr(name));
}

TEST(Bench, BadConfigFileSaysWhy) {
  test::TempDir tmp;
  std::ofstream(tmp.path("malformed.json")) << "{\"model_type\": ";
  std::ofstream(tmp.path("incomplete.json")) << R"({"model_type": "llama", "vocab_size": 100})";
  EXPECT_THAT(error_of([&] { load_hf_config(tmp.path("missing.json")); }), HasSubstr("cannot read"));
  EXPECT_THAT(error_of([&] { load_hf_config(tmp.path("malformed.json")); }), HasSubstr("malformed JSON"));
  EXPECT_THAT(error_of([&] { load_hf_config(tmp.path("incomplete.json")); }), HasSubstr("missing field 'hidden_size'"));
}

// Synthetic weights follow tie_word_embeddings: a tied lm_head is the embedding, which every step reads; an
// untied embedding is only gathered from, so it is not part of the step's bytes.
TEST(Bench, SyntheticModelFollowsTiedEmbeddings) {
  ModelConfig c = shape_config("tiny-llama");
  const int64_t embed_bytes = c.vocab_size * c.hidden * 4;
  Synthetic untied(c);
  c.tie_embeddings = true;
  Synthetic tied(c);
  EXPECT_EQ(untied.model->weight_bytes() - tied.model->weight_bytes(), embed_bytes);
  EXPECT_EQ(untied.model->step_weight_bytes(), untied.model->weight_bytes() - embed_bytes);
  EXPECT_EQ(tied.model->step_weight_bytes(), tied.model->weight_bytes());
}

// Random weights keep activations finite and varied through many layers, and the seed decides them.
TEST(Bench, SyntheticWeightsAreFiniteAndSeeded) {
  for (const char* shape : {"tiny-llama", "tiny-opt"}) {
    ModelConfig c = shape_config(shape);
    c.n_layers = 48;
    Synthetic a(c, 1), b(c, 1), other(c, 2);
    const std::vector<int32_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
    const std::vector<float> la = prompt_logits(*a.model, prompt);
    float lo = la[0], hi = la[0];
    for (float v : la) {
      ASSERT_TRUE(std::isfinite(v)) << shape;
      lo = std::min(lo, v), hi = std::max(hi, v);
    }
    EXPECT_LT(std::max(-lo, hi), 1e4f) << shape << ": logits must stay far inside the f16 range";
    EXPECT_GT(hi - lo, 1e-3f) << shape;
    EXPECT_EQ(la, prompt_logits(*b.model, prompt)) << shape;
    EXPECT_NE(la, prompt_logits(*other.model, prompt)) << shape;
  }
}

TEST(Bench, SweepRowsAreSane) {
  for (const char* shape : {"tiny-llama", "tiny-opt"}) {
    Synthetic s(shape_config(shape));
    std::vector<std::string> log;
    const DecodeSweep sweep = run_decode_sweep(*s.model, {.batches = {1, 3}, .contexts = {16, 40}, .steps = 3}, kRates,
                                               [&](const std::string& line) { log.push_back(line); });
    ASSERT_EQ(sweep.points.size(), 4u) << shape;
    EXPECT_TRUE(sweep.skipped.empty()) << shape;
    EXPECT_EQ(log.size(), 4u) << shape;
    for (const DecodePoint& p : sweep.points) {
      SCOPED_TRACE(fmt::format("{} batch {} ctx {}", shape, p.batch, p.ctx));
      EXPECT_EQ(p.density, 1.0);
      EXPECT_GT(p.step_ms, 0);
      EXPECT_NEAR(p.tokens_per_s, p.batch / (p.step_ms / 1e3), 1e-6 * p.tokens_per_s);
      EXPECT_GT(p.floor_ms, 0);
      EXPECT_GT(p.x_floor, 0);
      EXPECT_NEAR(p.x_floor, p.step_ms / p.floor_ms, 1e-9 * p.x_floor);
      EXPECT_NEAR(p.read_floor_ms, p.floor_ms / 2, 1e-9 * p.floor_ms);
      EXPECT_NEAR(p.x_read, p.step_ms / p.read_floor_ms, 1e-9 * p.x_read);
      EXPECT_GT(p.attention_ms, 0);
      EXPECT_GT(p.qkv_o_ms, 0);
      EXPECT_GT(p.mlp_ms, 0);
      EXPECT_GT(p.other_ms, 0);
      // The regions tile the profiled step: their marks open just before it and close just after.
      const double split = p.attention_ms + p.qkv_o_ms + p.mlp_ms + p.other_ms;
      EXPECT_GE(split, p.profiled_ms * 0.99);
      EXPECT_LE(split, p.profiled_ms * 1.05 + 0.05);
    }
    // The floor grows with the batch and the context: bigger points read more KV cache.
    EXPECT_LT(sweep.points[0].floor_ms, sweep.points[1].floor_ms) << shape;
    EXPECT_LT(sweep.points[0].floor_ms, sweep.points[2].floor_ms) << shape;
  }
}

TEST(Bench, SweepSkipsContextsBeyondTheModel) {
  Synthetic s(shape_config("tiny-opt"));  // 128 positions
  std::vector<std::string> log;
  const DecodeSweep sweep = run_decode_sweep(*s.model, {.batches = {2}, .contexts = {16, 200}, .steps = 2}, kRates,
                                             [&](const std::string& line) { log.push_back(line); });
  ASSERT_EQ(sweep.points.size(), 1u);
  EXPECT_EQ(sweep.points[0].ctx, 16);
  ASSERT_EQ(sweep.skipped.size(), 1u);
  EXPECT_EQ(sweep.skipped[0].ctx, 200);
  EXPECT_THAT(sweep.skipped[0].reason, HasSubstr("exceeds the model's 128 positions"));
  EXPECT_THAT(log.back(), HasSubstr("skipping batch 2 ctx 200"));
}

TEST(Bench, SkipDecision) {
  const ModelConfig opt = shape_config("opt-6.7b");
  // OPT-6.7B in f16: 2 x 32 layers x 4096 x 2 bytes = 512 KiB of KV per token.
  const int64_t per_token = 2 * 32 * 4096 * 2;
  const int64_t need = decode_point_bytes(opt, DType::F16, 8, 2048);
  EXPECT_GT(need, 8 * 2048 * per_token);
  EXPECT_LT(need, 8 * 2048 * per_token * 5 / 4);
  EXPECT_EQ(decode_skip_reason(opt, DType::F16, 8, 2048, need), "");
  EXPECT_THAT(decode_skip_reason(opt, DType::F16, 8, 2048, need - 1), HasSubstr("GB free"));
  EXPECT_THAT(decode_skip_reason(opt, DType::F16, 1, 4096, int64_t(1) << 50),
              HasSubstr("context 4096 exceeds the model's 2048 positions"));
  EXPECT_LT(decode_point_bytes(opt, DType::F16, 8, 1024), need);
  EXPECT_LT(decode_point_bytes(opt, DType::F16, 4, 2048), need);
}

TEST(Bench, ContextShorterThanTheStepsIsAnError) {
  Synthetic s(shape_config("tiny-llama"));
  EXPECT_THAT(error_of([&] { run_decode_sweep(*s.model, {.batches = {1}, .contexts = {8}, .steps = 20}, kRates); }),
              HasSubstr("context 8 is shorter than the 24 decode steps"));
}

TEST(BenchCli, SyntheticSweepTableAndCsv) {
  test::TempDir tmp;
  const std::string csv = tmp.path("bench.csv");
  RunResult r = run_polar({"bench", "--shape", "tiny-llama", "--batch", "1,2", "--ctx", "16,32", "--steps", "2", "--csv", csv});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, Not(HasSubstr("skipping"))) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("memory bandwidth"));
  EXPECT_THAT(r.err, HasSubstr("streaming read rate"));
  const std::vector<std::string> table = lines_of(r.out);
  ASSERT_EQ(table.size(), 5u) << r.out;
  EXPECT_THAT(table[0], HasSubstr("x_floor"));
  EXPECT_THAT(table[0], HasSubstr("x_read"));
  std::ifstream f(csv);
  std::stringstream text;
  text << f.rdbuf();
  const std::vector<std::string> rows = lines_of(text.str());
  ASSERT_EQ(rows.size(), 5u) << text.str();
  EXPECT_EQ(rows[0], kCsvHeader);
  const std::vector<std::string> points = {"tiny-llama,1,16,1,", "tiny-llama,2,16,1,", "tiny-llama,1,32,1,",
                                           "tiny-llama,2,32,1,"};
  for (size_t i = 0; i < points.size(); ++i) EXPECT_EQ(rows[i + 1].rfind(points[i], 0), 0u) << rows[i + 1];
}

// bench-kernels' attention rows over any KV block size and either block placement (the same bytes: the
// layout changes, not the work); a bad placement is named.
TEST(BenchCli, KernelAttentionRowsOverBlockSizesAndPlacements) {
  for (const char* blocks : {"scattered", "contiguous"})
    for (const char* bs : {"1", "16", "64"}) {
      RunResult r = run_polar({"bench-kernels", "--device", "cpu", "--attention", "2x100x4x2x16", "--density", "1,0.5",
                               "--kv-block-size", bs, "--kv-blocks", blocks, "--json", "--reps", "2"});
      ASSERT_EQ(r.exit_code, 0) << describe(r);
      const nlohmann::json j = nlohmann::json::parse(r.out);
      ASSERT_EQ(j["rows"].size(), 2u) << r.out;
      EXPECT_EQ(j["rows"][0]["shape"], "B2 N100 H4/2 dh16");
      // K and V of 2 sequences x 100 positions x 2 KV heads x 16 floats, plus q and out (2 x 4 heads x 16).
      EXPECT_EQ(j["rows"][0]["bytes"], 2 * 2 * 100 * 2 * 16 * 4 + 2 * 2 * 4 * 16 * 4) << blocks << " bs " << bs;
      EXPECT_GT(j["rows"][1]["ms"].get<double>(), 0.0);
    }
  RunResult bad = run_polar({"bench-kernels", "--device", "cpu", "--attention", "2x100x4x2x16", "--kv-blocks", "sorted"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.err, HasSubstr("--kv-blocks"));
}

TEST(BenchCli, JsonReportsRowsAndSkips) {
  RunResult r = run_polar({"bench", "--shape", "tiny-opt", "--batch", "2", "--ctx", "64,256", "--steps", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.err, HasSubstr("skipping batch 2 ctx 256"));
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["shape"], "tiny-opt");
  EXPECT_GT(j["memory_gb_per_s"].get<double>(), 0);
  EXPECT_GT(j["read_gb_per_s"].get<double>(), 0);
  EXPECT_GT(j["rows"][0]["x_read"].get<double>(), 0);
  ASSERT_EQ(j["rows"].size(), 1u);
  EXPECT_EQ(j["rows"][0]["ctx"], 64);
  EXPECT_GT(j["rows"][0]["x_floor"].get<double>(), 0);
  ASSERT_EQ(j["skipped"].size(), 1u);
  EXPECT_EQ(j["skipped"][0]["ctx"], 256);
}

TEST(BenchCli, PlotIsAPng) {
  // The test command installs gnuplot; the GPU machine's image lacks it (its plots are drawn elsewhere).
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) GTEST_SKIP() << "gnuplot is not installed";
  test::TempDir tmp;
  const std::string png = tmp.path("bench.png");
  RunResult r = run_polar({"bench", "--shape", "tiny-llama", "--batch", "1,2,4", "--ctx", "16,32", "--steps", "2", "--plot", png});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  const std::vector<uint8_t> bytes = test::read_bytes(png);
  ASSERT_GT(bytes.size(), 1000u);
  EXPECT_EQ(std::string(bytes.begin() + 1, bytes.begin() + 4), "PNG");
}

TEST(BenchCli, FromCsvReprintsTheRowsAndRejectsOtherFiles) {
  test::TempDir tmp;
  const std::string csv = tmp.path("bench.csv");
  // --batch twice: the lists join, and batch 2 is measured once.
  RunResult r = run_polar({"bench", "--shape", "tiny-llama", "--batch", "1,2", "--batch", "2", "--ctx", "16", "--steps", "2",
                           "--csv", csv});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  RunResult again = run_polar({"bench", "--from-csv", csv});
  ASSERT_EQ(again.exit_code, 0) << describe(again);
  EXPECT_EQ(lines_of(again.out).size(), 3u) << again.out;  // header + batch 1 + batch 2
  EXPECT_THAT(again.out, ::testing::HasSubstr("tiny-llama     1     16"));
  EXPECT_THAT(again.out, ::testing::HasSubstr("tiny-llama     2     16"));
  const std::string bad = tmp.path("bad.csv");
  std::ofstream(bad) << "batch,ctx\n1,2\n";
  RunResult rejected = run_polar({"bench", "--from-csv", bad});
  EXPECT_EQ(rejected.exit_code, 1);
  EXPECT_THAT(rejected.err, ::testing::HasSubstr("not a polar bench CSV"));
  std::ifstream in(csv);
  std::string header, row;
  std::getline(in, header);
  std::getline(in, row);
  const std::string broken = tmp.path("broken.csv");
  std::ofstream(broken) << header << "\n" << row.substr(0, row.rfind(',')) << ",x\n";
  RunResult malformed = run_polar({"bench", "--from-csv", broken});
  EXPECT_EQ(malformed.exit_code, 1);
  EXPECT_THAT(malformed.err, ::testing::HasSubstr("line 2: 'x' is not a number"));
  // A CSV written before the read-rate columns (docs/results holds such files) still reads; one cut
  // elsewhere does not.
  auto without_last = [](const std::string& line, int fields) {
    size_t end = line.size();
    for (int i = 0; i < fields; ++i) end = line.rfind(',', end - 1);
    return line.substr(0, end);
  };
  const std::string old = tmp.path("old.csv");
  std::ofstream(old) << without_last(header, 2) << "\n" << without_last(row, 2) << "\n";
  RunResult old_read = run_polar({"bench", "--from-csv", old});
  ASSERT_EQ(old_read.exit_code, 0) << describe(old_read);
  EXPECT_THAT(old_read.out, ::testing::HasSubstr("tiny-llama     1     16"));
  const std::string cut = tmp.path("cut.csv");
  std::ofstream(cut) << without_last(header, 1) << "\n" << without_last(row, 1) << "\n";
  EXPECT_EQ(run_polar({"bench", "--from-csv", cut}).exit_code, 1);
}

TEST(BenchCli, BaselineComparesSparseWithDenseAndPlotsTheSpeedup) {
  test::TempDir tmp;
  const std::string dense = tmp.path("dense.csv"), sparse = tmp.path("sparse.csv"), other = tmp.path("other.csv");
  auto sweep = [](const std::string& batches, std::vector<std::string> extra) {
    std::vector<std::string> args = {"bench", "--shape", "tiny-llama", "--batch", batches, "--ctx", "16", "--steps", "2"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  };
  ASSERT_EQ(run_polar(sweep("1,2", {"--csv", dense})).exit_code, 0);
  RunResult s = run_polar(sweep("2,4", {"--density", "0.5", "--csv", sparse}));
  ASSERT_EQ(s.exit_code, 0) << describe(s);
  RunResult r = run_polar({"bench", "--from-csv", sparse, "--baseline", dense});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  // Batch 2 is in both sweeps; batch 4 has no dense point and is counted out.
  EXPECT_THAT(r.out, HasSubstr("speedup"));
  EXPECT_THAT(r.out, HasSubstr("tiny-llama       2     16     0.5"));
  EXPECT_EQ(lines_of(r.out).size(), 2u) << r.out;
  EXPECT_THAT(r.err, HasSubstr("1 of 2 points have no dense point"));
  ASSERT_EQ(run_polar({"bench", "--shape", "tiny-opt", "--batch", "1", "--ctx", "16", "--steps", "2", "--csv", other}).exit_code, 0);
  RunResult mismatched = run_polar({"bench", "--from-csv", sparse, "--baseline", other});
  EXPECT_EQ(mismatched.exit_code, 1);
  EXPECT_THAT(mismatched.err, HasSubstr("measures tiny-llama but the baseline"));
  RunResult alone = run_polar({"bench", "--shape", "tiny-llama", "--baseline", dense});
  EXPECT_NE(alone.exit_code, 0);
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) return;
  const std::string png = tmp.path("speedup.png");
  RunResult plotted = run_polar({"bench", "--from-csv", sparse, "--baseline", dense, "--plot", png});
  ASSERT_EQ(plotted.exit_code, 0) << describe(plotted);
  const std::vector<uint8_t> bytes = test::read_bytes(png);
  ASSERT_GT(bytes.size(), 1000u);
  EXPECT_EQ(std::string(bytes.begin() + 1, bytes.begin() + 4), "PNG");
}

TEST(BenchCli, CheckpointStillWorks) {
  RunResult r = run_polar({"bench", "--model", test::shared_path("models/stories260K/stories260K.gguf"), "--batch", "1,2",
                           "--ctx", "32", "--steps", "2", "--prompt-len", "16"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_THAT(r.out, HasSubstr("prefill of 16 tokens"));
  EXPECT_THAT(r.out, HasSubstr("stories260K.gguf"));
  EXPECT_EQ(lines_of(r.out).size(), 4u) << r.out;
}

TEST(BenchCli, BadModelSourcesSayWhy) {
  test::TempDir tmp;
  std::ofstream(tmp.path("bad.json")) << "not json";
  struct Case {
    std::vector<std::string> args;
    std::string expect;
  };
  for (const Case& c : std::vector<Case>{
           {{"bench", "--shape", "gpt-5"}, "unknown shape 'gpt-5' (known: opt-6.7b, opt-13b, opt-30b, opt-66b"},
           {{"bench", "--config", tmp.path("bad.json")}, "malformed JSON"},
           {{"bench", "--config", tmp.path("none.json")}, "cannot read"},
           {{"bench"}, "needs a model: --model PATH, --shape NAME or --config FILE"},
       }) {
    RunResult r = run_polar(c.args);
    EXPECT_EQ(r.exit_code, 1) << describe(r);
    EXPECT_THAT(r.err, HasSubstr(c.expect)) << describe(r);
  }
  RunResult both = run_polar({"bench", "--shape", "tiny-llama", "--config", tmp.path("bad.json")});
  EXPECT_GT(both.exit_code, 0) << describe(both);
  EXPECT_THAT(both.err, HasSubstr("excludes")) << describe(both);
}
