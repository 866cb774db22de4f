#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/gguf.h"
#include "io/tokenizer.h"
#include "test_util.h"

using namespace polar;
using json = nlohmann::json;
using test::TempDir;

namespace {

std::vector<std::string> read_lines(const std::string& path, size_t max_lines) {
  std::ifstream f(path, std::ios::binary);
  std::vector<std::string> lines;
  for (std::string line; lines.size() < max_lines && std::getline(f, line);) lines.push_back(line);
  return lines;
}

void write_text(const std::string& path, const std::string& text) {
  test::write_bytes(path, std::vector<uint8_t>(text.begin(), text.end()));
}

// Expects fn to throw polar::Error whose message contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

std::unique_ptr<Tokenizer> load_gguf(const std::string& path) {
  auto f = gguf::File::open(path);
  return load_tokenizer(f);
}

// Multilingual text, emoji (multi-code-point sequences included), unusual whitespace and controls.
const std::vector<std::string> kMultilingual = {
    "naïve café ☕ 日本語のテキスト",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji 👩‍👩‍👧‍👦 🇫🇷 🙂🙂 done",
    "tabs\tand\u00a0nbsp\u3000ideographic\u2028sep",
    "I'M YOU'RE we'VE it'S 'll",
    "12345 + 0.5e-3 = ١٢٣ ½ Ⅻ",
    "   leading and trailing   ",
    "a\r\nb\n\n\nc  \n d",
    "한국어 텍스트, ไทย, हिन्दी",
    "𝕳𝖊𝖑𝖑𝖔 𝟙𝟚𝟛 ＦＵＬＬ",
};

// Invalid UTF-8: stray bytes, truncated sequences, a lead byte before a space, lone continuations.
const std::vector<std::string> kInvalidUtf8 = {
    "invalid \xFF\xFE utf-8 \xC3 truncated \xE2\x98 and lone \x80\xBF continuation",
    "lead before space \xCC  x \xF0\x9F y\xE2",
    std::string("nul \0 inside", 12),
};

std::string random_bytes(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::string out;
  for (size_t i = 0; i < n; ++i) out += static_cast<char>(rng() & 0xFF);
  return out;
}

// ---- SentencePiece (stories260K, the reference tokenizer of llama2.c) ----

class TokenizerSpm : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { tok_ = load_gguf(test::shared_path("models/stories260K/stories260K.gguf")).release(); }
  static void TearDownTestSuite() { delete tok_; }
  static Tokenizer* tok_;
};
Tokenizer* TokenizerSpm::tok_ = nullptr;

TEST_F(TokenizerSpm, GoldenEncodings) {
  // models/stories260K/REFERENCE.md, from llama2.c's own tokenizer.
  const std::vector<std::pair<std::string, std::vector<int32_t>>> golden = {
      {"Once upon a time", {1, 403, 407, 261, 378}},
      {"Hello world", {1, 346, 306, 414, 263, 304, 341}},
      {"The cat sat on the mat.", {1, 291, 280, 294, 262, 294, 353, 265, 284, 294, 426}},
      {"  two  spaces", {1, 410, 410, 259, 424, 414, 410, 262, 427, 412, 331, 419}},
      {"naïve café ☕ 日本",
       {1, 297, 412, 198, 178, 360, 280, 412, 431, 485, 410, 229, 155, 152, 410, 233, 154, 168, 233, 159, 175}},
      {"Lily's mom said, \"No!\"", {1, 317, 439, 419, 357, 336, 432, 313, 458, 414, 443, 436}},
      {"x", {1, 410, 444}},
  };
  EXPECT_EQ(tok_->kind(), "spm");
  EXPECT_EQ(tok_->vocab_size(), 512);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_TRUE(tok_->add_bos_default());
  for (const auto& [text, ids] : golden) {
    EXPECT_EQ(tok_->encode(text, true), ids) << text;
    EXPECT_EQ(tok_->decode(ids), text);
  }
}

TEST_F(TokenizerSpm, ByteFallback) {
  // "☕" (E2 98 95) is not a piece: it becomes its three byte tokens, which decode back to the character.
  auto ids = tok_->encode("☕", false);
  ASSERT_EQ(ids.size(), 4u);  // the dummy-prefix "▁", then the bytes
  EXPECT_EQ(tok_->token_text(ids[0]), "\xE2\x96\x81");
  EXPECT_EQ(tok_->token_text(ids[1]), "<0xE2>");
  EXPECT_EQ(tok_->token_text(ids[2]), "<0x98>");
  EXPECT_EQ(tok_->token_text(ids[3]), "<0x95>");
  EXPECT_EQ(tok_->token_type(ids[1]), TokenType::kByte);
  EXPECT_EQ(tok_->token_bytes(ids[1]), "\xE2");
  EXPECT_EQ(tok_->decode(ids), "☕");
}

