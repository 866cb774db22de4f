// Hugging Face tokenizer files: tokenizer.json (the `tokenizers` library's format), or GPT-2's original
// vocab.json + merges.txt. BOS/EOS come from tokenizer_config.json, special_tokens_map.json and config.json.
// Only byte-level BPE is read; anything else (WordPiece, Unigram, SentencePiece-style BPE, normalizers) is
// refused with an error naming it rather than tokenized differently from the original.
#include <cctype>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json.h"
#include "io/tokenizer_impl.h"

namespace polar {

using detail::BpeSpec;
using detail::PreTokenizerStep;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

json read_json(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  check(f.good(), "{}: cannot open", path.string());
  try {
    return parse_json(f);
  } catch (const json::exception& e) {  // a parse_error, or out_of_range for a number beyond double's range
    fail("{}: not valid JSON: {}", path.string(), e.what());
  }
}

std::optional<json> read_json_if_present(const fs::path& path) {
  if (!fs::exists(path)) return std::nullopt;
  return read_json(path);
}

// BOS/EOS as the transformers configuration files give them.
struct HfSpecials {
  std::optional<std::string> bos, eos, unk;  // token texts
  std::optional<bool> add_bos;
  bool add_prefix_space = false;      // tokenizer_config.json, for vocab.json + merges.txt
  std::optional<int64_t> config_bos;  // config.json ids, used when no text names the token
  std::vector<int64_t> config_eos;    // config.json may list several end-of-generation ids
  json added_tokens_decoder;          // tokenizer_config.json: "id" -> {"content", "special"}
};

// A special token as transformers writes it: "text", {"content": "text", ...} or null.
std::optional<std::string> token_content(const json& j, const std::string& where) {
  if (j.is_null()) return std::nullopt;
  if (j.is_string()) return j.get<std::string>();
  check(j.is_object() && j.contains("content") && j["content"].is_string(),
        "{}: a special token is neither a string nor an object with \"content\": {}", where, j.dump());
  return j["content"].get<std::string>();
}

HfSpecials read_specials(const fs::path& dir) {
  HfSpecials sp;
  json config = read_json_if_present(dir / "tokenizer_config.json").value_or(json::object());
  json map = read_json_if_present(dir / "special_tokens_map.json").value_or(json::object());
  // tokenizer_config.json takes precedence; special_tokens_map.json only fills gaps.
  for (const auto& [j, name] : {std::pair{&config, "tokenizer_config.json"}, {&map, "special_tokens_map.json"}}) {
    if (!j->is_object()) continue;
    for (auto [key, field] : {std::pair{"bos_token", &sp.bos}, {"eos_token", &sp.eos}, {"unk_token", &sp.unk}})
      if (!*field && j->contains(key)) *field = token_content((*j)[key], (dir / name).string());
  }
  if (config.is_object()) {
    if (config.contains("add_bos_token") && config["add_bos_token"].is_boolean())
      sp.add_bos = config["add_bos_token"].get<bool>();
    sp.add_prefix_space = config.contains("add_prefix_space") && config["add_prefix_space"].is_boolean() &&
                          config["add_prefix_space"].get<bool>();
    if (config.contains("added_tokens_decoder")) sp.added_tokens_decoder = config["added_tokens_decoder"];
  }
  if (auto model = read_json_if_present(dir / "config.json"); model && model->is_object()) {
    if (model->contains("bos_token_id") && (*model)["bos_token_id"].is_number_integer())
      sp.config_bos = (*model)["bos_token_id"].get<int64_t>();
    const json eos = model->value("eos_token_id", json());
    if (eos.is_number_integer()) sp.config_eos.push_back(eos.get<int64_t>());
    if (eos.is_array())
      for (const auto& e : eos)
        if (e.is_number_integer()) sp.config_eos.push_back(e.get<int64_t>());
  }
  return sp;
}

// Puts a token at `id`, growing the vocabulary as needed (ids may have gaps, which stay unused).
void put_token(BpeSpec& spec, int64_t id, std::string text, TokenType type) {
  // Real vocabularies stay far below this; a bound keeps a corrupt id from allocating gigabytes.
  check(id >= 0 && id < (int64_t{1} << 24), "{}: token id {} for '{}' is out of range", spec.source, id, text);
  if (static_cast<size_t>(id) >= spec.tokens.size()) {
    spec.tokens.resize(id + 1);
    spec.types.resize(id + 1, TokenType::kUnused);
  }
  spec.tokens[id] = std::move(text);
  spec.types[id] = type;
}

void put_vocab(BpeSpec& spec, const json& vocab, const std::string& where) {
  check(vocab.is_object(), "{}: the vocabulary is not a JSON object of token -> id", where);
  for (const auto& [text, id] : vocab.items()) {
    check(id.is_number_integer(), "{}: the id of token '{}' is not an integer", where, text);
    put_token(spec, id.get<int64_t>(), text, TokenType::kNormal);
  }
}

int32_t find_token(const BpeSpec& spec, const std::string& text) {
  for (size_t i = 0; i < spec.tokens.size(); ++i)
    if (spec.tokens[i] == text && spec.types[i] != TokenType::kUnused) return static_cast<int32_t>(i);
  return -1;
}

// Resolves BOS/EOS/UNK; template_bos is the BOS a tokenizer.json post-processor adds, if any.
void apply_specials(BpeSpec& spec, const HfSpecials& sp, const std::optional<std::string>& template_bos,
                    const std::optional<std::string>& model_unk) {
  auto id_of = [&](const std::string& text, const char* what) {
    int32_t id = find_token(spec, text);
    check(id >= 0, "{}: {} '{}' is not in the vocabulary", spec.source, what, text);
    return id;
  };
  auto config_id = [&](int64_t id, const char* what) {
    check(id >= 0 && static_cast<size_t>(id) < spec.tokens.size(), "{}: config.json {} {} is out of range",
          spec.source, what, id);
    return static_cast<int32_t>(id);
  };
  if (auto bos = sp.bos ? sp.bos : template_bos) spec.bos = id_of(*bos, "bos_token");
  else if (sp.config_bos) spec.bos = config_id(*sp.config_bos, "bos_token_id");
  if (sp.eos) spec.eos = id_of(*sp.eos, "eos_token");
  for (int64_t id : sp.config_eos) {
    if (spec.eos < 0) spec.eos = config_id(id, "eos_token_id");
    spec.eog.push_back(config_id(id, "eos_token_id"));
  }
  if (auto unk = model_unk ? model_unk : sp.unk) spec.unk = id_of(*unk, "unk_token");
  spec.add_bos = sp.add_bos.value_or(template_bos.has_value());
  // GPT-2 keeps <|endoftext|> as an ordinary vocabulary entry; it must still be matched whole and be
  // left out of decoded text.
  for (int32_t id : {spec.bos, spec.eos})
    if (id >= 0 && spec.types[id] == TokenType::kNormal) spec.types[id] = TokenType::kControl;
  if (spec.unk >= 0 && spec.types[spec.unk] == TokenType::kNormal) spec.types[spec.unk] = TokenType::kUnknown;
}

// PCRE2 pattern matching `s` literally: a backslash before a non-alphanumeric ASCII character always
// means that character.
std::string quote_regex(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (static_cast<uint8_t>(c) < 0x80 && !std::isalnum(static_cast<unsigned char>(c))) out += '\\';
    out += c;
  }
  return out;
}

