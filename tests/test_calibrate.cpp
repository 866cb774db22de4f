// polar calibrate (calib/): the calibration text is cut as documented; the collected arrays are the
// fixtures' router inputs, head norms and MLP activations (as transformers computed them); the k search
// finds known answers; trained routers beat random selection, on validation and on held-out text; the same
// seed gives the same bytes and an interrupted calibration resumes to the identical file; bad input gives
// clear errors. The fixture models have no tokenizer, and share stories260K's vocabulary size (512), so
// their calibration text is tokenized with stories260K's.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <algorithm>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "calib/calibrate.h"
#include "calib/data.h"
#include "calib/k_table.h"
#include "calib/spill.h"
#include "calib/train.h"
#include "core/half.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/engine.h"
#include "sparse/router_sparsity.h"
#include "sparse/routers.h"
#include "sparse/static_sparsity.h"
#include "test_util.h"

using namespace polar;
using namespace polar::calib;
using ::testing::HasSubstr;
using test::shared_path;
namespace fs = std::filesystem;

namespace {

const std::string kWikitext = "data/text/wikitext2_valid_tokens.txt";
const std::string kC4 = "data/text/c4_sample.jsonl";
const std::string kStories = "models/stories260K/stories260K.gguf";

using test::error_of;

const Tokenizer& stories_tokenizer() {
  static const Checkpoint ck = load_checkpoint(shared_path(kStories));
  return *ck.tokenizer;
}

struct Loaded {
  Checkpoint ck;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::string fingerprint;
};

Loaded load(const std::string& rel) {
  Loaded m{load_checkpoint(shared_path(rel)), make_cpu_backend(), nullptr, ""};
  m.model = make_model(m.ck, *m.backend);
  m.fingerprint = model_fingerprint(m.ck);
  return m;
}

std::vector<std::vector<int32_t>> text_sequences(const std::string& rel, int64_t seq, int64_t tokens) {
  return read_calibration_text({shared_path(rel)}, stories_tokenizer(), seq, tokens).sequences;
}

// Collection, every layer, the routers: what `polar calibrate` does.
Routers calibrate_all(Calibration& cal) {
  cal.collect();
  for (int64_t l = 0; l < cal.dims().layers; ++l) cal.train_layer(l);
  return cal.routers();
}

std::vector<uint8_t> file_bytes(const Routers& r, const std::string& path) {
  save_routers(path, r);
  return test::read_bytes(path);
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// ---- Calibration text.

TEST(CalibData, PlainTextIsCutIntoWindowsWithBos) {
  test::TempDir tmp;
  std::string text;
  for (int i = 0; i < 40; ++i) text += fmt::format("Once upon a time there was a cat number {}.\n", i);
  write_text(tmp.path("a.txt"), text);
  const Tokenizer& tok = stories_tokenizer();
  const std::vector<int32_t> ids = tok.encode(text, false);
  ASSERT_GT(ids.size(), 300u);
  const CalibrationText c = read_calibration_text({tmp.path("a.txt")}, tok, 32, 200);
  EXPECT_EQ(c.tokens, 200);
  EXPECT_FALSE(c.exhausted);
  // 200 tokens = 6 full windows of BOS + 31 text tokens, then BOS + 7.
  ASSERT_EQ(c.sequences.size(), 7u);
  std::vector<int32_t> text_ids;
  for (size_t s = 0; s < c.sequences.size(); ++s) {
    EXPECT_EQ(c.sequences[s].size(), s < 6 ? 32u : 8u);
    EXPECT_EQ(c.sequences[s][0], tok.bos_id());
    text_ids.insert(text_ids.end(), c.sequences[s].begin() + 1, c.sequences[s].end());
  }
  EXPECT_EQ(text_ids, std::vector<int32_t>(ids.begin(), ids.begin() + 193));
}

TEST(CalibData, JsonlRecordsAndFilesInTurn) {
  test::TempDir tmp;
  write_text(tmp.path("a.jsonl"),
             "{\"text\": \"Hello world\"}\n\n{\"prefix\": \"Once upon\", \"gold_completion\": \" a time\", \"x\": 1}\n");
  const std::string b_text = "The cat sat on the mat.\nThe cat sat on the mat.\nThe cat sat on the mat.\n";
  write_text(tmp.path("b.txt"), b_text);
  const Tokenizer& tok = stories_tokenizer();
  auto ids = [&](std::vector<std::string> docs) {
    std::vector<int32_t> out;
    for (const std::string& doc : docs) {
      const std::vector<int32_t> d = tok.encode(doc, false);
      out.insert(out.end(), d.begin(), d.end());
    }
    return out;
  };
  const std::vector<int32_t> a = ids({"Hello world", "Once upon a time"}), b = ids({b_text});
  ASSERT_EQ(a.size(), 10u);
  ASSERT_GE(b.size(), 14u);
  const std::vector<std::string> files = {tmp.path("a.jsonl"), tmp.path("b.txt")};
  const CalibrationText whole = read_calibration_text(files, tok, 512, 1000);
  EXPECT_TRUE(whole.exhausted);
  ASSERT_EQ(whole.sequences.size(), 2u);
  const int32_t bos = tok.bos_id();
  std::vector<int32_t> want_a = {bos}, want_b = {bos};
  want_a.insert(want_a.end(), a.begin(), a.end());
  want_b.insert(want_b.end(), b.begin(), b.end());
  EXPECT_EQ(whole.sequences[0], want_a);
  EXPECT_EQ(whole.sequences[1], want_b);
  EXPECT_EQ(whole.tokens, static_cast<int64_t>(want_a.size() + want_b.size()));
  // Windows of 3 tokens (BOS + 2) from each file in turn: a's 5 and b's first 5 alternate, then b's follow
  // alone, the last one cut to 2 tokens.
  const int64_t limit = 3 * 10 + 3 + 2;
  const CalibrationText turns = read_calibration_text(files, tok, 3, limit);
  EXPECT_FALSE(turns.exhausted);
  EXPECT_EQ(turns.tokens, limit);
  std::vector<int32_t> from_a, from_b;
  for (size_t i = 0; i < turns.sequences.size(); ++i) {
    const std::vector<int32_t>& w = turns.sequences[i];
    EXPECT_EQ(w[0], bos);
    std::vector<int32_t>& to = i % 2 == 0 && i < 10 ? from_a : from_b;
    to.insert(to.end(), w.begin() + 1, w.end());
  }
  EXPECT_EQ(from_a, a);
  EXPECT_EQ(from_b, std::vector<int32_t>(b.begin(), b.begin() + static_cast<int64_t>(from_b.size())));
  EXPECT_EQ(turns.sequences.back().size(), 2u);
}

TEST(CalibData, BadTextIsAClearError) {
  test::TempDir tmp;
  const Tokenizer& tok = stories_tokenizer();
  write_text(tmp.path("empty.txt"), "");
  write_text(tmp.path("ok.txt"), "Once upon a time\n");
  write_text(tmp.path("bad.jsonl"), "{\"text\": \"fine\"}\n{\"text\": \n");
  write_text(tmp.path("fields.jsonl"), "{\"prefix\": \"no completion\"}\n");
  auto read = [&](std::vector<std::string> files, int64_t seq = 64, int64_t tokens = 100) {
    return error_of([&] { read_calibration_text(files, tok, seq, tokens); });
  };
  EXPECT_THAT(read({tmp.path("missing.txt")}), HasSubstr("missing.txt: no such file"));
  EXPECT_THAT(read({tmp.path("")}), HasSubstr("not a regular file"));
  EXPECT_THAT(read({tmp.path("empty.txt")}), HasSubstr("holds no tokens"));
  EXPECT_THAT(read({tmp.path("bad.jsonl")}), HasSubstr("bad.jsonl:2: not a JSON line"));
  EXPECT_THAT(read({tmp.path("fields.jsonl")}), HasSubstr("fields.jsonl:1: a calibration record needs"));
  EXPECT_THAT(read({tmp.path("ok.txt")}, 64, 0), HasSubstr("--tokens must be at least 1"));
  EXPECT_THAT(read({tmp.path("ok.txt")}, 1), HasSubstr("--seq must be at least 2"));
  EXPECT_THAT(read({}), HasSubstr("no calibration text"));
  // A missing file is reported even when the files before it hold enough tokens.
  EXPECT_THAT(read({tmp.path("ok.txt"), tmp.path("gone.txt")}, 64, 2), HasSubstr("gone.txt: no such file"));
}

// ---- Collection against transformers' arrays.

std::vector<int32_t> ids_of(const safetensors::File& ref, const std::string& key) {
  const Tensor t = ref.view(*ref.find(key));
  std::vector<int32_t> out;
  for (int64_t i = 0; i < t.numel(); ++i) out.push_back(static_cast<int32_t>(t.data<int64_t>()[i]));
  return out;
}

// The reference arrays of both fixture sequences, stacked: [T0 + T1, cols].
std::vector<float> stacked(const safetensors::File& ref, const std::string& key, int64_t cols) {
  std::vector<float> out;
  for (int s = 0; s < 2; ++s) {
    const Tensor t = ref.load_f32(*ref.find(fmt::format("seq{}.{}", s, key)));
    EXPECT_EQ(t.dim(1), cols) << key;
    out.insert(out.end(), t.data<float>(), t.data<float>() + t.numel());
  }
  return out;
}

float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (float x : v) m = std::max(m, std::fabs(x));
  return m;
}

class CalibCollect : public ::testing::TestWithParam<std::string> {};

TEST_P(CalibCollect, SpillHoldsTheFixturesArrays) {
  const std::string dir = "fixtures/hf/" + GetParam();
  Loaded m = load(dir);
  const safetensors::File ref = safetensors::File::open(shared_path(dir + "/reference.safetensors"));
  const std::vector<std::vector<int32_t>> seqs = {ids_of(ref, "seq0.input_ids"), ids_of(ref, "seq1.input_ids")};
  const int64_t T = static_cast<int64_t>(seqs[0].size() + seqs[1].size());
  test::TempDir tmp;
  collect(*m.model, seqs, tmp.path("work"));
  const SpillDims dims = SpillDims::of(m.ck.config);
  ASSERT_TRUE(spill_complete(tmp.path("work"), dims, T));
  int64_t checked = 0;
  for (int64_t l = 0; l < dims.layers; ++l) {
    const LayerSpill spill(tmp.path("work"), dims, l, T);
    std::vector<int64_t> rows(static_cast<size_t>(T));
    std::iota(rows.begin(), rows.end(), 0);
    if (dims.has_inputs(l)) {
      // Stored in fp16: within half an fp16 ulp of our fp32 value, itself within 1e-4 of transformers'.
      const std::vector<float> want = stacked(ref, fmt::format("attn_in.{}", l), dims.hidden);
      std::vector<float> got(want.size());
      spill.inputs(rows, got.data());
      const float tol = 1e-4f * max_abs(want);
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_LE(std::fabs(got[i] - want[i]), std::fabs(want[i]) / 2048 + tol) << "attn_in." << l << " [" << i << "]";
      ++checked;
    }
    if (dims.has_norms(l)) {
      const std::vector<float> want = stacked(ref, fmt::format("head_norms.{}", l), dims.heads);
      const float tol = 1e-4f * max_abs(want);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < dims.heads; ++h)
          ASSERT_LE(std::fabs(spill.norms(t)[h] - want[size_t(t * dims.heads + h)]), tol) << "head_norms." << l;
      ++checked;
    }
    if (dims.mlp) {
      // One bit per neuron: activation > 0 (values within the tolerance of zero may go either way).
      const std::vector<float> want = stacked(ref, fmt::format("mlp_act.{}", l), dims.ffn);
      std::vector<float> got(want.size());
      spill.labels(rows, got.data());
      const float tol = 1e-4f * max_abs(want);
      int64_t active = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        if (std::fabs(want[i]) > tol) {
          ASSERT_EQ(got[i], want[i] > 0 ? 1.0f : 0.0f) << "mlp_act." << l << " [" << i << "]";
        }
        active += got[i] > 0;
      }
      EXPECT_GT(active, 0);
      EXPECT_LT(active, static_cast<int64_t>(want.size()));
      ++checked;
    }
  }
  // Head norms and router inputs of layers 1..L-1; for ReLU models also layer 0's inputs and every layer's MLP.
  EXPECT_EQ(checked, 2 * (dims.layers - 1) + (dims.mlp ? 1 + dims.layers : 0));
}