TEST_F(TokenizerSpm, RoundTripsWikiTextMultilingualAndBytes) {
  auto texts = read_lines(test::shared_path("data/text/wikitext2_test.txt"), 2000);
  ASSERT_EQ(texts.size(), 2000u);
  texts.insert(texts.end(), kMultilingual.begin(), kMultilingual.end());
  texts.insert(texts.end(), kInvalidUtf8.begin(), kInvalidUtf8.end());
  texts.push_back(random_bytes(3000, 7));
  for (const auto& text : texts) ASSERT_EQ(tok_->decode(tok_->encode(text, true)), text) << text;
}

TEST_F(TokenizerSpm, ControlTokensInTextAndDecoding) {
  // Literal control tokens are matched; the dummy prefix follows each of them, as in llama.cpp.
  auto ids = tok_->encode("x</s>x", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{410, 444, 2, 410, 444}));
  EXPECT_EQ(tok_->decode(ids), "x x");
  EXPECT_EQ(tok_->decode({1, 403, 407}), "Once upon");
  EXPECT_EQ(tok_->decode({1, 403, 407}, true), "<s> Once upon");
  EXPECT_TRUE(tok_->is_eos(2));
  EXPECT_FALSE(tok_->is_eos(1));
  EXPECT_TRUE(tok_->encode("", false).empty());
  EXPECT_EQ(tok_->encode("", true), std::vector<int32_t>{1});
}

TEST_F(TokenizerSpm, StreamDecoderEmitsSplitCharacterOnce) {
  // 日 and 本 are three byte tokens each; the stream holds bytes back until a character is complete.
  auto ids = tok_->encode("a日本b", false);
  StreamDecoder stream(*tok_);
  std::vector<std::string> pieces;
  for (int32_t id : ids)
    if (std::string out = stream.push(id); !out.empty()) pieces.push_back(out);
  EXPECT_EQ(stream.flush(), "");
  EXPECT_EQ(pieces, (std::vector<std::string>{"a", "日", "本", "b"}));
}

// ---- synthetic SentencePiece vocabularies (GGUF "llama" written by the test) ----

struct Piece {
  std::string text;
  float score;
  int32_t type;
};

std::string write_spm_gguf(const TempDir& dir, const std::vector<Piece>& extra, bool with_bytes = true) {
  std::vector<Piece> pieces = {{"<unk>", 0, 2}, {"<s>", 0, 3}, {"</s>", 0, 3}};
  if (with_bytes)
    for (int b = 0; b < 256; ++b) pieces.push_back({fmt::format("<0x{:02X}>", b), 0, 6});
  pieces.insert(pieces.end(), extra.begin(), extra.end());
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (const auto& p : pieces) {
    tokens.push_back(p.text);
    scores.push_back(p.score);
    types.push_back(p.type);
  }
  gguf::Writer w;
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_strings("tokenizer.ggml.tokens", tokens);
  w.set_f32s("tokenizer.ggml.scores", scores);
  w.set_i32s("tokenizer.ggml.token_type", types);
  w.set_bool("tokenizer.ggml.add_space_prefix", false);
  std::string path = dir.path("spm.gguf");
  w.write(path);
  return path;
}

TEST(TokenizerSpmSynthetic, HighestScoreMergesFirst) {
  TempDir dir;
  // Left to right would give "ab" + "c"; the higher score of "bc" wins.
  auto tok = load_gguf(write_spm_gguf(dir, {{"a", 0, 1}, {"b", 0, 1}, {"c", 0, 1}, {"ab", 1, 1}, {"bc", 2, 1}}));
  auto ids = tok->encode("abc", false);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(tok->token_text(ids[0]), "a");
  EXPECT_EQ(tok->token_text(ids[1]), "bc");
}

TEST(TokenizerSpmSynthetic, UnusedPieceIsSplitBack) {
  TempDir dir;
  // sentencepiece merges into the unused "abc" (which blocks "cd") and then splits it back: ab c d,
  // as python sentencepiece encodes it with the same pieces.
  auto tok = load_gguf(write_spm_gguf(
      dir, {{"a", 0, 1}, {"b", 0, 1}, {"c", 0, 1}, {"d", 0, 1}, {"ab", 5, 1}, {"abc", 4, 5}, {"cd", 3, 1}}));
  std::vector<std::string> texts;
  for (int32_t id : tok->encode("abcd", false)) texts.push_back(tok->token_text(id));
  EXPECT_EQ(texts, (std::vector<std::string>{"ab", "c", "d"}));
}

