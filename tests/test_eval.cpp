// Zero-shot evaluation: task files read per ../shared/data/README.md with errors naming FILE:LINE, the
// tokenization boundary rule, scores equal to a direct computation from Engine::step logits and unchanged by
// batching, the accuracy rules (ties, acc_norm per byte, greedy continuations), the statistics, and
// `polar eval` end to end. The model is stories260K (a real tiny Llama with an SPM tokenizer).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "eval/eval.h"
#include "io/checkpoint.h"
#include "runtime/engine.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;

namespace {

const std::string kGgufRel = "models/stories260K/stories260K.gguf";
// The start of stories260K's greedy continuation of "Once upon a time" (REFERENCE.md).
const std::string kStory = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";

struct Stories {
  Checkpoint ck;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  const Tokenizer& tok() const { return *ck.tokenizer; }
};

Stories& stories() {
  static Stories s = [] {
    Stories m;
    m.ck = load_checkpoint(test::shared_path(kGgufRel));
    m.backend = make_cpu_backend();
    m.model = make_model(m.ck, *m.backend);
    return m;
  }();
  return s;
}

std::string write_lines(const test::TempDir& dir, const std::string& name, const std::vector<std::string>& lines) {
  const std::string path = dir.path(name);
  std::ofstream f(path, std::ios::binary);
  for (const std::string& l : lines) f << l << '\n';
  return path;
}

// A multiple-choice line.
std::string mc(const std::string& query, const std::vector<std::string>& choices, int gold) {
  return nlohmann::json{{"query", query}, {"choices", choices}, {"gold", gold}}.dump();
}

using test::error_of;

// ---- Statistics.

TEST(EvalStats, MeanWithSeOfKnownNumbers) {
  const std::vector<double> x = {0, 1, 1, 1};  // mean 0.75, sample sd 0.5, se 0.5 / 2
  const Estimate e = mean_with_se(x);
  EXPECT_DOUBLE_EQ(e.mean, 0.75);
  EXPECT_NEAR(e.se, 0.25, 1e-15);
  EXPECT_EQ(e.n, 4);
  const std::vector<double> one = {3};
  EXPECT_DOUBLE_EQ(mean_with_se(one).mean, 3);
  EXPECT_TRUE(std::isnan(mean_with_se(one).se));
  EXPECT_THAT(error_of([] { mean_with_se(std::vector<double>{}); }), HasSubstr("no values"));
}

TEST(EvalStats, PairedDifferenceOfKnownNumbers) {
  // d = {1, 3, 5}: mean 3, sample sd 2, se 2 / sqrt(3).
  const std::vector<double> a = {2, 4, 6}, b = {1, 1, 1};
  Estimate d = paired_difference(a, b);
  EXPECT_DOUBLE_EQ(d.mean, 3);
  EXPECT_NEAR(d.se, 2 / std::sqrt(3.0), 1e-12);
  EXPECT_EQ(d.n, 3);
  // Correctness at two densities: d = {1, 0, 0, 1, 0}, mean 0.4, sample variance 0.3, se sqrt(0.3 / 5).
  const std::vector<double> dense = {1, 0, 1, 1, 0}, sparse = {0, 0, 1, 0, 0};
  d = paired_difference(dense, sparse);
  EXPECT_DOUBLE_EQ(d.mean, 0.4);
  EXPECT_NEAR(d.se, std::sqrt(0.06), 1e-12);
  // Two runs that agree on every item differ by exactly 0 ± 0, however the items vary.
  d = paired_difference(dense, dense);
  EXPECT_EQ(d.mean, 0);
  EXPECT_EQ(d.se, 0);
  EXPECT_THAT(error_of([&] { paired_difference(dense, b); }), HasSubstr("same items"));
}

TEST(EvalStats, ArgmaxTiesGoToTheLowestIndex) {
  EXPECT_EQ(argmax_first(std::vector<double>{1, 3, 3, 2}), 1);
  EXPECT_EQ(argmax_first(std::vector<double>{-5, -5}), 0);
  EXPECT_EQ(argmax_first(std::vector<double>{-INFINITY, -1}), 1);
  EXPECT_THAT(error_of([] { argmax_first(std::vector<double>{}); }), HasSubstr("no values"));
}

// ---- Task files.

TEST(EvalTasks, ReadsEveryFormat) {
  test::TempDir dir;
  Task t = load_task(write_lines(dir, "mc.jsonl", {mc("Q?", {"yes", "no"}, 1), "", mc("R", {"a", "b", "c"}, 0)}));
  EXPECT_EQ(t.name, "mc");
  EXPECT_EQ(t.format, TaskFormat::kMultipleChoice);
  ASSERT_EQ(t.items.size(), 2u);
  EXPECT_EQ(t.items[0].line, 1);
  EXPECT_EQ(t.items[1].line, 3);  // blank lines are not items but still count as lines
  EXPECT_EQ(t.items[0].gold, 1);
  ASSERT_EQ(t.items[0].candidates.size(), 2u);
  EXPECT_EQ(t.items[0].candidates[1].context, "Q?");
  EXPECT_EQ(t.items[0].candidates[1].continuation, " no");

  t = load_task(write_lines(dir, "wino.jsonl",
                            {R"({"context_options": ["A so A", "A so B"], "continuation": "won.", "gold": 1})"}));
  EXPECT_EQ(t.format, TaskFormat::kSchema);
  ASSERT_EQ(t.items[0].candidates.size(), 2u);
  EXPECT_EQ(t.items[0].candidates[1].context, "A so B");
  EXPECT_EQ(t.items[0].candidates[0].continuation, " won.");
  EXPECT_EQ(t.items[0].gold, 1);

  t = load_task(write_lines(dir, "lm.jsonl", {R"({"context": "He said", "continuation": "hello"})"}));
  EXPECT_EQ(t.format, TaskFormat::kLanguageModel);
  ASSERT_EQ(t.items[0].candidates.size(), 1u);
  EXPECT_EQ(t.items[0].candidates[0].continuation, " hello");

  t = load_task(write_lines(dir, "rte.jsonl",
                            {R"({"premise": "P.", "hypothesis": "H.", "label": "not_entailment", "idx": 0})",
                             R"({"premise": "P.", "hypothesis": "H.", "label": "entailment", "idx": 1})"}));
  EXPECT_EQ(t.format, TaskFormat::kRte);
  ASSERT_EQ(t.items[0].candidates.size(), 2u);
  EXPECT_EQ(t.items[0].candidates[0].context, "P.\nQuestion: H. True or False?\nAnswer:");
  EXPECT_EQ(t.items[0].candidates[0].continuation, " True");
  EXPECT_EQ(t.items[0].candidates[1].continuation, " False");
  EXPECT_EQ(t.items[0].gold, 1);
  EXPECT_EQ(t.items[1].gold, 0);
}

TEST(EvalTasks, SharedTaskFilesAreDetected) {
  const std::vector<std::pair<std::string, TaskFormat>> files = {
      {"piqa", TaskFormat::kMultipleChoice},       {"copa", TaskFormat::kMultipleChoice},
      {"arc_easy", TaskFormat::kMultipleChoice},   {"openbook_qa", TaskFormat::kMultipleChoice},
      {"boolq", TaskFormat::kMultipleChoice},      {"winogrande", TaskFormat::kSchema},
      {"lambada_openai", TaskFormat::kLanguageModel}, {"rte", TaskFormat::kRte}};
  for (const auto& [name, format] : files) {
    const Task t = load_task(test::shared_path("data/eval/" + name + ".jsonl"), {.limit = 7});
    EXPECT_EQ(t.format, format) << name;
    EXPECT_EQ(t.items.size(), 7u) << name;
    EXPECT_EQ(t.skipped, 0) << name;
  }
}

TEST(EvalTasks, LimitTakesTheFirstItemsAndReadsNoFurther) {
  test::TempDir dir;
  const std::string path = write_lines(dir, "t.jsonl", {mc("a", {"x", "y"}, 0), mc("b", {"x", "y"}, 1), "{broken"});
  const Task t = load_task(path, {.limit = 2});
  ASSERT_EQ(t.items.size(), 2u);
  EXPECT_EQ(t.items[1].gold, 1);
  EXPECT_THAT(error_of([&] { load_task(path); }), HasSubstr(path + ":3: invalid JSON"));
}

// Each bad line sits at line 3 of a multiple-choice file, between valid items.
TEST(EvalBadInput, MalformedLinesNameFileAndLine) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"query": "q", "choices": ["a", "b"], "gold": 2})", "gold 2 is out of range for 2 candidates"},
      {R"({"query": "q", "choices": ["a", "b"], "gold": -1})", "gold -1 is out of range"},
      {R"({"query": "q", "choices": ["a", "b"]})", "missing field 'gold'"},
      {R"({"query": "q", "choices": "ab", "gold": 0})", "field 'choices' must be an array of strings, got string"},
      {R"({"query": "q", "choices": ["a", 3], "gold": 0})", "element 1 is number"},
      {R"({"query": 5, "choices": ["a"], "gold": 0})", "field 'query' must be a string, got number"},
      {R"({"query": "q", "choices": ["a", "b"], "gold": "1"})", "field 'gold' must be an integer, got \"1\""},
      {R"({"query": "q", "choices": ["a", "b"], "gold": 1.0})", "field 'gold' must be an integer"},
      {R"({"query": "q", "choices": [], "gold": 0})", "field 'choices' is empty"},
      {R"({"query": "q", "choices": ["a"], "gold": 0)", "invalid JSON"},
      {"{\"query\": \"\xff\", \"choices\": [\"a\"], \"gold\": 0}", "invalid JSON"},
      {"[1, 2]", "expected a JSON object, got array"},
      {R"({"context": "c", "continuation": "x"})", "missing field 'query'"},  // a line of another format
  };
  test::TempDir dir;
  for (const auto& [bad, expected] : cases) {
    const std::string path = write_lines(dir, "bad.jsonl", {mc("a", {"x", "y"}, 0), "", bad, mc("b", {"x", "y"}, 1)});
    const std::string e = error_of([&] { load_task(path); });
    EXPECT_THAT(e, HasSubstr(path + ":3: ")) << bad;
    EXPECT_THAT(e, HasSubstr(expected)) << bad;
    std::vector<std::string> warnings;
    const Task t = load_task(path, {.skip_bad = true, .warn = [&](const std::string& w) { warnings.push_back(w); }});
    EXPECT_EQ(t.items.size(), 2u) << bad;
    EXPECT_EQ(t.skipped, 1) << bad;
    ASSERT_EQ(warnings.size(), 1u) << bad;
    EXPECT_THAT(warnings[0], HasSubstr(path + ":3: ")) << bad;
    EXPECT_THAT(warnings[0], HasSubstr(expected)) << bad;
    EXPECT_THAT(warnings[0], HasSubstr("(skipped)"));
  }
}