INSTANTIATE_TEST_SUITE_P(All, CalibCollect,
                         ::testing::Values("opt", "opt_postln_proj", "llama_mha", "llama3_gqa", "mistral_gqa",
                                           "qwen2_gqa"));

// ---- The k search.

TEST(CalibKTable, FindsTheKnownSmallestK) {
  // D = 1000 neurons scored 1000 - j (neuron j ranks j-th). Group 0's union: the first 300 ranks, so the top
  // k recalls min(k, 300) / 300. Group 1's union: ranks 0-99 and 500-509, so 100/110 until k passes 500.
  const int64_t D = 1000;
  std::vector<float> score(2 * D);
  std::vector<uint8_t> active(2 * D, 0);
  for (int64_t j = 0; j < D; ++j) score[size_t(j)] = score[size_t(D + j)] = static_cast<float>(D - j);
  for (int64_t j = 0; j < 300; ++j) active[size_t(j)] = 1;
  for (int64_t j = 0; j < 100; ++j) active[size_t(D + j)] = 1;
  for (int64_t j = 500; j < 510; ++j) active[size_t(D + j)] = 1;
  // Group 0 alone: k = 384 is the first multiple of 128 at or beyond 0.99 · 300 = 297.
  KChoice c = smallest_k(score.data(), active.data(), 1, D, 0.99, 128);
  EXPECT_EQ(c.k, 384);
  EXPECT_DOUBLE_EQ(c.recall, 1.0);
  c = smallest_k(score.data(), active.data(), 1, D, 0.5, 128);  // 128 / 300 < 0.5 <= 256 / 300
  EXPECT_EQ(c.k, 256);
  EXPECT_DOUBLE_EQ(c.recall, 256.0 / 300.0);
  // Both groups: the mean reaches 0.99 only once group 1's last ten are in, at k = 512.
  c = smallest_k(score.data(), active.data(), 2, D, 0.99, 128);
  EXPECT_EQ(c.k, 512);
  EXPECT_DOUBLE_EQ(c.recall, 1.0);
  // Target 0.95: at k = 384 the mean is (1 + 100/110) / 2 = 0.9545.
  c = smallest_k(score.data(), active.data(), 2, D, 0.95, 128);
  EXPECT_EQ(c.k, 384);
  EXPECT_DOUBLE_EQ(c.recall, (1.0 + 100.0 / 110.0) / 2);
  // The lowest-ranked neuron in the union: nothing short of all D (not a multiple of 128) recalls it.
  active[size_t(D - 1)] = 1;
  c = smallest_k(score.data(), active.data(), 1, D, 0.999, 128);
  EXPECT_EQ(c.k, D);
  EXPECT_DOUBLE_EQ(c.recall, 1.0);
  // An empty union is recalled by anything; ties in score go to the lower index.
  std::vector<uint8_t> none(size_t(D), 0);
  EXPECT_EQ(smallest_k(score.data(), none.data(), 1, D, 0.99, 128).k, 128);
  std::vector<float> flat(size_t(D), 0.0f);
  std::vector<uint8_t> tail(size_t(D), 0);
  tail[200] = 1;
  EXPECT_EQ(smallest_k(flat.data(), tail.data(), 1, D, 0.99, 128).k, 256);
  EXPECT_THAT(error_of([&] { smallest_k(score.data(), none.data(), 1, D, 1.5, 128); }), HasSubstr("no k reaches"));
}

