// The parts shared by both tokenizer kinds (literal special tokens, decoding, streaming) and the GGUF reader.
#include "io/tokenizer.h"

#include <algorithm>
#include <climits>
#include <string_view>
#include <utility>

#include "core/error.h"
#include "io/gguf.h"
#include "io/tokenizer_impl.h"

namespace polar {

using detail::VocabSpec;

namespace {

// Tokens that end a turn although the file does not name them EOS (as llama.cpp recognises them): chat
// models stop on these, base models on EOS.
constexpr std::string_view kEndOfTurnTexts[] = {
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>",
};

bool matched_literally(TokenType t) {
  return t == TokenType::kControl || t == TokenType::kUserDefined || t == TokenType::kUnknown;
}

}  // namespace

void Tokenizer::set_vocab(VocabSpec&& spec, std::vector<std::string> bytes) {
  const std::string& src = spec.source;
  check(!spec.tokens.empty(), "{}: the vocabulary is empty", src);
  check(spec.tokens.size() <= static_cast<size_t>(INT32_MAX), "{}: vocabulary of {} tokens is too large", src,
        spec.tokens.size());
  vocab_size_ = static_cast<int32_t>(spec.tokens.size());
  auto valid = [&](int32_t id, const char* what) {
    check(id >= -1 && id < vocab_size_, "{}: {} id {} is out of range (vocabulary of {} tokens)", src, what, id,
          vocab_size_);
    return id;
  };
  bos_id_ = valid(spec.bos, "BOS");
  eos_id_ = valid(spec.eos, "EOS");
  unk_id_ = valid(spec.unk, "unknown-token");
  add_bos_default_ = spec.add_bos && bos_id_ >= 0;
  for (int32_t id : spec.eog) eog_ids_.push_back(valid(id, "end-of-generation"));
  text_ = std::move(spec.tokens);
  type_ = std::move(spec.types);
  bytes_ = std::move(bytes);

  for (int32_t id = 0; id < vocab_size_; ++id) {
    if (!matched_literally(type_[id]) || text_[id].empty()) continue;
    literal_by_first_byte_[static_cast<uint8_t>(text_[id][0])].push_back(id);
    if (type_[id] == TokenType::kControl &&
        std::find(std::begin(kEndOfTurnTexts), std::end(kEndOfTurnTexts), text_[id]) != std::end(kEndOfTurnTexts))
      eog_ids_.push_back(id);
  }
  for (auto& bucket : literal_by_first_byte_)
    std::stable_sort(bucket.begin(), bucket.end(),
                     [&](int32_t a, int32_t b) { return text_[a].size() > text_[b].size(); });
}

int32_t Tokenizer::check_id(int32_t id) const {
  check(id >= 0 && id < vocab_size_, "token id {} is out of range (vocabulary of {} tokens)", id, vocab_size_);
  return id;
}

const std::string& Tokenizer::token_bytes(int32_t id) const { return bytes_[check_id(id)]; }
const std::string& Tokenizer::token_text(int32_t id) const { return text_[check_id(id)]; }
TokenType Tokenizer::token_type(int32_t id) const { return type_[check_id(id)]; }

bool Tokenizer::is_eos(int32_t id) const {
  return (id >= 0 && id == eos_id_) || std::find(eog_ids_.begin(), eog_ids_.end(), id) != eog_ids_.end();
}

int32_t Tokenizer::match_literal(std::string_view rest) const {
  for (int32_t id : literal_by_first_byte_[static_cast<uint8_t>(rest[0])])
    if (rest.starts_with(text_[id])) return id;
  return -1;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> out;
  if (add_bos && bos_id_ >= 0) out.push_back(bos_id_);
  size_t start = 0;  // of the text not yet encoded
  for (size_t pos = 0; pos < text.size();) {
    int32_t id = match_literal(text.substr(pos));
    if (id < 0) {
      ++pos;
      continue;
    }
    if (pos > start) encode_text(text.substr(start, pos - start), out);
    out.push_back(id);
    pos += text_[id].size();
    start = pos;
  }
  if (start < text.size()) encode_text(text.substr(start), out);
  return out;
}

std::string Tokenizer::decode_next(int32_t id, DecodeState& state, bool keep_special) const {
  check_id(id);
  if (type_[id] == TokenType::kControl && !keep_special) return {};
  std::string_view piece = bytes_[id];
  if (!state.text_started) {
    state.text_started = true;
    if (strips_leading_space() && piece.starts_with(' ')) piece.remove_prefix(1);
  }
  return std::string(piece);
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool keep_special) const {
  std::string out;
  DecodeState state;
  for (int32_t id : ids) out += decode_next(id, state, keep_special);
  return out;
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_.decode_next(id, state_, keep_special_);
  // Hold back a trailing lead byte whose continuation bytes have not all arrived yet; anything else,
  // including invalid bytes, goes out now.
  size_t keep = 0;
  for (size_t back = 1; back <= std::min<size_t>(3, pending_.size()); ++back) {
    auto c = static_cast<uint8_t>(pending_[pending_.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back for the lead
    if (detail::utf8_lead_length(c) > back) keep = back;
    break;
  }
  std::string out = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StreamDecoder::flush() { return std::exchange(pending_, {}); }

// ---- GGUF ----

namespace {

const nlohmann::json& gguf_array(const gguf::File& f, const std::string& key) {
  check(f.has(key), "{}: missing {}", f.path(), key);
  const auto& v = f.metadata()[key];
  check(v.is_array(), "{}: {} is not an array", f.path(), key);
  return v;
}

std::vector<std::string> gguf_strings(const gguf::File& f, const std::string& key) {
  std::vector<std::string> out;
  for (const auto& v : gguf_array(f, key)) {
    check(v.is_string(), "{}: {} holds a value that is not a string", f.path(), key);
    out.push_back(v.get<std::string>());
  }
  return out;
}

// The vocabulary and special ids common to both models; absent ids take the given defaults.
void read_gguf_vocab(const gguf::File& f, VocabSpec& spec, int32_t default_bos, int32_t default_eos,
                     int32_t default_unk) {
  spec.source = f.path();
  spec.tokens = gguf_strings(f, "tokenizer.ggml.tokens");
  spec.types.assign(spec.tokens.size(), TokenType::kNormal);
  if (f.has("tokenizer.ggml.token_type")) {
    const auto& types = gguf_array(f, "tokenizer.ggml.token_type");
    check(types.size() == spec.tokens.size(), "{}: tokenizer.ggml.token_type has {} entries for {} tokens", f.path(),
          types.size(), spec.tokens.size());
    for (size_t i = 0; i < types.size(); ++i) {
      check(types[i].is_number_integer() && types[i].get<int64_t>() >= 1 && types[i].get<int64_t>() <= 6,
            "{}: tokenizer.ggml.token_type[{}] = {} is not a token type (1..6)", f.path(), i, types[i].dump());
      spec.types[i] = static_cast<TokenType>(types[i].get<int32_t>());
    }
  }
  spec.bos = f.find_token_id("tokenizer.ggml.bos_token_id").value_or(default_bos);
  spec.eos = f.find_token_id("tokenizer.ggml.eos_token_id").value_or(default_eos);
  spec.unk = f.find_token_id("tokenizer.ggml.unknown_token_id").value_or(default_unk);
  for (const char* key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (auto v = f.find_token_id(key)) spec.eog.push_back(*v);
}

bool gguf_bool(const gguf::File& f, const std::string& key, bool def) { return f.has(key) ? f.get_bool(key) : def; }

// llama.cpp's pre-tokenizers for tokenizer.ggml.pre (llama-vocab.cpp), written as the Hugging Face regexes
// they stand for: PCRE2 runs those directly, where llama.cpp needs hand-adapted variants.
struct GgufPreTokenizer {
  std::vector<std::string_view> names;
  std::vector<const char*> patterns;
  bool ignore_merges = false;
  bool add_bos = false;  // default when tokenizer.ggml.add_bos_token is absent
};

constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

const GgufPreTokenizer& gguf_pre_tokenizer(const gguf::File& f) {
  static const std::vector<GgufPreTokenizer> table = {
      // A missing name or "default" falls back to GPT-2's regex (llama.cpp uses a cruder legacy split).
      {{"", "default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"}, {detail::kGpt2Pattern}},
      // Every digit a piece of its own, then GPT-2 (HF: Digits(individual_digits) + ByteLevel).
      {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}, {R"(\p{N})", detail::kGpt2Pattern}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3"}, {kLlama3Pattern}, true, true},
      {{"dbrx", "smaug-bpe"}, {kLlama3Pattern}},
      {{"qwen2", "deepseek-r1-qwen", "stablelm2"}, {kQwen2Pattern}},
  };
  std::string name = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "";
  for (const auto& pre : table)
    if (std::find(pre.names.begin(), pre.names.end(), name) != pre.names.end()) return pre;
  std::string known;
  for (const auto& pre : table)
    for (auto n : pre.names)
      if (!n.empty()) known += (known.empty() ? "" : ", ") + std::string(n);
  fail("{}: unknown pre-tokenizer tokenizer.ggml.pre = '{}' (known: {})", f.path(), name, known);
}

std::unique_ptr<Tokenizer> load_gguf_bpe(const gguf::File& f) {
  detail::BpeSpec spec;
  read_gguf_vocab(f, spec, -1, -1, -1);
  // llama.cpp never emits the unknown token for byte-level BPE (converters often set it to an
  // unrelated id, e.g. <|endoftext|> for SmolLM2); bytes without a token are dropped instead.
  spec.unk = -1;
  const GgufPreTokenizer& pre = gguf_pre_tokenizer(f);
  for (const char* p : pre.patterns) spec.pre.push_back({detail::PreTokenizerStep::Kind::kSplit, p});
  spec.ignore_merges = pre.ignore_merges;
  spec.add_bos = gguf_bool(f, "tokenizer.ggml.add_bos_token", pre.add_bos);
  auto merges = gguf_strings(f, "tokenizer.ggml.merges");
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    // Split at the first space after the first character: a vocabulary entry may itself be " ".
    size_t sp = merges[rank].find(' ', 1);
    check(sp != std::string::npos, "{}: tokenizer.ggml.merges[{}] = '{}' is not two tokens separated by a space",
          f.path(), rank, merges[rank]);
    spec.merges.emplace_back(merges[rank].substr(0, sp), merges[rank].substr(sp + 1));
  }
  return detail::make_bpe_tokenizer(std::move(spec));
}

std::unique_ptr<Tokenizer> load_gguf_spm(const gguf::File& f) {
  detail::SpmSpec spec;
  // SentencePiece's fixed ids, which llama.cpp assumes when the file does not say.
  read_gguf_vocab(f, spec, 1, 2, 0);
  spec.add_bos = gguf_bool(f, "tokenizer.ggml.add_bos_token", true);
  spec.add_space_prefix = gguf_bool(f, "tokenizer.ggml.add_space_prefix", true);
  spec.scores.assign(spec.tokens.size(), 0.0f);
  if (f.has("tokenizer.ggml.scores")) {
    const auto& scores = gguf_array(f, "tokenizer.ggml.scores");
    check(scores.size() == spec.tokens.size(), "{}: tokenizer.ggml.scores has {} entries for {} tokens", f.path(),
          scores.size(), spec.tokens.size());
    for (size_t i = 0; i < scores.size(); ++i) {
      check(scores[i].is_number(), "{}: tokenizer.ggml.scores[{}] is not a number", f.path(), i);
      spec.scores[i] = scores[i].get<float>();
    }
  }
  return detail::make_spm_tokenizer(std::move(spec));
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const gguf::File& file) {
  std::string model = file.get_string("tokenizer.ggml.model");
  if (model == "gpt2") return load_gguf_bpe(file);
  if (model == "llama") return load_gguf_spm(file);
  fail("{}: tokenizer model '{}' is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)",
       file.path(), model);
}

}  // namespace polar