TEST(TokenizerSpmSynthetic, UnknownTokenWithoutByteTokens) {
  TempDir dir;
  auto tok = load_gguf(write_spm_gguf(dir, {{"a", 0, 1}}, /*with_bytes=*/false));
  // Without byte tokens each byte of "é" becomes the unknown token.
  EXPECT_EQ(tok->encode("aé", false), (std::vector<int32_t>{3, 0, 0}));
}

// ---- byte-level BPE on a synthetic vocabulary, written as tokenizer.json, vocab.json + merges.txt and GGUF ----

// GPT-2's byte alphabet, computed here independently of the implementation.
std::string byte_char(uint8_t b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
    int n = 0;
    for (int x = 0; x < b; ++x)
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) ++n;
    cp = 256 + n;
  }
  if (cp < 0x80) return std::string(1, static_cast<char>(cp));
  return {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
}

std::string byte_level(const std::string& raw) {
  std::string out;
  for (char c : raw) out += byte_char(static_cast<uint8_t>(c));
  return out;
}

using RawMerges = std::vector<std::pair<std::string, std::string>>;

struct SyntheticBpe {
  std::vector<std::string> tokens;  // byte-level entries; ids are positions
  std::vector<std::pair<std::string, std::string>> merges;  // byte-level
  std::vector<std::pair<std::string, bool>> added;  // text, special; ids follow the tokens