// ---- Training.

CalibrationOptions options_in(const std::string& work, uint64_t seed = 1) {
  CalibrationOptions o;
  o.work_dir = work;
  o.seed = seed;
  o.mlp_rank = 32;  // small routers for the tiny fixtures
  o.train.epochs = 8;
  o.train.lr = 1e-3;  // a few thousand tokens: a larger step than the paper's 1e-4 over 400k
  o.data = "wikitext2_valid_tokens.txt";
  return o;
}

// OPT fixture (ReLU MLP, MHA: 3 layers, d 64, 4 heads, D 256; context 128): 6000 tokens of WikiText.
class CalibOpt : public ::testing::Test {
 protected:
  static constexpr int64_t kSeq = 128, kTokens = 6000;
  void SetUp() override {
    m_ = load("fixtures/hf/opt");
    seqs_ = text_sequences(kWikitext, kSeq, kTokens);
  }
  Loaded m_;
  std::vector<std::vector<int32_t>> seqs_;
  test::TempDir tmp_;
};

TEST_F(CalibOpt, RoutersBeatRandomSelection) {
  Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(tmp_.path("work")));
  EXPECT_FALSE(cal.collected());
  const Routers r = calibrate_all(cal);
  const SpillDims& d = cal.dims();
  const double random_recall = 2.0 / 4.0;  // K = int(0.5 · 4) of 4 heads, chosen blindly
  // Held-out text: C4, which no router saw.
  const std::vector<std::vector<int32_t>> held_out = text_sequences(kC4, kSeq, 3000);
  collect(*m_.model, held_out, tmp_.path("held_out"));
  int64_t held_out_tokens = 0;
  for (const auto& s : held_out) held_out_tokens += static_cast<int64_t>(s.size());
  std::vector<int64_t> all(static_cast<size_t>(held_out_tokens));
  std::iota(all.begin(), all.end(), 0);
  for (int64_t l = 0; l < d.layers; ++l) {
    const LayerResult& res = cal.layer(l);
    if (l == 0) {
      EXPECT_TRUE(res.attn.w.empty());
      EXPECT_TRUE(std::isnan(r.attn_recall[0]));
    } else {
      EXPECT_GT(res.attn.head_recall, random_recall + 0.15) << "layer " << l;
      EXPECT_EQ(res.attn.group_recall, res.attn.head_recall) << "MHA: a group is a head";
      EXPECT_EQ(r.attn_recall[size_t(l)], res.attn.group_recall);
      const LayerSpill spill(tmp_.path("held_out"), d, l, held_out_tokens);
      const AttentionRecall held = attention_recall(spill, all, res.attn.w, res.attn.b, 0.5);
      EXPECT_GT(held.head, random_recall + 0.1) << "layer " << l << " on held-out text";
    }
    // MLP F1 against the best blind guess (every neuron active: F1 = 2p / (1 + p), p the active share).
    const LayerSpill spill(tmp_.path("work"), d, l, cal.tokens());
    std::vector<float> labels(static_cast<size_t>(d.ffn));
    double active = 0;
    for (int64_t t = 0; t < cal.tokens(); ++t) {
      const int64_t row[] = {t};
      spill.labels(row, labels.data());
      active += std::accumulate(labels.begin(), labels.end(), 0.0);
    }
    const double p = active / double(cal.tokens() * d.ffn);
    EXPECT_GT(res.mlp.f1, 2 * p / (1 + p) + 0.05) << "layer " << l << ", " << p << " of the neurons active";
    EXPECT_GE(res.mlp.epoch, 1);
    EXPECT_LE(res.mlp.epoch, res.mlp.epochs_run);
    // The k table: a multiple of 128 or D, growing with the batch, each reaching the 99% union recall.
    ASSERT_EQ(res.k.k.size(), 9u);
    for (size_t b = 0; b < res.k.k.size(); ++b) {
      EXPECT_TRUE(res.k.k[b] % 128 == 0 || res.k.k[b] == d.ffn) << res.k.k[b];
      EXPECT_LE(res.k.k[b], d.ffn);
      EXPECT_GE(res.k.recall[b], 0.99);
      if (b > 0) {
        EXPECT_GE(res.k.k[b], res.k.k[b - 1]);
      }
    }
    EXPECT_EQ(r.mlp_k->k[size_t(l)], res.k.k);
  }
  // The router file loads for this model and tells what made it.
  save_routers(tmp_.path("r.safetensors"), r);
  const Routers back = load_routers(tmp_.path("r.safetensors"), m_.ck.config, m_.fingerprint);
  EXPECT_EQ(back.mlp_rank, 32);
  EXPECT_EQ(back.granularity, "group");
  EXPECT_THAT(back.source, HasSubstr(fmt::format("{} tokens", cal.tokens())));
  EXPECT_THAT(back.source, HasSubstr("wikitext2_valid_tokens.txt; seed 1"));
}