// A million nested arrays in one 2 MB line: refused while parsing (quoting the bad 'gold' in the error would
// recurse a million deep and overflow the stack).
TEST(EvalBadInput, DeeplyNestedJsonIsRefusedNotACrash) {
  test::TempDir dir;
  const std::string nested = std::string(1'000'000, '[') + std::string(1'000'000, ']');
  const std::string path = write_lines(dir, "deep.jsonl", {R"({"query": "q", "choices": ["a"], "gold": )" + nested + "}"});
  EXPECT_THAT(error_of([&] { load_task(path); }), HasSubstr(path + ":1: invalid JSON: parse error: nested deeper than 128"));
}

TEST(EvalBadInput, FilesWithoutValidItems) {
  test::TempDir dir;
  std::string path = write_lines(dir, "unknown.jsonl", {R"({"foo": 1, "bar": 2})"});
  EXPECT_THAT(error_of([&] { load_task(path); }), HasSubstr(path + ":1: no task format has the fields [\"bar\", \"foo\"]"));
  // The format comes from the first valid line: a bad first line skipped, the next one decides.
  path = write_lines(dir, "first_bad.jsonl", {"not json", R"({"context": "c", "continuation": "x"})"});
  EXPECT_EQ(load_task(path, {.skip_bad = true}).format, TaskFormat::kLanguageModel);
  path = write_lines(dir, "all_bad.jsonl", {"not json", "[]", ""});
  EXPECT_THAT(error_of([&] { load_task(path, {.skip_bad = true}); }),
              HasSubstr(path + ": no valid items (2 malformed lines skipped)"));
  path = write_lines(dir, "empty.jsonl", {});
  EXPECT_THAT(error_of([&] { load_task(path); }), HasSubstr(path + ": no valid items"));
  EXPECT_THAT(error_of([&] { load_task(dir.path("missing.jsonl")); }), HasSubstr("cannot read task file"));
  path = write_lines(dir, "rte.jsonl", {R"({"premise": "P", "hypothesis": "H", "label": "maybe"})"});
  EXPECT_THAT(error_of([&] { load_task(path); }),
              HasSubstr(path + ":1: field 'label' must be \"entailment\" or \"not_entailment\", got \"maybe\""));
  path = write_lines(dir, "wino.jsonl", {R"({"context_options": ["a", "b"], "continuation": "c", "gold": 2})"});
  EXPECT_THAT(error_of([&] { load_task(path); }), HasSubstr(path + ":1: gold 2 is out of range"));
}