void parse_pre_tokenizer(const json& j, BpeSpec& spec, bool& byte_level) {
  if (j.is_null()) return;
  const std::string type = j.at("type").get<std::string>();
  using Kind = PreTokenizerStep::Kind;
  if (type == "Sequence") {
    for (const auto& p : j.at("pretokenizers")) parse_pre_tokenizer(p, spec, byte_level);
  } else if (type == "ByteLevel") {
    byte_level = true;
    if (j.value("add_prefix_space", true)) spec.pre.push_back({Kind::kPrefixSpace, ""});
    if (j.value("use_regex", true)) spec.pre.push_back({Kind::kSplit, detail::kGpt2Pattern});
  } else if (type == "Split") {
    const std::string behavior = j.at("behavior").get<std::string>();
    check(behavior == "Isolated", "{}: Split pre-tokenizer behavior '{}' is not supported (only Isolated)",
          spec.source, behavior);
    check(!j.value("invert", false), "{}: inverted Split pre-tokenizers are not supported", spec.source);
    const json& pattern = j.at("pattern");
    if (pattern.contains("Regex")) {
      spec.pre.push_back({Kind::kSplit, pattern["Regex"].get<std::string>()});
    } else {
      check(pattern.contains("String"), "{}: Split pattern is neither Regex nor String: {}", spec.source,
            pattern.dump());
      spec.pre.push_back({Kind::kSplit, quote_regex(pattern["String"].get<std::string>())});
    }
  } else if (type == "Digits") {
    spec.pre.push_back({Kind::kSplit, j.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)"});
  } else {
    fail("{}: pre-tokenizer '{}' is not supported (supported: ByteLevel, Split, Digits, Sequence)", spec.source,
         type);
  }
}

bool has_byte_level_decoder(const json& j) {
  if (!j.is_object()) return false;
  if (j.value("type", "") == "ByteLevel") return true;
  if (j.value("type", "") == "Sequence")
    for (const auto& d : j.value("decoders", json::array()))
      if (has_byte_level_decoder(d)) return true;
  return false;
}

// The token a TemplateProcessing post-processor puts before a single sequence (Llama 3's BOS), if any.
std::optional<std::string> template_bos(const json& j) {
  if (!j.is_object()) return std::nullopt;
  if (j.value("type", "") == "Sequence") {
    for (const auto& p : j.value("processors", json::array()))
      if (auto bos = template_bos(p)) return bos;
  } else if (j.value("type", "") == "TemplateProcessing") {
    const json& single = j.value("single", json::array());
    if (!single.empty() && single[0].contains("SpecialToken"))
      return single[0]["SpecialToken"].at("id").get<std::string>();
  }
  return std::nullopt;
}

std::unique_ptr<Tokenizer> from_tokenizer_json(const fs::path& dir) {
  BpeSpec spec;
  spec.source = (dir / "tokenizer.json").string();
  const std::string& where = spec.source;
  json root = read_json(dir / "tokenizer.json");
  std::optional<std::string> bos_from_template, model_unk;
  // Wrong JSON types anywhere below surface as nlohmann exceptions; they become a polar::Error naming the file.
  try {
    check(root.is_object() && root.contains("model") && root["model"].is_object(), "{}: no \"model\" object", where);
    const json& model = root["model"];
    const std::string type = model.value("type", "BPE");
    check(type == "BPE", "{}: tokenizer model '{}' is not supported (only byte-level BPE)", where, type);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      check(model.value(key, json()).is_null() || model[key] == "", "{}: BPE {} is not supported", where, key);
    check(model.value("dropout", json()).is_null() || model["dropout"].get<double>() == 0.0,
          "{}: BPE dropout is not supported", where);
    spec.ignore_merges = model.value("ignore_merges", false);
    if (model.contains("unk_token") && !model["unk_token"].is_null())
      model_unk = model["unk_token"].get<std::string>();

    put_vocab(spec, model.at("vocab"), where + " model.vocab");
    const json& merges = model.at("merges");
    check(merges.is_array(), "{}: model.merges is not an array", where);
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const json& m = merges[rank];
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        size_t sp = s.find(' ', 1);
        check(sp != std::string::npos, "{}: model.merges[{}] = '{}' is not two tokens separated by a space", where,
              rank, s);
        spec.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else {
        check(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(),
              "{}: model.merges[{}] is neither \"a b\" nor [\"a\", \"b\"]: {}", where, rank, m.dump());
        spec.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      }
    }
    for (const auto& t : root.value("added_tokens", json::array()))
      put_token(spec, t.at("id").get<int64_t>(), t.at("content").get<std::string>(),
                t.value("special", false) ? TokenType::kControl : TokenType::kUserDefined);

    const json& normalizer = root.value("normalizer", json());
    check(normalizer.is_null(), "{}: normalizer '{}' is not supported (polar implements no text normalization)",
          where, normalizer.is_object() ? normalizer.value("type", "?") : normalizer.dump());
    bool byte_level = false;
    parse_pre_tokenizer(root.value("pre_tokenizer", json()), spec, byte_level);
    byte_level = byte_level || has_byte_level_decoder(root.value("decoder", json()));
    check(byte_level, "{}: not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer or decoder); "
          "only byte-level BPE is supported", where);
    bos_from_template = template_bos(root.value("post_processor", json()));
  } catch (const json::exception& e) {
    fail("{}: malformed tokenizer.json: {}", where, e.what());
  }
  apply_specials(spec, read_specials(dir), bos_from_template, model_unk);
  return detail::make_bpe_tokenizer(std::move(spec));
}