  // All 256 bytes, then the merges of `raw_merges` (pairs of raw byte strings) in rank order.
  explicit SyntheticBpe(const RawMerges& raw_merges,
                        std::vector<std::pair<std::string, bool>> added_tokens = {})
      : added(std::move(added_tokens)) {
    for (int b = 0; b < 256; ++b) tokens.push_back(byte_char(static_cast<uint8_t>(b)));
    for (const auto& [a, b] : raw_merges) {
      merges.emplace_back(byte_level(a), byte_level(b));
      tokens.push_back(byte_level(a + b));
    }
  }
  int32_t id(const std::string& raw) const {
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] == byte_level(raw)) return static_cast<int32_t>(i);
    for (size_t i = 0; i < added.size(); ++i)
      if (added[i].first == raw) return static_cast<int32_t>(tokens.size() + i);
    return -1;
  }

  std::string write_tokenizer_json(const TempDir& dir, bool merges_as_pairs = false, json pre = nullptr) const {
    json vocab = json::object();
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
    json merge_list = json::array();
    for (const auto& [a, b] : merges) merge_list.push_back(merges_as_pairs ? json::array({a, b}) : json(a + " " + b));
    json added_list = json::array();
    for (size_t i = 0; i < added.size(); ++i)
      added_list.push_back({{"id", tokens.size() + i}, {"content", added[i].first}, {"special", added[i].second}});
    if (pre.is_null()) pre = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
    json root = {{"version", "1.0"},
                 {"added_tokens", added_list},
                 {"normalizer", nullptr},
                 {"pre_tokenizer", pre},
                 {"decoder", {{"type", "ByteLevel"}}},
                 {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}}}};
    write_text(dir.path("tokenizer.json"), root.dump());
    if (id("<|endoftext|>") >= 0)
      write_text(dir.path("tokenizer_config.json"), json({{"eos_token", "<|endoftext|>"}}).dump());
    return dir.path("");
  }

  std::string write_vocab_and_merges(const TempDir& dir) const {
    json vocab = json::object();
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
    write_text(dir.path("vocab.json"), vocab.dump());
    std::string merges_txt = "#version: 0.2\n";
    for (const auto& [a, b] : merges) merges_txt += a + " " + b + "\n";
    write_text(dir.path("merges.txt"), merges_txt);
    json decoder = json::object();
    for (size_t i = 0; i < added.size(); ++i)
      decoder[std::to_string(tokens.size() + i)] = {{"content", added[i].first}, {"special", added[i].second}};
    write_text(dir.path("tokenizer_config.json"), json({{"added_tokens_decoder", decoder}}).dump());
    if (id("<|endoftext|>") >= 0)
      write_text(dir.path("special_tokens_map.json"), json({{"eos_token", {{"content", "<|endoftext|>"}}}}).dump());
    return dir.path("");
  }

  // Writes a GGUF "gpt2" vocabulary; `edit` may change or remove keys before writing.
  std::string write_gguf(const TempDir& dir, const std::string& pre = "gpt2",
                         const std::function<void(json&)>& edit = nullptr) const {
    json kv = {{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.pre", pre}};
    std::vector<std::string> all = tokens;
    std::vector<int32_t> types(tokens.size(), 1);
    for (const auto& [text, special] : added) {
      all.push_back(text);
      types.push_back(special ? 3 : 4);
    }
    std::vector<std::string> merge_strings;
    for (const auto& [a, b] : merges) merge_strings.push_back(a + " " + b);
    kv["tokenizer.ggml.tokens"] = all;
    kv["tokenizer.ggml.token_type"] = types;
    kv["tokenizer.ggml.merges"] = merge_strings;
    if (id("<|endoftext|>") >= 0) kv["tokenizer.ggml.eos_token_id"] = id("<|endoftext|>");
    if (edit) edit(kv);
    gguf::Writer w;
    for (const auto& [key, v] : kv.items()) {
      if (v.is_string()) w.set_string(key, v.get<std::string>());
      else if (v.is_number_integer()) w.set_u32(key, v.get<uint32_t>());
      else if (v.is_array() && !v.empty() && v[0].is_number_integer()) w.set_i32s(key, v.get<std::vector<int32_t>>());
      else w.set_strings(key, v.get<std::vector<std::string>>());
    }
    std::string path = dir.path("bpe.gguf");
    w.write(path);
    return path;
  }
};

// The same vocabulary must tokenize identically from each file format.
enum class Format { kTokenizerJson, kTokenizerJsonPairs, kVocabMerges, kGguf };

std::unique_ptr<Tokenizer> load(const SyntheticBpe& v, Format format, const TempDir& dir) {
  switch (format) {
    case Format::kTokenizerJson: return load_tokenizer_dir(v.write_tokenizer_json(dir));
    case Format::kTokenizerJsonPairs: return load_tokenizer_dir(v.write_tokenizer_json(dir, true));
    case Format::kVocabMerges: return load_tokenizer_dir(v.write_vocab_and_merges(dir));
    case Format::kGguf: return load_gguf(v.write_gguf(dir));
  }
  return nullptr;
}

const SyntheticBpe& synthetic() {
  static const SyntheticBpe v(
      {{"t", "h"}, {"th", "e"}, {" ", "the"}, {" ", " "},
       {"\xE2", "\x98"}, {"\xE2\x98", "\x95"},    // ☕
       {"\xE6", "\x97"}, {"\xE6\x97", "\xA5"}},  // 日
      {{"<|endoftext|>", true}, {"<|im_start|>", true}, {"<|im_end|>", true}, {"<tool>", false}});
  return v;
}

class TokenizerBpe : public ::testing::TestWithParam<Format> {
 protected:
  void SetUp() override { tok_ = load(synthetic(), GetParam(), dir_); }
  TempDir dir_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_P(TokenizerBpe, MergesWithinPreTokens) {
  const SyntheticBpe& v = synthetic();
  EXPECT_EQ(tok_->kind(), "bpe");
  EXPECT_EQ(tok_->encode("the", false), std::vector<int32_t>{v.id("the")});
  // GPT-2's regex keeps the space with the word that follows: " the", " the".
  EXPECT_EQ(tok_->encode(" the the", false), (std::vector<int32_t>{v.id(" the"), v.id(" the")}));
  // Letters run together into one pre-token, inside which t-h-e still merges.
  EXPECT_EQ(tok_->encode("xthe", false), (std::vector<int32_t>{v.id("x"), v.id("the")}));
  // "a", " ", " the": the two spaces sit in different pre-tokens, so "  " (a merge) does not form.
  EXPECT_EQ(tok_->encode("a  the", false), (std::vector<int32_t>{v.id("a"), v.id(" "), v.id(" the")}));
  EXPECT_EQ(tok_->encode("a  ", false), (std::vector<int32_t>{v.id("a"), v.id("  ")}));
  EXPECT_EQ(tok_->encode("☕日", false), (std::vector<int32_t>{v.id("☕"), v.id("日")}));
}

TEST_P(TokenizerBpe, RoundTripsArbitraryBytes) {
  std::vector<std::string> texts = kMultilingual;
  texts.insert(texts.end(), kInvalidUtf8.begin(), kInvalidUtf8.end());
  for (unsigned seed = 0; seed < 20; ++seed) texts.push_back(random_bytes(300, seed));
  for (const auto& text : texts) EXPECT_EQ(tok_->decode(tok_->encode(text, false)), text);
}

TEST_P(TokenizerBpe, SpecialTokensAreMatchedInText) {
  const SyntheticBpe& v = synthetic();
  auto ids = tok_->encode("<|im_start|>the<|im_end|><tool>", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{v.id("<|im_start|>"), v.id("the"), v.id("<|im_end|>"), v.id("<tool>")}));
  EXPECT_EQ(tok_->decode(ids), "the<tool>");  // control tokens drop out, user-defined ones are text
  EXPECT_EQ(tok_->decode(ids, true), "<|im_start|>the<|im_end|><tool>");
  // An incomplete marker is ordinary text.
  EXPECT_EQ(tok_->decode(tok_->encode("<|im_start|", false)), "<|im_start|");
  EXPECT_EQ(tok_->eos_id(), v.id("<|endoftext|>"));
  EXPECT_TRUE(tok_->is_eos(v.id("<|endoftext|>")));
  EXPECT_TRUE(tok_->is_eos(v.id("<|im_end|>")));  // an end-of-turn marker
  EXPECT_FALSE(tok_->is_eos(v.id("<|im_start|>")));
  EXPECT_EQ(tok_->bos_id(), -1);
  EXPECT_FALSE(tok_->add_bos_default());
}

TEST_P(TokenizerBpe, StreamDecoderEmitsSplitCharacterOnce) {
  // With no merge for them, the four bytes of 🙂 are four tokens.
  auto ids = tok_->encode("a🙂b", false);
  ASSERT_EQ(ids.size(), 6u);
  StreamDecoder stream(*tok_);
  std::vector<std::string> outputs;
  for (int32_t id : ids) outputs.push_back(stream.push(id));
  EXPECT_EQ(outputs, (std::vector<std::string>{"a", "", "", "", "🙂", "b"}));
  EXPECT_EQ(stream.flush(), "");
  // An incomplete sequence at the end comes out of flush as it is.
  StreamDecoder cut(*tok_);
  EXPECT_EQ(cut.push(ids[1]), "");
  EXPECT_EQ(cut.flush(), "\xF0");
}

std::string format_name(const ::testing::TestParamInfo<Format>& info) {
  switch (info.param) {
    case Format::kTokenizerJson: return "TokenizerJson";
    case Format::kTokenizerJsonPairs: return "TokenizerJsonPairs";
    case Format::kVocabMerges: return "VocabMerges";
    case Format::kGguf: return "Gguf";
  }
  return "?";
}

INSTANTIATE_TEST_SUITE_P(TokenizerFormats, TokenizerBpe,
                         ::testing::Values(Format::kTokenizerJson, Format::kTokenizerJsonPairs, Format::kVocabMerges,
                                           Format::kGguf),
                         format_name);

TEST(TokenizerBpeSynthetic, MergeRankDecides) {
  // "abc" gives "ab c" when "a b" ranks first and "a bc" when "b c" does: rank, not position, decides.
  for (bool ab_first : {true, false}) {
    TempDir dir;
    SyntheticBpe v(ab_first ? RawMerges{{"a", "b"}, {"b", "c"}} : RawMerges{{"b", "c"}, {"a", "b"}});
    auto tok = load_tokenizer_dir(v.write_tokenizer_json(dir));
    auto expected =
        ab_first ? std::vector<int32_t>{v.id("ab"), v.id("c")} : std::vector<int32_t>{v.id("a"), v.id("bc")};
    EXPECT_EQ(tok->encode("abc", false), expected) << "ab_first " << ab_first;
  }
}

TEST(TokenizerBpeSynthetic, EqualRanksMergeLeftmostFirst) {
  TempDir dir;
  SyntheticBpe v(RawMerges{{"a", "a"}});
  auto tok = load_tokenizer_dir(v.write_tokenizer_json(dir));
  EXPECT_EQ(tok->encode("aaa", false), (std::vector<int32_t>{v.id("aa"), v.id("a")}));
}

TEST(TokenizerBpeSynthetic, DigitsAndPrefixSpacePreTokenizers) {
  TempDir dir;
  SyntheticBpe v(RawMerges{{"1", "2"}, {" ", "a"}});
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Digits"}, {"individual_digits", true}},
                {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}}}};
  auto tok = load_tokenizer_dir(v.write_tokenizer_json(dir, false, pre));
  // Digits isolates each digit so "1 2" never merge; ByteLevel's prefix space goes before every piece
  // that does not already start with one.
  EXPECT_EQ(tok->encode("a12", false), (std::vector<int32_t>{v.id(" a"), v.id(" "), v.id("1"), v.id(" "), v.id("2")}));
}