// ---- Requests: the tokenization boundary.

TEST(EvalScoring, RequestIsTheWholeTextSplitAfterTheContextTokens) {
  const Tokenizer& tok = stories().tok();
  const ScoreRequest r = make_request(tok, "Once upon a time", " there was", 512);
  EXPECT_EQ(r.tokens, tok.encode("Once upon a time there was", true));
  const std::vector<int32_t> ctx = tok.encode("Once upon a time", true);
  EXPECT_EQ(r.context_len, static_cast<int64_t>(ctx.size()));
  EXPECT_TRUE(std::equal(ctx.begin(), ctx.end(), r.tokens.begin()));
  EXPECT_EQ(r.tokens[0], tok.bos_id());
  EXPECT_EQ(r.truncated, 0);

  // A context ending in a space: its last token (SPM "▁") is not a prefix of the whole text's tokens, whose
  // " there" carries the space; the split falls before it and the whole word is scored.
  const ScoreRequest s = make_request(tok, "Once upon a time ", "there", 512);
  EXPECT_EQ(s.tokens, tok.encode("Once upon a time there", true));
  EXPECT_EQ(s.context_len, static_cast<int64_t>(tok.encode("Once upon a time ", true).size()) - 1);
  std::string scored;
  for (size_t i = s.context_len; i < s.tokens.size(); ++i) scored += tok.token_bytes(s.tokens[i]);
  EXPECT_EQ(scored, " there");

  // An empty context conditions on BOS alone.
  const ScoreRequest e = make_request(tok, "", " Lily", 512);
  EXPECT_EQ(e.context_len, 1);
  EXPECT_EQ(e.tokens[0], tok.bos_id());
}

