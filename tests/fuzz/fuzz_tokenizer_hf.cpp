// Hugging Face tokenizer directories (load_tokenizer_dir), then encoding and decoding the input itself with
// whatever tokenizer loaded. The input is the directory's files separated by kSeparator lines, after a first
// byte naming the layout:
//   'j': tokenizer.json, tokenizer_config.json, special_tokens_map.json, config.json
//   'v': vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, config.json
// Files beyond those given are absent; an empty one is written empty.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/tokenizer.h"

using namespace polar;

namespace {

constexpr std::string_view kSeparator = "\n=====\n";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1 || (data[0] != 'j' && data[0] != 'v')) return 0;
  static const std::vector<std::string> kJsonLayout = {"tokenizer.json", "tokenizer_config.json",
                                                       "special_tokens_map.json", "config.json"};
  static const std::vector<std::string> kVocabLayout = {"vocab.json", "merges.txt", "tokenizer_config.json",
                                                        "special_tokens_map.json", "config.json"};
  const std::vector<std::string>& layout = data[0] == 'j' ? kJsonLayout : kVocabLayout;
  const std::string_view input = fuzz::as_text(data + 1, size - 1);

  namespace fs = std::filesystem;
  const fs::path dir = fuzz::scratch_dir() / "tokenizer";
  fs::remove_all(dir);
  fs::create_directories(dir);
  size_t pos = 0;
  for (size_t i = 0; i < layout.size() && pos <= input.size(); ++i) {
    size_t end = input.find(kSeparator, pos);
    if (end == std::string_view::npos) end = input.size();
    fuzz::write_file("tokenizer/" + layout[i], input.substr(pos, end - pos));
    pos = end + kSeparator.size();
  }
  try {
    const std::unique_ptr<Tokenizer> tok = load_tokenizer_dir(dir.string());
    const std::vector<int32_t> ids = tok->encode(input, true);
    for (int32_t id : ids) fuzz::require(id >= 0 && id < tok->vocab_size(), "encode gives ids in the vocabulary");
    tok->decode(ids);
    tok->decode(ids, true);
  } catch (const Error&) {
  }
  return 0;
}