// A million nested arrays as the normalizer: refused while parsing (quoting the unsupported normalizer in the
// error would recurse a million deep and overflow the stack).
TEST(TokenizerBadInput, DeeplyNestedTokenizerJsonIsRefusedNotACrash) {
  TempDir dir;
  const std::string nested = std::string(1'000'000, '[') + std::string(1'000'000, ']');
  write_text(dir.path("tokenizer.json"), R"({"model": {"vocab": {"a": 0}, "merges": []}, "normalizer": )" + nested + "}");
  expect_error([&] { load_tokenizer_dir(dir.path("")); }, "tokenizer.json: not valid JSON");
  expect_error([&] { load_tokenizer_dir(dir.path("")); }, "nested deeper than 128 levels");
}

// Found by fuzz_tokenizer_hf: nlohmann reports a number beyond double's range as out_of_range, not as a
// parse_error, and it escaped as an exception of another type.
TEST(TokenizerBadInput, NumberOutOfRangeIsAnError) {
  TempDir dir;
  write_text(dir.path("vocab.json"), R"({"a": 1e400})");
  write_text(dir.path("merges.txt"), "");
  expect_error([&] { load_tokenizer_dir(dir.path("")); }, "vocab.json: not valid JSON");
  expect_error([&] { load_tokenizer_dir(dir.path("")); }, "number overflow parsing '1e400'");
}