TEST(EvalScoring, LongContextsAreCutFromTheLeftAfterBos) {
  const Tokenizer& tok = stories().tok();
  std::string context;
  while (tok.encode(context, true).size() < 700) context += kStory + " ";
  context += "Lily was";
  const std::vector<int32_t> whole = tok.encode(context + " happy", true);
  const ScoreRequest r = make_request(tok, context, " happy", 512);
  ASSERT_EQ(r.tokens.size(), 512u);
  EXPECT_EQ(r.truncated, static_cast<int64_t>(whole.size()) - 512);
  EXPECT_EQ(r.tokens[0], tok.bos_id());
  EXPECT_TRUE(std::equal(r.tokens.begin() + 1, r.tokens.end(), whole.end() - 511));
  EXPECT_EQ(static_cast<int64_t>(r.tokens.size()) - r.context_len,
            static_cast<int64_t>(whole.size() - tok.encode(context, true).size()));
}

TEST(EvalBadInput, RequestsTheModelCannotScore) {
  const Tokenizer& tok = stories().tok();
  std::string long_text;
  while (tok.encode(long_text, false).size() < 520) long_text += " " + kStory;
  EXPECT_THAT(error_of([&] { make_request(tok, "Once", long_text, 512); }),
              HasSubstr("does not fit the model's context of 512 tokens"));
  EXPECT_THAT(error_of([&] { make_request(tok, "Once", "", 512); }), HasSubstr("adds no tokens"));
  // Requests built by hand are checked too.
  ScoreRequest bad{.tokens = {1, 403, 407}, .context_len = 3};
  EXPECT_THAT(error_of([&] { score(*stories().model, {bad}, {}); }), HasSubstr("request 0: context length 3"));
  bad.context_len = 0;
  EXPECT_THAT(error_of([&] { score(*stories().model, {bad}, {}); }), HasSubstr("must be at least 1"));
  EXPECT_THAT(error_of([&] { score(*stories().model, {}, {.batch = 0}); }), HasSubstr("batch must be at least 1"));
}

