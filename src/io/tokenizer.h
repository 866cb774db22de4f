// Tokenizers: byte-level BPE (GPT-2 family: HF tokenizer.json, vocab.json + merges.txt, GGUF "gpt2") and
// SentencePiece-style BPE with byte fallback (GGUF "llama"). Written by hand: no maintained C++ library in
// Debian or PyPI reads these formats (see README); pre-tokenizer regexes run on PCRE2.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace polar {
namespace gguf { class File; }
namespace detail { struct VocabSpec; }

// Token types, numbered as GGUF's tokenizer.ggml.token_type (and SentencePiece's piece types).
enum class TokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,      // BOS, EOS, chat markers: decode to nothing unless asked to keep them
  kUserDefined = 4,  // added tokens that are text (matched literally, decoded as written)
  kUnused = 5,
  kByte = 6,         // SentencePiece byte fallback "<0xXX>"
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Encode text. Control, user-defined and unknown tokens written literally in the text (e.g.
  // "<|im_start|>") are matched (leftmost, longest first) and emitted as their ids, like Hugging Face
  // tokenizers do; the text between them is tokenized normally. add_bos prepends BOS when the model has one.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  // Bytes of the concatenated tokens (SPM: the dummy-prefix space of the first text token is removed).
  // Control tokens (BOS/EOS/...) decode to nothing unless keep_special. Ids out of range are an error.
  std::string decode(const std::vector<int32_t>& ids, bool keep_special = false) const;
  // Incremental decoding: the bytes that `id` adds to the ids already decoded with the same state.
  struct DecodeState {
    bool text_started = false;  // a token has produced output (SPM strips the dummy prefix before that)
  };
  std::string decode_next(int32_t id, DecodeState& state, bool keep_special = false) const;
  // Raw bytes of one token (byte-fallback tokens become their byte; control tokens their text).
  const std::string& token_bytes(int32_t id) const;
  const std::string& token_text(int32_t id) const;  // the vocabulary entry as stored
  TokenType token_type(int32_t id) const;

  virtual std::string kind() const = 0;  // "bpe" (byte-level) or "spm"
  int32_t vocab_size() const { return vocab_size_; }
  int32_t bos_id() const { return bos_id_; }  // -1 if none
  int32_t eos_id() const { return eos_id_; }  // -1 if none
  bool add_bos_default() const { return add_bos_default_; }
  // The text of the BOS / EOS token as written in a prompt (the vocabulary entry, which encode matches
  // literally): what a chat template's bos_token / eos_token is. Empty if the model has none.
  std::string bos_text() const { return bos_id_ < 0 ? std::string() : token_text(bos_id_); }
  std::string eos_text() const { return eos_id_ < 0 ? std::string() : token_text(eos_id_); }
  bool is_eos(int32_t id) const;  // EOS or any end-of-generation token (e.g. <|im_end|>, <|endoftext|>)

 protected:
  // Appends the tokens of a non-empty stretch of text that holds no literally written special token: the
  // whole input, or what lies between (and around) the special tokens written in it.
  virtual void encode_text(std::string_view text, std::vector<int32_t>& out) const = 0;
  // Whether decoding drops the leading space of the first text token (SPM's dummy prefix).
  virtual bool strips_leading_space() const { return false; }
  // Takes the vocabulary and special ids (validated; polar::Error names spec.source), and `bytes`, what
  // each token decodes to. Builds the literal-match table and the end-of-generation set.
  void set_vocab(detail::VocabSpec&& spec, std::vector<std::string> bytes);

  int32_t vocab_size_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t unk_id_ = -1;
  bool add_bos_default_ = false;

 private:
  int32_t check_id(int32_t id) const;  // id if in range, else polar::Error
  int32_t match_literal(std::string_view rest) const;  // id of the longest literal token prefixing rest, or -1

  std::vector<std::string> text_;   // vocabulary entries as stored
  std::vector<std::string> bytes_;  // what each token decodes to
  std::vector<TokenType> type_;
  std::vector<int32_t> eog_ids_;    // end-of-generation tokens besides eos_id_
  // Tokens matched literally in the input, bucketed by first byte, longest first within a bucket.
  std::array<std::vector<int32_t>, 256> literal_by_first_byte_;
};

// From a GGUF file's tokenizer.ggml.* metadata (model "gpt2" or "llama").
std::unique_ptr<Tokenizer> load_tokenizer(const gguf::File& file);
// From a Hugging Face model directory: tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json
// / special_tokens_map.json / config.json for BOS/EOS where present).
std::unique_ptr<Tokenizer> load_tokenizer_dir(const std::string& dir);

// Streaming detokenisation: push ids one at a time, get back only complete UTF-8 text, so a multi-byte
// character split across tokens is printed once whole.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool keep_special = false) : tok_(tok), keep_special_(keep_special) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is left (an incomplete UTF-8 sequence is emitted as-is)

 private:
  const Tokenizer& tok_;
  bool keep_special_;
  Tokenizer::DecodeState state_;
  std::string pending_;  // the tail of an incomplete UTF-8 sequence, held back until it completes
};

}  // namespace polar
