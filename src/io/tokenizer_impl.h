// Internal to the tokenizer sources: what the format readers (GGUF in tokenizer.cpp, Hugging Face files in
// tokenizer_hf.cpp) hand to the two algorithms (tokenizer_bpe.cpp, tokenizer_spm.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "io/tokenizer.h"

namespace polar::detail {

// A hash map keyed by std::string that can be searched with a std::string_view, without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

struct VocabSpec {
  std::string source;               // file (and key) named in error messages
  std::vector<std::string> tokens;  // entries as stored (byte-level BPE: in the GPT-2 byte alphabet)
  std::vector<TokenType> types;     // same length as tokens
  int32_t bos = -1, eos = -1, unk = -1;
  bool add_bos = false;
  std::vector<int32_t> eog;         // end-of-generation ids besides eos (e.g. GGUF eot_token_id)
};

// Length of the UTF-8 sequence that lead byte c starts; 1 for bytes that cannot start one.
inline size_t utf8_lead_length(uint8_t c) {
  if (c >= 0xF0 && c <= 0xF4) return 4;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  return 1;
}

// GPT-2's pre-tokenizer regex (Hugging Face ByteLevel with use_regex, GGUF pre "gpt2"/"gpt-2").
inline constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// One stage of a byte-level BPE pre-tokenizer. Each stage refines every piece of the previous one.
struct PreTokenizerStep {
  enum class Kind {
    kSplit,        // matches of `pattern` and the stretches between them become separate pieces
    kPrefixSpace,  // prepend a space to pieces that do not start with one (HF ByteLevel add_prefix_space)
  };
  Kind kind;
  std::string pattern;  // PCRE2 syntax, compiled with UTF and UCP
};

struct BpeSpec : VocabSpec {
  std::vector<std::pair<std::string, std::string>> merges;  // by rank, as vocabulary entries
  std::vector<PreTokenizerStep> pre;
  // Emit a pre-token that is itself a vocabulary entry as that token, without merging (Llama 3).
  bool ignore_merges = false;
};

struct SpmSpec : VocabSpec {
  std::vector<float> scores;    // same length as tokens; a higher score merges first
  bool add_space_prefix = true;
};

std::unique_ptr<Tokenizer> make_bpe_tokenizer(BpeSpec spec);
std::unique_ptr<Tokenizer> make_spm_tokenizer(SpmSpec spec);

}  // namespace polar::detail