// ---- Scores.

std::vector<ScoreRequest> some_requests() {
  const Tokenizer& tok = stories().tok();
  std::vector<ScoreRequest> rs;
  for (const auto& [c, k] : std::vector<std::pair<std::string, std::string>>{
           {"Once upon a time,", " there was a little girl"},
           {"Once", " upon"},
           {"Lily saw a big, red", " ball. She wanted to play with it."},
           {"", " Lily"},
           {"The cat sat on the", " zqxv"},
           {kStory, " One day, she saw a bird."},
           {"Der Bär sagt:", " Grüße, ☃ 日本語"}})
    rs.push_back(make_request(tok, c, k, 512));
  return rs;
}

TEST(EvalScoring, EqualsADirectComputationFromStepLogits) {
  Model& model = *stories().model;
  const int64_t vocab = model.config().vocab_size;
  const std::vector<ScoreRequest> rs = some_requests();
  const std::vector<Score> scores = score(model, rs, {.batch = 1});
  ASSERT_EQ(scores.size(), rs.size());
  for (size_t i = 0; i < rs.size(); ++i) {
    // The same pass as scoring runs (every token but the last, rows from the last context token on: the same
    // GEMM shapes, so the same rounding); the log-probabilities computed here independently, in double.
    Engine engine(model, {.kv_tokens = 1024});
    const std::span<const int32_t> fed(rs[i].tokens.data(), rs[i].tokens.size() - 1);
    const Tensor logits =
        engine.step({{engine.add_sequence(), fed, std::nullopt, rs[i].context_len - 1}}, /*all_logits=*/true);
    double sum = 0;
    bool greedy = true;
    for (size_t t = rs[i].context_len; t < rs[i].tokens.size(); ++t) {
      const float* row = logits.data<float>() + (t - rs[i].context_len) * vocab;
      double z = 0;
      for (int64_t v = 0; v < vocab; ++v) z += std::exp(static_cast<double>(row[v]));
      sum += row[rs[i].tokens[t]] - std::log(z);
      greedy = greedy && std::max_element(row, row + vocab) - row == rs[i].tokens[t];
    }
    EXPECT_NEAR(scores[i].logprob, sum, 1e-9) << i;
    EXPECT_LT(scores[i].logprob, 0) << i;
    EXPECT_EQ(scores[i].greedy, greedy) << i;
    EXPECT_EQ(scores[i].tokens, static_cast<int64_t>(rs[i].tokens.size()) - rs[i].context_len) << i;
  }
}

