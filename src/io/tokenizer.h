// Tokenizers: byte-level BPE (GPT-2 family: HF tokenizer.json, vocab.json + merges.txt, GGUF "gpt2") and
// SentencePiece-style BPE with byte fallback (GGUF "llama"). Written by hand: no maintained C++ library in
// Debian or PyPI reads these formats (see README); pre-tokenizer regexes run on PCRE2.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace polar {
namespace gguf { class File; }

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Encode text. Special/control tokens written literally in the text (e.g. "<|im_start|>") are matched
  // and emitted as their ids, like Hugging Face tokenizers do. add_bos prepends BOS when the model has one.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;
  // Bytes of the concatenated tokens (SPM: the dummy-prefix space of the first token is removed when
  // the sequence starts with it). Control tokens (BOS/EOS/...) decode to nothing unless keep_special.
  virtual std::string decode(const std::vector<int32_t>& ids, bool keep_special = false) const = 0;
  // Raw bytes of one token (byte-fallback tokens become their byte; control tokens their text).
  virtual std::string token_bytes(int32_t id) const = 0;
  virtual const std::string& token_text(int32_t id) const = 0;  // the vocabulary entry as stored

  virtual std::string kind() const = 0;  // "bpe" (byte-level) or "spm"
  int32_t vocab_size() const { return vocab_size_; }
  int32_t bos_id() const { return bos_id_; }  // -1 if none
  int32_t eos_id() const { return eos_id_; }  // -1 if none
  bool add_bos_default() const { return add_bos_default_; }
  bool is_eos(int32_t id) const;  // EOS or any end-of-generation token (e.g. <|im_end|>, <|endoftext|>)

 protected:
  int32_t vocab_size_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool add_bos_default_ = false;
  std::vector<int32_t> eog_ids_;
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
  explicit StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int32_t id);
  std::string flush();  // whatever is left (invalid UTF-8 bytes are emitted as-is)

 private:
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  size_t emitted_ = 0;
};

}  // namespace polar