TEST_F(CalibOpt, SameSeedSameBytes) {
  Calibration a(*m_.model, m_.fingerprint, seqs_, options_in(tmp_.path("a")));
  Calibration b(*m_.model, m_.fingerprint, seqs_, options_in(tmp_.path("b")));
  Calibration c(*m_.model, m_.fingerprint, seqs_, options_in(tmp_.path("c"), 2));
  const std::vector<uint8_t> bytes = file_bytes(calibrate_all(a), tmp_.path("a.safetensors"));
  EXPECT_EQ(file_bytes(calibrate_all(b), tmp_.path("b.safetensors")), bytes);
  EXPECT_NE(file_bytes(calibrate_all(c), tmp_.path("c.safetensors")), bytes);
}

TEST_F(CalibOpt, InterruptedRunsResumeToTheIdenticalFile) {
  const std::vector<uint8_t> whole = [&] {
    Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(tmp_.path("whole")));
    return file_bytes(calibrate_all(cal), tmp_.path("whole.safetensors"));
  }();
  const std::string work = tmp_.path("work");
  std::vector<std::string> notes;
  CalibrationProgress progress;
  progress.note = [&](const std::string& s) { notes.push_back(s); };
  {  // killed during the collection: files cut short, the state not yet saying "collected"
    Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(work), progress);
    cal.collect();
  }
  fs::resize_file(spill_path(work, SpillKind::Inputs, 2), 1000);
  nlohmann::json state = nlohmann::json::parse(std::ifstream(work + "/state.json"));
  state["collected"] = false;
  std::ofstream(work + "/state.json") << state.dump();
  {  // restarted: collects again; killed after layer 0
    Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(work), progress);
    EXPECT_FALSE(cal.collected());
    cal.collect();
    cal.train_layer(0);
  }
  EXPECT_TRUE(notes.empty());
  {  // restarted: the collection and layer 0 are kept; killed after layer 1
    Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(work), progress);
    EXPECT_TRUE(cal.collected());
    EXPECT_TRUE(cal.trained(0));
    EXPECT_FALSE(cal.trained(1));
    cal.train_layer(1);
  }
  ASSERT_EQ(notes.size(), 2u);
  EXPECT_THAT(notes[0], HasSubstr("collection of 6000 tokens found complete"));
  EXPECT_THAT(notes[1], HasSubstr("1 of 3 layers found trained"));
  // Restarted once more: finishes, and the file is the uninterrupted run's, byte for byte.
  Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(work));
  EXPECT_TRUE(cal.trained(0) && cal.trained(1) && !cal.trained(2));
  EXPECT_EQ(file_bytes(calibrate_all(cal), tmp_.path("resumed.safetensors")), whole);
  cal.remove_work_files();
  EXPECT_FALSE(fs::exists(work));
}