TEST(TokenizerBpeSynthetic, SplitPreTokenizerWithRegexAndString) {
  TempDir dir;
  SyntheticBpe v(RawMerges{{"x", "y"}, {"a", "b"}});
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"}, {"pattern", {{"String", "."}}}, {"behavior", "Isolated"}, {"invert", false}},
                {{"type", "Split"}, {"pattern", {{"Regex", "b+"}}}, {"behavior", "Isolated"}, {"invert", false}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  auto tok = load_tokenizer_dir(v.write_tokenizer_json(dir, false, pre));
  // The String "." is literal (as a regex it would cut "xy" apart); "b+" cuts "ab" apart.
  EXPECT_EQ(tok->encode("xy.ab", false), (std::vector<int32_t>{v.id("xy"), v.id("."), v.id("a"), v.id("b")}));
}

TEST(TokenizerBpeSynthetic, GgufPreTokenizerNames) {
  SyntheticBpe v(RawMerges{{"1", "2"}, {"12", "3"}, {"b", "c"}, {"a", "b"}, {"ab", "c"}});
  auto encode = [&](const std::string& pre, const std::string& text) {
    TempDir dir;
    return load_gguf(v.write_gguf(dir, pre))->encode(text, false);
  };
  // gpt2 keeps digit runs together; smollm and qwen2 isolate each digit; llama3 takes up to three.
  EXPECT_EQ(encode("gpt2", "123"), std::vector<int32_t>{v.id("123")});
  EXPECT_EQ(encode("smollm", "123"), (std::vector<int32_t>{v.id("1"), v.id("2"), v.id("3")}));
  EXPECT_EQ(encode("qwen2", "123"), (std::vector<int32_t>{v.id("1"), v.id("2"), v.id("3")}));
  EXPECT_EQ(encode("llama-bpe", "1231"), (std::vector<int32_t>{v.id("123"), v.id("1")}));
  // Merging "abc" gives "a bc" ("b c" ranks first); llama3 ignores merges for a pre-token that is an entry.
  EXPECT_EQ(encode("qwen2", "abc"), (std::vector<int32_t>{v.id("a"), v.id("bc")}));
  EXPECT_EQ(encode("llama-bpe", "abc"), std::vector<int32_t>{v.id("abc")});
}

TEST(TokenizerBpeSynthetic, IgnoreMergesEmitsWholeEntries) {
  // "bc" ranks first, so merging "abc" gives "a bc" — but with ignore_merges the entry "abc" wins.
  SyntheticBpe v(RawMerges{{"b", "c"}, {"a", "b"}, {"ab", "c"}});
  for (bool ignore : {false, true}) {
    TempDir dir;
    std::string path = v.write_tokenizer_json(dir);
    json root = json::parse(std::ifstream(path + "/tokenizer.json"));
    root["model"]["ignore_merges"] = ignore;
    write_text(path + "/tokenizer.json", root.dump());
    auto tok = load_tokenizer_dir(path);
    auto expected = ignore ? std::vector<int32_t>{v.id("abc")} : std::vector<int32_t>{v.id("a"), v.id("bc")};
    EXPECT_EQ(tok->encode("abc", false), expected) << "ignore_merges " << ignore;
  }
}

TEST(TokenizerBpeSynthetic, AllFormatsAgreeOnWikiText) {
  auto lines = read_lines(test::shared_path("data/text/wikitext2_test.txt"), 300);
  std::string text;
  for (const auto& l : lines) text += l + "\n";
  std::vector<std::vector<int32_t>> results;
  for (Format f : {Format::kTokenizerJson, Format::kVocabMerges, Format::kGguf}) {
    TempDir dir;
    auto tok = load(synthetic(), f, dir);
    results.push_back(tok->encode(text, false));
    EXPECT_EQ(tok->decode(results.back()), text);
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

TEST(TokenizerBpeSynthetic, BosFromPostProcessorAndConfig) {
  TempDir dir;
  SyntheticBpe v(RawMerges{}, {{"<|begin_of_text|>", true}, {"<|eot_id|>", true}});
  std::string path = v.write_tokenizer_json(dir);
  json root = json::parse(std::ifstream(path + "/tokenizer.json"));
  root["post_processor"] = json::parse(R"({"type": "Sequence", "processors": [
      {"type": "ByteLevel"},
      {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                {"Sequence": {"id": "A", "type_id": 0}}]}]})");
  write_text(path + "/tokenizer.json", root.dump());
  write_text(path + "/tokenizer_config.json", "{}");
  write_text(path + "/config.json", json({{"eos_token_id", {257, 256}}}).dump());
  auto tok = load_tokenizer_dir(path);
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_TRUE(tok->add_bos_default());
  EXPECT_EQ(tok->eos_id(), 257);
  EXPECT_TRUE(tok->is_eos(257));
  EXPECT_TRUE(tok->is_eos(256));  // listed in config.json's eos_token_id
  EXPECT_EQ(tok->encode("x", true), (std::vector<int32_t>{256, v.id("x")}));
}

