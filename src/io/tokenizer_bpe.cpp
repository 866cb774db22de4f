// Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM...). The text is cut into pre-tokens by regexes; each
// pre-token starts as one token per byte (vocabulary entries spell bytes in GPT-2's printable byte
// alphabet), and the adjacent pair with the lowest merge rank is merged (ties: leftmost) until no listed
// merge applies, as Hugging Face tokenizers and llama.cpp do.
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "io/tokenizer_impl.h"

namespace polar::detail {
namespace {

// GPT-2's byte alphabet: bytes 33..126, 161..172 and 174..255 stand for themselves, the other 68 for
// U+0100 onwards in byte order, so every byte has a printable, non-space character.
struct ByteAlphabet {
  std::array<std::string, 256> encode;  // byte -> UTF-8 of its character
  std::array<int16_t, 256 + 68> decode;  // code point -> byte, -1 for code points outside the alphabet

  ByteAlphabet() {
    decode.fill(-1);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      int cp = self ? b : next++;
      encode[b] = cp < 0x80 ? std::string(1, static_cast<char>(cp))
                            : std::string{static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
      decode[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

// The bytes a vocabulary entry spells. Characters outside the byte alphabet (which byte-level
// vocabularies should not hold) are kept as their UTF-8.
std::string entry_bytes(std::string_view entry) {
  std::string out;
  for (size_t i = 0; i < entry.size();) {
    auto c0 = static_cast<uint8_t>(entry[i]);
    if (c0 >= 0xC0 && c0 < 0xE0 && i + 1 < entry.size()) {
      int cp = (c0 & 0x1F) << 6 | (static_cast<uint8_t>(entry[i + 1]) & 0x3F);
      if (cp < static_cast<int>(alphabet().decode.size()) && alphabet().decode[cp] >= 0) {
        out += static_cast<char>(alphabet().decode[cp]);
        i += 2;
        continue;
      }
    }
    if (c0 < 0x80 && alphabet().decode[c0] >= 0) {
      out += entry[i++];
      continue;
    }
    // Not in the alphabet: copy the whole UTF-8 sequence (or the stray byte) unchanged.
    size_t n = utf8_lead_length(c0);
    out += entry.substr(i, n);
    i += n;
  }
  return out;
}

// A compiled PCRE2 pattern. Patterns run on raw input, which may be invalid UTF-8: with
// PCRE2_MATCH_INVALID_UTF invalid sequences never match, so they end up in the pieces between matches.
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& source) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &offset, nullptr));
    if (!code_) {
      std::array<PCRE2_UCHAR, 256> msg{};
      pcre2_get_error_message(err, msg.data(), msg.size());
      fail("{}: pre-tokenizer regex '{}' does not compile at offset {}: {}", source, pattern, offset,
           reinterpret_cast<const char*>(msg.data()));
    }
    // JIT makes matching several times faster; where it is unavailable the interpreter gives the same results.
    pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE);
  }
  const pcre2_code* code() const { return code_.get(); }

 private:
  std::unique_ptr<pcre2_code, decltype(&pcre2_code_free)> code_{nullptr, pcre2_code_free};
};

using MatchData = std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)>;