TEST(EvalScoring, BatchedEqualsEachRequestAlone) {
  Model& model = *stories().model;
  const std::vector<ScoreRequest> rs = some_requests();
  const std::vector<Score> alone = score(model, rs, {.batch = 1});
  std::vector<int64_t> progress;
  const std::vector<Score> batched = score(model, rs, {.batch = 3}, [&](int64_t done, int64_t total) {
    EXPECT_EQ(total, static_cast<int64_t>(rs.size()));
    progress.push_back(done);
  });
  EXPECT_EQ(progress, (std::vector<int64_t>{3, 6, 7}));
  // A logits budget below one row: every pass takes a single request (a request alone always runs).
  const std::vector<Score> budgeted = score(model, rs, {.batch = 64, .max_logit_bytes = 1});
  for (const std::vector<Score>* other : {&batched, &budgeted}) {
    ASSERT_EQ(other->size(), rs.size());
    for (size_t i = 0; i < rs.size(); ++i) {
      // Sums of fp32 log-probabilities whose batched and unbatched GEMMs round differently: relative.
      EXPECT_NEAR((*other)[i].logprob, alone[i].logprob, test::scaled_tol(1e-5, alone[i].logprob)) << i;
      EXPECT_EQ((*other)[i].greedy, alone[i].greedy) << i;
      EXPECT_EQ((*other)[i].tokens, alone[i].tokens) << i;
    }
  }
}

// ---- Tasks judged end to end.

TaskResult run(const std::string& path, int64_t batch = 16) {
  Stories& s = stories();
  return evaluate(*s.model, s.tok(), load_task(path), {.scoring = {.batch = batch}});
}

TEST(EvalTask, TheLikelyContinuationBeatsGarbage) {
  test::TempDir dir;
  const std::string query = "Once upon a time, there was a little girl named";
  const TaskResult r = run(write_lines(dir, "t.jsonl", {mc(query, {"Lily.", "xq zzv kjw qqp."}, 0),
                                                         mc(query, {"xq zzv kjw qqp.", "Lily."}, 0)}));
  ASSERT_EQ(r.items.size(), 2u);
  EXPECT_GT(r.items[0].scores[0].logprob, r.items[0].scores[1].logprob + 5);
  EXPECT_TRUE(r.items[0].correct);
  EXPECT_TRUE(r.items[0].correct_norm);
  EXPECT_FALSE(r.items[1].correct);  // gold names the garbage
  EXPECT_FALSE(r.items[1].correct_norm);
  EXPECT_DOUBLE_EQ(r.acc.mean, 0.5);
  EXPECT_NEAR(r.acc.se, 0.5, 1e-12);  // {1, 0}: sample sd 0.707, over sqrt(2)
  ASSERT_TRUE(r.acc_norm.has_value());
  EXPECT_EQ(r.items[1].line, 2);
  EXPECT_FALSE(r.perplexity.has_value());
  EXPECT_DOUBLE_EQ(r.density, 1.0);
}

TEST(EvalTask, TiesGoToTheFirstChoice) {
  test::TempDir dir;
  // Batch 1: each candidate alone, so identical choices get bit-identical scores.
  const TaskResult r =
      run(write_lines(dir, "t.jsonl", {mc("Lily saw a", {"dog.", "dog."}, 0), mc("Lily saw a", {"dog.", "dog."}, 1)}), 1);
  EXPECT_EQ(r.items[0].scores[0].logprob, r.items[0].scores[1].logprob);
  EXPECT_TRUE(r.items[0].correct);
  EXPECT_TRUE(r.items[0].correct_norm);
  EXPECT_FALSE(r.items[1].correct);
  EXPECT_FALSE(r.items[1].correct_norm);
}

TEST(EvalTask, EmptyLongAndUnicodeChoices) {
  test::TempDir dir;
  std::string long_choice;
  for (int i = 0; i < 4; ++i) long_choice += kStory + " ";
  const std::string unicode = "Grüße, ☃ 日本語のテキスト";
  const TaskResult r = run(write_lines(dir, "t.jsonl", {mc("Once upon a time,", {"", long_choice, unicode}, 1)}));
  const std::vector<Score>& s = r.items[0].scores;
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0].tokens, 1);  // the empty choice scores its delimiter " "
  EXPECT_GT(s[1].tokens, 100);
  for (const Score& x : s) EXPECT_TRUE(std::isfinite(x.logprob) && x.logprob < 0);
  // acc by the sum prefers the short; acc_norm divides by UTF-8 bytes of " " + choice.
  const std::vector<double> per_byte = {s[0].logprob / 1, s[1].logprob / (1 + long_choice.size()),
                                        s[2].logprob / (1 + unicode.size())};
  EXPECT_EQ(unicode.size(), 37u);
  EXPECT_EQ(r.items[0].correct, argmax_first(std::vector<double>{s[0].logprob, s[1].logprob, s[2].logprob}) == 1);
  EXPECT_EQ(r.items[0].correct_norm, argmax_first(per_byte) == 1);
  EXPECT_FALSE(r.items[0].correct);
}

