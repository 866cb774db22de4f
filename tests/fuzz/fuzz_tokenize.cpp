// Encoding and decoding arbitrary text with real vocabularies: stories260K's SentencePiece tokenizer (from
// the shared GGUF) and a small byte-level BPE covering every byte, with Llama 3's pre-tokenizer. Byte-level
// BPE with every byte in the vocabulary is lossless, so decode(encode(text)) must give the text back.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/gguf.h"
#include "io/tokenizer.h"
#include "io/tokenizer_impl.h"

using namespace polar;

namespace {

std::unique_ptr<Tokenizer> spm, bpe;

std::string shared_path(const std::string& rel) {
  const char* env = std::getenv("POLAR_SHARED");
  return (std::filesystem::path(env && *env ? env : POLAR_DEFAULT_SHARED) / rel).string();
}

// GPT-2's byte alphabet spelling of byte b: 33..126, 161..172 and 174..255 stand for themselves, the others
// for U+0100 onwards in byte order (what tokenizer_bpe.cpp decodes).
std::string byte_entry(int b) {
  auto self = [](int c) { return (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255); };
  int cp = b;
  if (!self(b)) {
    cp = 256;
    for (int c = 0; c < b; ++c) cp += !self(c);
  }
  return cp < 0x80 ? std::string(1, static_cast<char>(cp))
                   : std::string{static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
}

std::unique_ptr<Tokenizer> make_bpe() {
  detail::BpeSpec spec;
  spec.source = "fuzz byte-level BPE";
  for (int b = 0; b < 256; ++b) spec.tokens.push_back(byte_entry(b));
  const std::string sp = byte_entry(' ');
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"t", "h"}, {"th", "e"}, {sp, "the"}, {"i", "n"}, {sp, "t"}, {"e", "r"}, {sp, "in"}, {"a", "n"}, {"o", "n"}};
  for (const auto& [a, b] : merges) {
    spec.merges.emplace_back(a, b);
    spec.tokens.push_back(a + b);
  }
  spec.tokens.push_back("<|begin_of_text|>");
  spec.tokens.push_back("<|eot_id|>");
  spec.types.assign(spec.tokens.size(), TokenType::kNormal);
  spec.types[spec.tokens.size() - 2] = spec.types[spec.tokens.size() - 1] = TokenType::kControl;
  spec.bos = static_cast<int32_t>(spec.tokens.size() - 2);
  spec.eos = static_cast<int32_t>(spec.tokens.size() - 1);
  spec.pre.push_back({detail::PreTokenizerStep::Kind::kSplit,
                      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"});
  return detail::make_bpe_tokenizer(std::move(spec));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  try {
    spm = load_tokenizer(gguf::File::open(shared_path("models/stories260K/stories260K.gguf")));
    bpe = make_bpe();
  } catch (const Error& e) {
    std::fprintf(stderr, "fuzz_tokenize: %s\n", e.what());
    std::abort();
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text = fuzz::as_text(data, size);
  for (const Tokenizer* tok : {spm.get(), bpe.get()}) {
    // The BPE round trip below holds without BOS (which decodes, kept, to its text).
    const std::vector<int32_t> ids = tok->encode(text, tok == spm.get() && size % 2 == 0);
    for (int32_t id : ids) fuzz::require(id >= 0 && id < tok->vocab_size(), "encode gives ids in the vocabulary");
    const std::string back = tok->decode(ids, true);
    if (tok == bpe.get()) fuzz::require(back == text, "byte-level BPE with every byte round-trips");
    StreamDecoder stream(*tok, true);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    fuzz::require(streamed == back, "streamed decoding equals decoding");
  }
  return 0;
}