// ---- bad input ----

TEST(TokenizerErrors, Gguf) {
  TempDir dir;
  const SyntheticBpe& v = synthetic();
  auto load_edited = [&](const std::function<void(json&)>& edit) { load_gguf(v.write_gguf(dir, "gpt2", edit)); };
  expect_error([&] { load_edited([](json& kv) { kv["tokenizer.ggml.model"] = "bert"; }); }, "tokenizer model 'bert'");
  expect_error([&] { load_edited([](json& kv) { kv["tokenizer.ggml.pre"] = "nonesuch"; }); }, "'nonesuch'");
  expect_error([&] { load_edited([](json& kv) { kv.erase("tokenizer.ggml.tokens"); }); }, "tokenizer.ggml.tokens");
  expect_error([&] { load_edited([](json& kv) { kv.erase("tokenizer.ggml.merges"); }); }, "tokenizer.ggml.merges");
  expect_error([&] { load_edited([](json& kv) { kv["tokenizer.ggml.merges"].push_back("Ġ zzz"); }); },
               "'zzz', which is not in the vocabulary");
  expect_error([&] { load_edited([](json& kv) { kv["tokenizer.ggml.merges"].push_back("nospace"); }); },
               "not two tokens");
  expect_error([&] { load_edited([](json& kv) { kv["tokenizer.ggml.token_type"] = std::vector<int32_t>{1, 1}; }); },
               "token_type has 2 entries");
  expect_error([&] { load_edited([](json& kv) { kv["tokenizer.ggml.eos_token_id"] = 100000; }); }, "EOS id 100000");
  expect_error([&] { load_gguf(write_spm_gguf(dir, {{"<0xZZ>", 0, 6}})); }, "expected <0xXX>");
}