TEST_F(CalibOpt, WorkDirectoryOfAnotherCalibration) {
  const std::string work = tmp_.path("work");
  {
    Calibration cal(*m_.model, m_.fingerprint, seqs_, options_in(work));
    cal.collect();
    cal.train_layer(0);
  }
  // Other training options: the collection is kept, the layers are trained again.
  CalibrationOptions other = options_in(work);
  other.train.lr = 5e-4;
  std::string note;
  CalibrationProgress progress;
  progress.note = [&](const std::string& s) { note += s; };
  {
    Calibration cal(*m_.model, m_.fingerprint, seqs_, other, progress);
    EXPECT_TRUE(cal.collected());
    EXPECT_FALSE(cal.trained(0));
    EXPECT_THAT(note, HasSubstr("training options differ from the work directory's (lr)"));
  }
  // Other tokens: refused, naming what differs.
  const std::vector<std::vector<int32_t>> fewer = text_sequences(kWikitext, kSeq, kTokens - 100);
  EXPECT_THAT(error_of([&] { Calibration(*m_.model, m_.fingerprint, fewer, other); }),
              HasSubstr("holds the collection of another calibration (token_hash, tokens differ)"));
  // A corrupt state: not JSON, or a field of the wrong type.
  nlohmann::json state = nlohmann::json::parse(std::ifstream(work + "/state.json"));
  state["collected"] = "yes";
  std::ofstream(work + "/state.json") << state.dump();
  EXPECT_THAT(error_of([&] { Calibration(*m_.model, m_.fingerprint, seqs_, other); }),
              HasSubstr("corrupt calibration state"));
  std::ofstream(work + "/state.json") << "{not json";
  EXPECT_THAT(error_of([&] { Calibration(*m_.model, m_.fingerprint, seqs_, other); }),
              HasSubstr("corrupt calibration state"));
}