class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(BpeSpec spec) : source_(spec.source), ignore_merges_(spec.ignore_merges) {
    const ByteAlphabet& abc = alphabet();
    StringMap<int32_t> entry_to_id;  // later duplicates win, as in llama.cpp
    std::vector<std::string> bytes(spec.tokens.size());
    for (size_t i = 0; i < spec.tokens.size(); ++i) {
      auto id = static_cast<int32_t>(i);
      entry_to_id[spec.tokens[i]] = id;
      // Added tokens are stored as the text they stand for, not in the byte alphabet.
      bool literal = spec.types[i] == TokenType::kControl || spec.types[i] == TokenType::kUserDefined;
      bytes[i] = literal ? spec.tokens[i] : entry_bytes(spec.tokens[i]);
      if (ignore_merges_ && !literal) whole_word_[bytes[i]] = id;
    }
    for (int b = 0; b < 256; ++b) {
      auto it = entry_to_id.find(abc.encode[b]);
      byte_token_[b] = it == entry_to_id.end() ? -1 : it->second;
    }
    auto lookup = [&](const std::string& entry, size_t rank) {
      auto it = entry_to_id.find(entry);
      check(it != entry_to_id.end(), "{}: merge {} ('{} {}') needs '{}', which is not in the vocabulary", source_, rank,
            spec.merges[rank].first, spec.merges[rank].second, entry);
      return it->second;
    };
    for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
      const auto& [a, b] = spec.merges[rank];
      uint64_t key = pair_key(lookup(a, rank), lookup(b, rank));
      merges_.emplace(key, Merge{static_cast<int32_t>(rank), lookup(a + b, rank)});  // the first listing wins
    }
    for (const auto& step : spec.pre)
      steps_.push_back({step.kind, step.kind == PreTokenizerStep::Kind::kSplit
                                       ? std::make_unique<Regex>(step.pattern, source_)
                                       : nullptr});
    set_vocab(std::move(spec), std::move(bytes));
  }

  std::string kind() const override { return "bpe"; }

 protected:
  void encode_text(std::string_view text, std::vector<int32_t>& out) const override {
    std::vector<MatchData> match_data;  // per step; PCRE2 needs one per thread, so one per call
    for (const auto& step : steps_)
      match_data.emplace_back(step.regex ? pcre2_match_data_create_from_pattern(step.regex->code(), nullptr) : nullptr,
                              pcre2_match_data_free);
    // Pre-tokens repeat a lot in running text; each distinct one is merged once per call. The cache maps a
    // pre-token to where its tokens were first written into `out` (start, count).
    StringMap<std::pair<size_t, size_t>> cache;
    pre_tokenize(0, text, match_data, [&](std::string_view word) {
      if (auto it = cache.find(word); it != cache.end()) {
        auto [start, count] = it->second;
        for (size_t i = start; i < start + count; ++i) {
          int32_t id = out[i];  // copied first: push_back may reallocate
          out.push_back(id);
        }
        return;
      }
      size_t start = out.size();
      encode_word(word, out);
      cache.emplace(word, std::pair(start, out.size() - start));
    });
  }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // of the merged token
  };
  struct Step {
    PreTokenizerStep::Kind kind;
    std::unique_ptr<Regex> regex;  // kSplit only
  };

  static uint64_t pair_key(int32_t left, int32_t right) {
    return uint64_t{static_cast<uint32_t>(left)} << 32 | static_cast<uint32_t>(right);
  }

  // Runs steps [step, end) over `piece`, calling emit for each final pre-token.
  template <typename Emit>
  void pre_tokenize(size_t step, std::string_view piece, std::vector<MatchData>& md, const Emit& emit) const {
    if (piece.empty()) return;
    if (step == steps_.size()) return emit(piece);
    if (steps_[step].kind == PreTokenizerStep::Kind::kPrefixSpace) {
      if (piece.starts_with(' ')) return pre_tokenize(step + 1, piece, md, emit);
      std::string spaced(1, ' ');
      spaced.append(piece);
      return pre_tokenize(step + 1, spaced, md, emit);
    }
    const pcre2_code* code = steps_[step].regex->code();
    pcre2_match_data* m = md[step].get();
    auto next = [&](std::string_view p) { pre_tokenize(step + 1, p, md, emit); };
    size_t done = 0;  // bytes of piece already handed on
    for (size_t pos = 0; pos < piece.size();) {
      int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(), pos, 0, m, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        std::array<PCRE2_UCHAR, 256> msg{};
        pcre2_get_error_message(rc, msg.data(), msg.size());
        fail("{}: pre-tokenizer regex failed: {}", source_, reinterpret_cast<const char*>(msg.data()));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m);
      size_t start = ov[0], end = ov[1];
      if (end <= start) {  // an empty match splits nothing; search again from the next character
        pos = start + 1;
        while (pos < piece.size() && (static_cast<uint8_t>(piece[pos]) & 0xC0) == 0x80) ++pos;
        continue;
      }
      if (start > done) next(piece.substr(done, start - done));
      next(piece.substr(start, end - start));
      done = pos = end;
    }
    if (done < piece.size()) next(piece.substr(done));
  }

  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (ignore_merges_) {
      auto it = whole_word_.find(word);
      if (it != whole_word_.end()) return out.push_back(it->second);
    }
    struct Symbol {
      int32_t id;  // -1 once merged into the symbol on its left
      int32_t prev, next;
    };
    std::vector<Symbol> syms;
    syms.reserve(word.size());
    for (char c : word) {
      int32_t id = byte_token_[static_cast<uint8_t>(c)];
      // A byte the vocabulary cannot spell is left out when there is no unknown token, as Hugging Face
      // and llama.cpp do (SmolLM2 lacks 21 bytes, e.g. 0x1D and 0xF1).
      if (id < 0) id = unk_id_;
      if (id < 0) continue;
      auto n = static_cast<int32_t>(syms.size());
      syms.push_back({id, n - 1, n + 1});
    }
    if (syms.empty()) return;
    syms.back().next = -1;

    struct Candidate {
      int32_t rank, left;
      int32_t left_id, right_id;  // the pair as it was when queued; a merge since makes it stale
      int32_t merged_id;
      bool operator<(const Candidate& o) const {  // priority: lower rank, then leftmost
        return rank > o.rank || (rank == o.rank && left > o.left);
      }
    };
    std::priority_queue<Candidate> queue;
    auto consider = [&](int32_t left) {
      if (left < 0 || syms[left].next < 0) return;
      int32_t a = syms[left].id, b = syms[syms[left].next].id;
      auto it = merges_.find(pair_key(a, b));
      if (it != merges_.end()) queue.push({it->second.rank, left, a, b, it->second.id});
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) consider(i);

    while (!queue.empty()) {
      Candidate c = queue.top();
      queue.pop();
      Symbol& l = syms[c.left];
      // A symbol's token only grows, so unchanged ids on both sides mean the pair is unchanged.
      if (l.id != c.left_id || l.next < 0 || syms[l.next].id != c.right_id) continue;
      Symbol& r = syms[l.next];
      l.id = c.merged_id;
      r.id = -1;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = c.left;
      consider(l.prev);
      consider(c.left);
    }
    for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
  }

  std::string source_;
  bool ignore_merges_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id, right id) -> rank and result
  std::array<int32_t, 256> byte_token_;          // the token spelling each single byte, -1 if none
  StringMap<int32_t> whole_word_;                // ignore_merges: the bytes of each ordinary token -> id
  std::vector<Step> steps_;                      // the pre-tokenizer
};

}  // namespace

std::unique_ptr<Tokenizer> make_bpe_tokenizer(BpeSpec spec) { return std::make_unique<BpeTokenizer>(std::move(spec)); }

}  // namespace polar::detail
