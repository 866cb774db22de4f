// SentencePiece BPE with byte fallback, as llama.cpp runs it for GGUF "llama" vocabularies (and as
// sentencepiece's bpe_model.cc does): spaces become U+2581 "▁", a "▁" dummy prefix starts the text,
// the text is split into UTF-8 characters, and the adjacent pair whose concatenation is the
// highest-scoring piece is merged (ties: leftmost) until no pair forms a piece. What is left and is not a
// piece becomes byte tokens <0xXX>.
#include <array>
#include <charconv>
#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "io/tokenizer_impl.h"

namespace polar::detail {
namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  for (size_t pos = 0;;) {
    size_t hit = s.find(from, pos);
    out += s.substr(pos, hit - pos);
    if (hit == std::string_view::npos) return out;
    out += to;
    pos = hit + from.size();
  }
}

// Length of the character at s[pos]. An invalid or truncated sequence counts as one byte, so that it
// cannot swallow the start of the next character (e.g. of the "▁" standing for a following space).
size_t char_length(std::string_view s, size_t pos) {
  size_t n = utf8_lead_length(static_cast<uint8_t>(s[pos]));
  if (pos + n > s.size()) return 1;
  for (size_t i = 1; i < n; ++i)
    if ((static_cast<uint8_t>(s[pos + i]) & 0xC0) != 0x80) return 1;
  return n;
}

class SpmTokenizer final : public Tokenizer {
 public:
  explicit SpmTokenizer(SpmSpec spec) : scores_(std::move(spec.scores)), add_space_prefix_(spec.add_space_prefix) {
    byte_token_.fill(-1);
    std::vector<std::string> bytes(spec.tokens.size());
    for (size_t i = 0; i < spec.tokens.size(); ++i) {
      const std::string& t = spec.tokens[i];
      auto id = static_cast<int32_t>(i);
      switch (spec.types[i]) {
        case TokenType::kByte: {
          uint8_t value = 0;
          check(t.size() == 6 && t.starts_with("<0x") && t.ends_with(">") &&
                    std::from_chars(t.data() + 3, t.data() + 5, value, 16).ptr == t.data() + 5,
                "{}: byte token {} is '{}', expected <0xXX>", spec.source, i, t);
          byte_token_[value] = id;
          bytes[i] = std::string(1, static_cast<char>(value));
          break;
        }
        case TokenType::kControl:
          bytes[i] = t;
          break;
        default:
          bytes[i] = replace_all(t, kSpace, " ");
          // sentencepiece merges into normal, user-defined and unused pieces; control, unknown and byte
          // pieces only ever come from their own rules.
          if (spec.types[i] != TokenType::kUnknown) piece_to_id_[t] = id;
      }
    }
    set_vocab(std::move(spec), std::move(bytes));
  }

  std::string kind() const override { return "spm"; }

 protected:
  bool strips_leading_space() const override { return add_space_prefix_; }

  void encode_text(std::string_view raw, std::vector<int32_t>& out) const override {
    // Every stretch gets the dummy prefix, also one that follows a special token, as in llama.cpp.
    std::string text = (add_space_prefix_ ? std::string(kSpace) : "") + replace_all(raw, " ", kSpace);

    struct Symbol {
      uint32_t start, len;  // bytes of text; len 0 once merged into the symbol on its left
      int32_t prev, next;   // neighbours, -1 at the ends
    };
    std::vector<Symbol> syms;
    for (size_t pos = 0; pos < text.size();) {
      auto len = static_cast<uint32_t>(char_length(text, pos));
      auto i = static_cast<int32_t>(syms.size());
      syms.push_back({static_cast<uint32_t>(pos), len, i - 1, pos + len < text.size() ? i + 1 : -1});
      pos += len;
    }

    struct Candidate {
      float score;
      int32_t left, right;
      uint32_t len;  // of the merged piece, to tell a stale candidate from a live one
      int32_t id;    // of the merged piece
      bool operator<(const Candidate& o) const {  // priority: higher score, then leftmost
        return score < o.score || (score == o.score && left > o.left);
      }
    };
    std::priority_queue<Candidate> queue;
    // An unused piece is merged like any other but split back into its halves at the end (sentencepiece's
    // resegmentation): start << 32 | length -> length of the left half.
    std::unordered_map<uint64_t, uint32_t> unused_splits;
    auto consider = [&](int32_t left, int32_t right) {
      if (left < 0 || right < 0) return;
      uint32_t len = syms[left].len + syms[right].len;
      auto it = piece_to_id_.find(std::string_view(text).substr(syms[left].start, len));
      if (it != piece_to_id_.end()) queue.push({scores_[it->second], left, right, len, it->second});
    };
    for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) consider(i - 1, i);

    while (!queue.empty()) {
      Candidate c = queue.top();
      queue.pop();
      Symbol& l = syms[c.left];
      Symbol& r = syms[c.right];
      if (l.len == 0 || r.len == 0 || l.next != c.right || l.len + r.len != c.len) continue;  // stale
      if (token_type(c.id) == TokenType::kUnused)
        unused_splits[uint64_t{l.start} << 32 | c.len] = l.len;
      l.len = c.len;
      r.len = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = c.left;
      consider(l.prev, c.left);
      consider(c.left, l.next);
    }

    for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next)
      emit(text, syms[i].start, syms[i].len, unused_splits, out);
  }

 private:
  void emit(std::string_view text, uint32_t start, uint32_t len,
            const std::unordered_map<uint64_t, uint32_t>& unused_splits, std::vector<int32_t>& out) const {
    auto it = piece_to_id_.find(text.substr(start, len));
    if (it != piece_to_id_.end()) {
      auto split = unused_splits.find(uint64_t{start} << 32 | len);
      if (split == unused_splits.end()) {
        out.push_back(it->second);
      } else {
        emit(text, start, split->second, unused_splits, out);
        emit(text, start + split->second, len - split->second, unused_splits, out);
      }
      return;
    }
    // Byte fallback. A vocabulary without byte tokens gets the unknown token for each byte (sentencepiece
    // would give one per run of unknown characters; llama.cpp refuses such vocabularies).
    for (uint32_t i = start; i < start + len; ++i) {
      int32_t id = byte_token_[static_cast<uint8_t>(text[i])];
      if (id < 0) id = unk_id_;
      check(id >= 0, "cannot encode byte 0x{:02X}: the vocabulary has no byte token for it and no unknown token",
            static_cast<uint8_t>(text[i]));
      out.push_back(id);
    }
  }

  StringMap<int32_t> piece_to_id_;  // pieces merging may produce
  std::vector<float> scores_;
  std::array<int32_t, 256> byte_token_;  // <0xXX> token of each byte, -1 if the vocabulary lacks it
  bool add_space_prefix_;
};

}  // namespace

std::unique_ptr<Tokenizer> make_spm_tokenizer(SpmSpec spec) { return std::make_unique<SpmTokenizer>(std::move(spec)); }

}  // namespace polar::detail