TEST(TokenizerErrors, HuggingFaceFiles) {
  const SyntheticBpe& v = synthetic();
  auto with_json = [&](const std::function<void(json&)>& edit) {
    TempDir dir;
    std::string path = v.write_tokenizer_json(dir);
    json root = json::parse(std::ifstream(path + "/tokenizer.json"));
    edit(root);
    write_text(path + "/tokenizer.json", root.dump());
    load_tokenizer_dir(path);
  };
  expect_error([&] { with_json([](json& j) { j["model"]["type"] = "WordPiece"; }); }, "'WordPiece' is not supported");
  expect_error([&] { with_json([](json& j) { j["model"]["vocab"] = json::array({1, 2}); }); }, "not a JSON object");
  expect_error([&] { with_json([](json& j) { j["model"]["merges"].push_back("Ġ zzz"); }); }, "not in the vocabulary");
  expect_error([&] { with_json([](json& j) { j["model"]["merges"].push_back(42); }); }, "model.merges[");
  expect_error([&] { with_json([](json& j) { j["normalizer"] = {{"type", "NFC"}}; }); }, "normalizer 'NFC'");
  expect_error([&] { with_json([](json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }); },
               "pre-tokenizer 'Whitespace' is not supported");
  expect_error(
      [&] {
        with_json([](json& j) {
          j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "("}}}, {"behavior", "Isolated"}};
        });
      },
      "does not compile");
  expect_error(
      [&] {
        with_json([](json& j) {
          j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "x"}}}, {"behavior", "Removed"}};
        });
      },
      "behavior 'Removed'");
  expect_error(
      [&] {
        with_json([](json& j) {
          j["pre_tokenizer"] = nullptr;
          j["decoder"] = nullptr;
        });
      },
      "not a byte-level BPE");
  expect_error([&] { with_json([](json& j) { j["added_tokens"][0]["id"] = "seven"; }); }, "malformed tokenizer.json");

  TempDir broken;
  write_text(broken.path("tokenizer.json"), "{\"model\": {");
  expect_error([&] { load_tokenizer_dir(broken.path("")); }, "not valid JSON");

  TempDir no_merges;
  write_text(no_merges.path("vocab.json"), "{}");
  expect_error([&] { load_tokenizer_dir(no_merges.path("")); }, "no merges.txt");

  TempDir bad_merges;
  v.write_vocab_and_merges(bad_merges);
  write_text(bad_merges.path("merges.txt"), "#version: 0.2\nĠ t\nthree parts here\n");
  expect_error([&] { load_tokenizer_dir(bad_merges.path("")); }, "merges.txt:3");

  TempDir empty;
  expect_error([&] { load_tokenizer_dir(empty.path("")); }, "no tokenizer found");
}

TEST(TokenizerErrors, IdsOutOfRange) {
  TempDir dir;
  auto tok = load(synthetic(), Format::kTokenizerJson, dir);
  expect_error([&] { tok->decode({tok->vocab_size()}); }, "out of range");
  expect_error([&] { tok->token_text(-1); }, "out of range");
}

// ---- the default model (SmolLM2-135M-Instruct GGUF), only where POLAR_DEFAULT_MODEL points to it ----

TEST(TokenizerSmolLM2, MatchesHuggingFaceTokenizers) {
  const char* path = std::getenv("POLAR_DEFAULT_MODEL");
  if (!path || !*path || !std::filesystem::exists(path)) GTEST_SKIP() << "POLAR_DEFAULT_MODEL not set or absent";
  auto tok = load_gguf(path);
  ASSERT_EQ(tok->vocab_size(), 49152);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_FALSE(tok->add_bos_default());
  EXPECT_TRUE(tok->is_eos(0));  // <|endoftext|>
  // Reference ids from the Python `tokenizers` library (0.23.3) with SmolLM2's vocabulary, merges and
  // pre-tokenizer (Digits(individual_digits) + ByteLevel).
  const std::vector<std::pair<std::string, std::vector<int32_t>>> cases = {
      {"Hello, we can use", {19556, 28, 392, 416, 722}},
      {"The capital of France is", {504, 3575, 282, 4649, 314}},
      {"Hello world! 123", {19556, 905, 17, 216, 33, 34, 35}},
      {"Café déjà vu.", {51, 1939, 2756, 32564, 90, 16739, 386, 101, 30}},
      {"  multiple   spaces", {216, 2701, 256, 5600}},
      {"naïve café ☕ 日本", {3546, 46494, 37366, 4636, 242, 239, 17097, 241, 115, 40993}},
      {"I'M YOU'RE we'VE", {57, 23, 61, 12246, 23, 3256, 392, 23, 18525}},
      {"\x1c\x1d\x1e", {213, 214}},  // the vocabulary has no token for byte 0x1D: it is left out
      {"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
       {1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198}},
  };
  for (const auto& [text, ids] : cases) EXPECT_EQ(tok->encode(text, false), ids) << text;
  auto lines = read_lines(test::shared_path("data/text/wikitext2_test.txt"), 2000);
  for (const auto& line : lines) ASSERT_EQ(tok->decode(tok->encode(line, false)), line);
}

}  // namespace