TEST(EvalTask, GreedyLanguageModelling) {
  test::TempDir dir;
  const TaskResult r = run(write_lines(
      dir, "lm.jsonl",
      {R"({"context": "Once upon a time,", "continuation": "there was a little girl named Lily."})",
       R"({"context": "Once upon a time,", "continuation": "there was a little dog named Max."})"}));
  EXPECT_EQ(r.format, TaskFormat::kLanguageModel);
  EXPECT_TRUE(r.items[0].correct);  // stories260K's own greedy text
  EXPECT_FALSE(r.items[1].correct);
  EXPECT_DOUBLE_EQ(r.acc.mean, 0.5);
  EXPECT_FALSE(r.acc_norm.has_value());
  ASSERT_TRUE(r.perplexity.has_value());
  EXPECT_NEAR(*r.perplexity, std::exp(-(r.items[0].scores[0].logprob + r.items[1].scores[0].logprob) / 2), 1e-9);
  EXPECT_THAT(error_of([&] { item_values(r, Metric::kAccNorm); }), HasSubstr("acc_norm is not defined"));
}

TEST(EvalTask, SchemaAndRteScoreEveryCandidate) {
  test::TempDir dir;
  TaskResult r = run(write_lines(
      dir, "wino.jsonl",
      {R"({"context_options": ["Lily saw a big, red ball. She", "Lily saw a big, red ball. Qzx"], "continuation": "wanted to play with it.", "gold": 0})"}));
  ASSERT_EQ(r.items[0].scores.size(), 2u);
  EXPECT_EQ(r.items[0].correct, r.items[0].scores[0].logprob > r.items[0].scores[1].logprob);
  EXPECT_TRUE(r.items[0].correct);
  EXPECT_FALSE(r.acc_norm.has_value());
  r = run(write_lines(dir, "rte.jsonl",
                      {R"({"premise": "Lily has a dog.", "hypothesis": "Lily has a pet.", "label": "entailment"})",
                       R"({"premise": "Lily has a dog.", "hypothesis": "Lily has a pet.", "label": "not_entailment"})"}));
  ASSERT_EQ(r.items.size(), 2u);
  // Same prompt, opposite labels: exactly one of the two is right.
  EXPECT_NE(r.items[0].correct, r.items[1].correct);
  EXPECT_DOUBLE_EQ(r.acc.mean, 0.5);
}

TEST(EvalBadInput, UnscorableItemsNameFileAndLineOrAreSkipped) {
  test::TempDir dir;
  std::string too_long;
  while (stories().tok().encode(too_long, false).size() < 520) too_long += kStory + " ";
  const std::string path =
      write_lines(dir, "t.jsonl", {mc("Once", {"upon", "a"}, 0), mc("Once", {"upon", too_long}, 0), mc("Lily", {"saw"}, 0)});
  EXPECT_THAT(error_of([&] { run(path); }), HasSubstr(path + ":2: the continuation is"));
  Stories& s = stories();
  std::vector<std::string> warnings;
  const TaskResult r = evaluate(*s.model, s.tok(), load_task(path),
                                {.skip_bad = true, .warn = [&](const std::string& w) { warnings.push_back(w); }});
  ASSERT_EQ(r.items.size(), 2u);  // the whole item goes, not just its long candidate
  EXPECT_EQ(r.items[1].line, 3);
  EXPECT_EQ(r.skipped, 1);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_THAT(warnings[0], HasSubstr(path + ":2: "));
}