std::unique_ptr<Tokenizer> from_vocab_and_merges(const fs::path& dir) {
  BpeSpec spec;
  spec.source = (dir / "vocab.json").string();
  check(fs::exists(dir / "merges.txt"), "{}: vocab.json has no merges.txt beside it", dir.string());
  put_vocab(spec, read_json(dir / "vocab.json"), spec.source);

  const std::string merges_path = (dir / "merges.txt").string();
  std::ifstream f(merges_path, std::ios::binary);
  check(f.good(), "{}: cannot open", merges_path);
  std::string line;
  for (size_t line_no = 1; std::getline(f, line); ++line_no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
    size_t sp = line.find(' ', 1);
    check(sp != std::string::npos && line.find(' ', sp + 1) == std::string::npos,
          "{}:{}: '{}' is not two tokens separated by a space", merges_path, line_no, line);
    spec.merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }

  HfSpecials sp = read_specials(dir);
  if (sp.added_tokens_decoder.is_object()) {
    try {
      for (const auto& [id, t] : sp.added_tokens_decoder.items())
        put_token(spec, std::stoll(id), t.at("content").get<std::string>(),
                  t.value("special", false) ? TokenType::kControl : TokenType::kUserDefined);
    } catch (const std::exception& e) {
      fail("{}: malformed added_tokens_decoder: {}", (dir / "tokenizer_config.json").string(), e.what());
    }
  }
  // GPT-2's pre-tokenizer, as its slow tokenizer (and HF ByteLevel with use_regex) applies it.
  if (sp.add_prefix_space) spec.pre.push_back({PreTokenizerStep::Kind::kPrefixSpace, ""});
  spec.pre.push_back({PreTokenizerStep::Kind::kSplit, detail::kGpt2Pattern});
  apply_specials(spec, sp, std::nullopt, std::nullopt);
  return detail::make_bpe_tokenizer(std::move(spec));
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer_dir(const std::string& dir) {
  fs::path d(dir);
  if (fs::exists(d / "tokenizer.json")) return from_tokenizer_json(d);
  if (fs::exists(d / "vocab.json")) return from_vocab_and_merges(d);
  fail("{}: no tokenizer found (neither tokenizer.json nor vocab.json + merges.txt)", dir);
}

}  // namespace polar