TEST_F(CalibOpt, TooFewTokensOrTooLongSequences) {
  // The k table draws groups of 256 validation tokens: 5% of the tokens must reach 256.
  const std::vector<std::vector<int32_t>> few = text_sequences(kWikitext, kSeq, 5000);
  EXPECT_THAT(error_of([&] { Calibration(*m_.model, m_.fingerprint, few, options_in(tmp_.path("w"))); }),
              HasSubstr("calibrate on at least 5120 tokens"));
  const std::vector<std::vector<int32_t>> longer = text_sequences(kWikitext, 200, kTokens);
  EXPECT_THAT(error_of([&] { Calibration(*m_.model, m_.fingerprint, longer, options_in(tmp_.path("w"))); }),
              HasSubstr("exceeds the model's context of 128"));
}

// GQA (Llama-3 style, 8 query heads over 2 KV groups): the router scores query heads; sparse decoding
// max-pools them per group, and the recall recorded is that of the groups.
TEST(CalibGqa, GroupSelectionBeatsRandom) {
  Loaded m = load("fixtures/hf/llama3_gqa");
  test::TempDir tmp;
  Calibration cal(*m.model, m.fingerprint, text_sequences(kWikitext, 256, 4000), options_in(tmp.path("work")));
  const Routers r = calibrate_all(cal);
  EXPECT_FALSE(r.mlp_k.has_value());
  for (int64_t l = 1; l < cal.dims().layers; ++l) {
    const LayerResult& res = cal.layer(l);
    EXPECT_GT(res.attn.head_recall, 0.5 + 0.15) << "layer " << l;   // 4 of 8 heads at random: 0.5
    EXPECT_GT(res.attn.group_recall, 0.5 + 0.15) << "layer " << l;  // 1 of 2 groups at random: 0.5
    EXPECT_EQ(r.attn_recall[size_t(l)], res.attn.group_recall);
    EXPECT_EQ(res.mlp.rank, 0);
  }
  save_routers(tmp.path("r.safetensors"), r);
  EXPECT_EQ(load_routers(tmp.path("r.safetensors"), m.ck.config, m.fingerprint).layers[1].attn_w.shape(),
            (Shape{8, 64}));
}

// Adaptive selection (issue 19): calibration records, per layer and granularity, quantiles of the router's
// scores (and of each token's standardised scores) and the energy its best units carry; thresholds set
// from them for a target density keep about that share of the units on text calibration did not see.
TEST(CalibGqa, SelectionStatsSetThresholdsThatReachTheTargetDensity) {
  Loaded m = load("fixtures/hf/llama3_gqa");
  test::TempDir tmp;
  CalibrationOptions o = options_in(tmp.path("work"));
  o.train.epochs = 2;
  Calibration cal(*m.model, m.fingerprint, text_sequences(kWikitext, 256, 4000), o);
  const Routers r = calibrate_all(cal);
  ASSERT_TRUE(r.selection.has_value());
  const SpillDims& d = cal.dims();
  for (int64_t l = 1; l < d.layers; ++l) {
    SCOPED_TRACE(l);
    for (const auto& [u, units] : {std::pair{&r.selection->group[size_t(l)], d.kv_heads},
                                   std::pair{&r.selection->head[size_t(l)], d.heads}}) {
      ASSERT_EQ(u->coverage.size(), size_t(units + 1));
      ASSERT_EQ(u->score.size(), size_t(kSelectionQuantiles + 1));
      EXPECT_TRUE(std::is_sorted(u->score.begin(), u->score.end()) && std::is_sorted(u->z.begin(), u->z.end()));
      EXPECT_TRUE(std::is_sorted(u->coverage.begin(), u->coverage.end()));
      EXPECT_EQ(u->coverage.front(), 0.0f);
      EXPECT_NEAR(u->coverage.back(), 1.0f, 1e-5);
      EXPECT_LT(u->score.front(), u->score.back());
    }
  }
  test::TempDir files;
  save_routers(files.path("r.safetensors"), r);
  const Routers back = load_routers(files.path("r.safetensors"), m.ck.config, m.fingerprint);
  // Held-out text: the sequences after the calibration's 4000 tokens, each scored sparse after its first.
  const auto text = text_sequences(kWikitext, 256, 6000);
  auto reached = [&](RouterSparsity& s) {
    Engine e(*m.model, {.kv_tokens = 512, .sparsity = &s});
    for (size_t i = 16; i < text.size(); ++i) {
      const int64_t seq = e.add_sequence();
      (void)e.step({{seq, text[i], 1}}, false);
      e.remove_sequence(seq);
    }
    return s.density_reached().value_or(-1.0);
  };
  for (SelectionRule rule : {SelectionRule::Threshold, SelectionRule::StatTopK})
    for (double density : {0.25, 0.5, 0.75}) {
      RouterSparsity s(*m.model, back, density, Granularity::Head, TpHeads::Global, {.rule = rule});
      EXPECT_NEAR(reached(s), density, 0.1) << selection_rule_name(rule) << " at " << density;
    }
  // A threshold aims at the density itself, not at top-k's whole number of units: 0.75 of 2 KV groups is
  // 1.5 a token on average (top-k would keep 1).
  ASSERT_EQ(d.kv_heads, 2);
  RouterSparsity groups(*m.model, back, 0.75, Granularity::Group, TpHeads::Global, {.rule = SelectionRule::Threshold});
  EXPECT_NEAR(reached(groups), 0.75, 0.1);
}