// ---- polar eval.

TEST(EvalCli, TableJsonAndPlot) {
  test::TempDir dir;
  const std::string mc_path = write_lines(
      dir, "stories_mc.jsonl",
      {mc("Once upon a time, there was a little girl named", {"Lily.", "xq zzv."}, 0), mc("Lily saw a", {"dog.", "qq."}, 0),
       mc("She loved to", {"play.", "kjw."}, 1)});
  const std::string lm_path =
      write_lines(dir, "stories_lm.jsonl", {R"({"context": "Once upon a time,", "continuation": "there was"})"});
  const std::string model = test::shared_path(kGgufRel);
  test::RunResult r = test::run_polar({"eval", "--model", model, "--task", mc_path, "--task", lm_path});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("stories_mc"));
  EXPECT_THAT(r.out, HasSubstr("multiple_choice"));
  EXPECT_THAT(r.out, HasSubstr("stories_lm"));
  EXPECT_THAT(r.out, HasSubstr("language_modeling"));
  EXPECT_THAT(r.err, HasSubstr("scored 6/6 requests"));

  r = test::run_polar({"eval", "--model", model, "--task", mc_path, "--task", lm_path, "--json", "--limit", "2",
                       "--batch", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["tasks"].size(), 2u);
  const nlohmann::json& t = j["tasks"][0];
  EXPECT_EQ(t["task"], "stories_mc");
  EXPECT_EQ(t["format"], "multiple_choice");
  EXPECT_EQ(t["n"], 2);
  EXPECT_EQ(t["skipped"], 0);
  EXPECT_EQ(t["density"], 1.0);
  EXPECT_EQ(t["acc"]["mean"], 1.0);  // Lily. and dog. beat the garbage
  EXPECT_EQ(t["acc"]["se"], 0.0);
  ASSERT_EQ(t["items"].size(), 2u);
  EXPECT_EQ(t["items"][1]["line"], 2);
  EXPECT_EQ(t["items"][1]["logprob"].size(), 2u);
  EXPECT_TRUE(t["items"][1]["correct_norm"].is_boolean());
  EXPECT_EQ(j["tasks"][1]["format"], "language_modeling");
  EXPECT_TRUE(j["tasks"][1]["acc"]["se"].is_null());  // one item: no standard error
  EXPECT_TRUE(j["tasks"][1]["acc_norm"].is_null());
  EXPECT_TRUE(j["tasks"][1]["perplexity"].is_number());

  // The test command installs gnuplot; the GPU machine's image lacks it.
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) GTEST_SKIP() << "gnuplot is not installed";
  const std::string png = dir.path("acc.png");
  r = test::run_polar({"eval", "--model", model, "--task", mc_path, "--task", lm_path, "--plot", png});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<uint8_t> bytes = test::read_bytes(png);
  ASSERT_GT(bytes.size(), 8u);
  EXPECT_EQ(bytes[1], 'P');
  EXPECT_EQ(bytes[2], 'N');
  EXPECT_EQ(bytes[3], 'G');
}

TEST(EvalCli, BadLinesFailOrAreSkipped) {
  test::TempDir dir;
  const std::string path = write_lines(dir, "t.jsonl", {mc("Lily saw a", {"dog.", "qq."}, 0), R"({"query": "q"})",
                                                        mc("She loved to", {"play.", "kjw."}, 0)});
  const std::string model = test::shared_path(kGgufRel);
  test::RunResult r = test::run_polar({"eval", "--model", model, "--task", path});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("error: " + path + ":2: missing field 'choices'"));
  r = test::run_polar({"eval", "--model", model, "--task", path, "--skip-bad", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("warning: " + path + ":2: missing field 'choices' (skipped)"));
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tasks"][0]["n"], 2);
  EXPECT_EQ(j["tasks"][0]["skipped"], 1);
  r = test::run_polar({"eval", "--model", model, "--task", dir.path("missing.jsonl")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot read task file"));
}

}  // namespace