// Static selection's ranking: calibration records, per layer, how often each head and each KV group was
// among the true top half by output norm (a group's norm: sqrt(Σ norm²)), and --selector static keeps the
// most frequent for every token.
TEST(CalibGqa, HeadSharesCountTheTrueTopHalfAndStaticSelectionKeepsTheMostFrequent) {
  Loaded m = load("fixtures/hf/llama3_gqa");
  test::TempDir tmp;
  CalibrationOptions o = options_in(tmp.path("work"));
  o.train.epochs = 1;  // the shares do not depend on training
  Calibration cal(*m.model, m.fingerprint, text_sequences(kWikitext, 256, 4000), o);
  const Routers r = calibrate_all(cal);
  ASSERT_TRUE(has_head_shares(r));
  const SpillDims& d = cal.dims();
  const int64_t H = d.heads, G = d.kv_heads, n = cal.tokens();
  // The k best of v (ties to the lower index), ascending.
  auto best = [](const std::vector<double>& v, int64_t k) {
    std::vector<int32_t> order(v.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return v[size_t(a)] > v[size_t(b)]; });
    order.resize(size_t(k));
    std::sort(order.begin(), order.end());
    return order;
  };
  save_routers(tmp.path("r.safetensors"), r);
  const Routers back = load_routers(tmp.path("r.safetensors"), m.ck.config, m.fingerprint);
  StaticSparsity heads(*m.model, back, 0.5, "r.safetensors", Granularity::Head);
  StaticSparsity groups(*m.model, back, 0.5, "r.safetensors", Granularity::Group);
  for (int64_t l = 1; l < d.layers; ++l) {
    const LayerSpill spill(tmp.path("work"), d, l, n);
    std::vector<double> head_count(size_t(H), 0), group_count(size_t(G), 0);
    for (int64_t t = 0; t < n; ++t) {
      std::vector<double> norm(spill.norms(t), spill.norms(t) + H), group_norm(size_t(G), 0);
      for (int64_t h = 0; h < H; ++h) group_norm[size_t(h / (H / G))] += norm[size_t(h)] * norm[size_t(h)];
      for (int32_t h : best(norm, H / 2)) ++head_count[size_t(h)];
      for (int32_t g : best(group_norm, std::max<int64_t>(1, G / 2))) ++group_count[size_t(g)];
    }
    for (int64_t h = 0; h < H; ++h)
      EXPECT_FLOAT_EQ(back.layers[size_t(l)].head_share.data<float>()[h], float(head_count[size_t(h)] / double(n)))
          << "layer " << l << " head " << h;
    for (int64_t g = 0; g < G; ++g)
      EXPECT_FLOAT_EQ(back.layers[size_t(l)].group_share.data<float>()[g], float(group_count[size_t(g)] / double(n)))
          << "layer " << l << " group " << g;
    // Static selection: the count's top-k, the same for every token.
    EXPECT_EQ(heads.kept_units(int(l)), best(head_count, 4)) << "layer " << l;
    EXPECT_EQ(groups.kept_units(int(l)), best(group_count, 1)) << "layer " << l;
    Tensor x = Tensor::zeros(DType::F32, {3, d.hidden});
    const Tensor idx = heads.attention_heads(int(l), x);
    for (int64_t t = 0; t < 3; ++t)
      EXPECT_EQ(std::vector<int32_t>(idx.data<int32_t>() + t * 4, idx.data<int32_t>() + (t + 1) * 4),
                best(head_count, 4));
  }
}

TEST(CalibTrain, RecallPoolsGroups) {
  // Two tokens, 4 heads in 2 groups of 2, the top half kept (2 heads, 1 group).
  const float score[] = {4, 0, 0, 3, /**/ 5, 0, 0, 1};
  const float norm[] = {0, 5, 4, 0, /**/ 3, 3, 0, 4};
  // Per head: token 0 keeps {0, 3} against {1, 2}: 0; token 1 keeps {0, 3} against {3, 0} (a tie with
  // head 1 goes to the lower index): 1.
  EXPECT_DOUBLE_EQ(topk_recall(score, norm, 2, 4, 1, 0.5), 0.5);
  // Per group, scores max-pooled and norms as the group output's L2 norm: token 0 group 0 (4 > 3) against
  // group 0 (5 > 4); token 1 group 0 against group 0 (sqrt(18) > 4, though max-pooled norms would pick 1).
  EXPECT_DOUBLE_EQ(topk_recall(score, norm, 2, 4, 2, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(topk_recall(score, norm, 2, 4, 1, 1.0), 1.0);
  // Split: 95/5, disjoint, covering every token, a function of the seed.
  const Split s = split_tokens(1000, 3);
  EXPECT_EQ(s.val.size(), 50u);
  EXPECT_EQ(s.train.size(), 950u);
  std::vector<int64_t> all = s.train;
  all.insert(all.end(), s.val.begin(), s.val.end());
  std::sort(all.begin(), all.end());
  for (int64_t i = 0; i < 1000; ++i) EXPECT_EQ(all[size_t(i)], i);
  EXPECT_EQ(split_tokens(1000, 3).val, s.val);
  EXPECT_NE(split_tokens(1000, 4).val, s.val);
}

// ---- The command.

class CalibCli : public ::testing::Test {
 protected:
  std::vector<std::string> args(const std::string& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"calibrate", "--model", shared_path(kStories), "--text", shared_path(kWikitext),
                                  "--out",     out,        "--tokens", "3000", "--seq", "256", "--epochs", "2"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  test::TempDir tmp_;
};

TEST_F(CalibCli, WritesRoutersAndResumes) {
  const std::string out = tmp_.path("s.routers.safetensors");
  test::RunResult r = test::run_polar(args(out, {"--json", "--keep-work"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens"], 3000);
  ASSERT_EQ(j["layers"].size(), 5u);
  EXPECT_TRUE(j["layers"][0]["attention"].is_null());
  for (int l = 1; l < 5; ++l) EXPECT_GT(j["layers"][l]["attention"]["group_recall"].get<double>(), 0.5) << l;
  EXPECT_THAT(r.err, HasSubstr("collected 3000/3000 tokens"));
  const Checkpoint ck = load_checkpoint(shared_path(kStories));
  EXPECT_EQ(load_routers(out, ck.config, model_fingerprint(ck)).layers.size(), 5u);
  const std::vector<uint8_t> first = test::read_bytes(out);
  // Interrupted after layer 2 (layers 3 and 4 lost): resumed, the same bytes; the work directory goes.
  fs::remove(out + ".work/layer.3.safetensors");
  fs::remove(out + ".work/layer.4.safetensors");
  r = test::run_polar(args(out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("not collected again"));
  EXPECT_THAT(r.err, HasSubstr("3 of 5 layers found trained"));
  EXPECT_THAT(r.out, HasSubstr("head recall"));
  EXPECT_EQ(test::read_bytes(out), first);
  EXPECT_FALSE(fs::exists(out + ".work"));
}

struct BadCalibration {
  std::string name;
  std::vector<std::string> extra;  // option, value, ...: replacing or adding to the good arguments
  std::string expect;
};

// Test names, not bytes, in gtest's output.
void PrintTo(const BadCalibration& b, std::ostream* os) { *os << b.name; }

class CalibBadInput : public ::testing::TestWithParam<BadCalibration> {};

TEST_P(CalibBadInput, ExitsWithOneAndSaysWhy) {
  test::TempDir tmp;
  write_text(tmp.path("empty.txt"), "");
  std::map<std::string, std::string> options = {{"--model", shared_path(kStories)},
                                                {"--text", shared_path(kWikitext)},
                                                {"--out", tmp.path("r.safetensors")},
                                                {"--tokens", "3000"}};
  for (size_t i = 0; i + 1 < GetParam().extra.size(); i += 2) {
    std::string value = GetParam().extra[i + 1];
    if (auto p = value.find("{tmp}"); p != std::string::npos) value.replace(p, 5, tmp.path(""));
    options[GetParam().extra[i]] = value;
  }
  std::vector<std::string> args = {"calibrate"};
  for (const auto& [option, value] : options) args.insert(args.end(), {option, value});
  const test::RunResult r = test::run_polar(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("error: ")) << r.err;
  EXPECT_THAT(r.err, HasSubstr(GetParam().expect)) << r.err;
  EXPECT_FALSE(fs::exists(tmp.path("r.safetensors")));
}

INSTANTIATE_TEST_SUITE_P(
    All, CalibBadInput,
    ::testing::Values(
        BadCalibration{"MissingText", {"--text", "{tmp}missing.txt"}, "missing.txt: no such file"},
        BadCalibration{"EmptyText", {"--text", "{tmp}empty.txt"}, "holds no tokens"},
        BadCalibration{"ZeroTokens", {"--tokens", "0"}, "--tokens must be at least 1"},
        BadCalibration{"UnwritableOut", {"--out", "{tmp}no/such/dir/r.safetensors"}, "cannot write --out"},
        BadCalibration{"OutIsADirectory", {"--out", "{tmp}"}, "is a directory"},
        BadCalibration{"SequenceBeyondContext", {"--seq", "1000"}, "--seq 1000 exceeds the model's context of 512"}),
    [](const auto& info) { return info.param.name; });

}  // namespace
