#include "calib/data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace polar::calib {

namespace {

// Plain text is tokenized in pieces of about this many bytes (cut at a line end), so that a large file is
// never held whole and tokenizing can stop as soon as enough tokens are read.
constexpr size_t kPieceBytes = size_t(1) << 20;

// Called with each document of a file; returns false to stop reading.
using DocumentFn = std::function<bool(std::string_view)>;

std::ifstream open_text(const std::string& path) {
  std::error_code ec;
  check(std::filesystem::exists(path, ec), "cannot read calibration text {}: no such file", path);
  check(std::filesystem::is_regular_file(path, ec), "cannot read calibration text {}: not a regular file", path);
  std::ifstream f(path, std::ios::binary);
  check(f.good(), "cannot read calibration text {}", path);
  return f;
}

void read_plain(const std::string& path, const DocumentFn& document) {
  std::ifstream f = open_text(path);
  std::string pending;  // text read but not yet tokenized: what follows the last line end
  std::vector<char> buffer(kPieceBytes);
  while (f) {
    f.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    pending.append(buffer.data(), static_cast<size_t>(f.gcount()));
    const size_t cut = pending.rfind('\n');
    if (cut == std::string::npos) continue;  // one line longer than a piece: read on until it ends
    if (!document(std::string_view(pending).substr(0, cut + 1))) return;
    pending.erase(0, cut + 1);
  }
  check(!f.bad(), "error reading calibration text {}", path);
  if (!pending.empty()) document(pending);
}

void read_jsonl(const std::string& path, const DocumentFn& document) {
  std::ifstream f = open_text(path);
  std::string line;
  for (int64_t number = 1; std::getline(f, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail("{}:{}: not a JSON line: {}", path, number, e.what());
    }
    auto text = [&](const char* key) -> const std::string* {
      auto it = record.is_object() ? record.find(key) : record.end();
      return it != record.end() && it->is_string() ? &it->get_ref<const std::string&>() : nullptr;
    };
    const std::string *whole = text("text"), *prefix = text("prefix"), *completion = text("gold_completion");
    check(whole || (prefix && completion),
          "{}:{}: a calibration record needs a string field \"text\", or \"prefix\" and \"gold_completion\"", path,
          number);
    if (!document(whole ? *whole : *prefix + *completion)) return;
  }
  check(!f.bad(), "error reading calibration text {}", path);
}

// Cuts the token stream into windows of `seq` tokens, BOS first where the model has one.
class Windows {
 public:
  Windows(int32_t bos, int64_t seq, int64_t max_tokens, CalibrationText& out)
      : bos_(bos), seq_(static_cast<size_t>(seq)), max_tokens_(max_tokens), out_(out) {}

  // Appends a document's tokens; false once the windows hold max_tokens.
  bool add(const std::vector<int32_t>& ids) {
    for (int32_t id : ids) {
      if (out_.sequences.empty() || out_.sequences.back().size() == seq_) {
        // A window of BOS alone would teach nothing a full one does not: stop rather than start one.
        if (max_tokens_ - out_.tokens < (bos_ >= 0 ? 2 : 1)) return false;
        out_.sequences.emplace_back();
        if (bos_ >= 0) push(bos_);
      }
      push(id);
      if (out_.tokens == max_tokens_) return false;
    }
    return true;
  }

 private:
  void push(int32_t id) {
    out_.sequences.back().push_back(id);
    ++out_.tokens;
  }
  int32_t bos_;
  size_t seq_;
  int64_t max_tokens_;
  CalibrationText& out_;
};

}  // namespace

void check_text_files(const std::vector<std::string>& files) {
  check(!files.empty(), "no calibration text given (--text FILE ...)");
  for (const std::string& path : files) open_text(path);
}

CalibrationText read_calibration_text(const std::vector<std::string>& files, const Tokenizer& tokenizer, int64_t seq,
                                      int64_t max_tokens) {
  check_text_files(files);
  check(max_tokens >= 1, "--tokens must be at least 1, not {}", max_tokens);
  check(seq >= 2, "--seq must be at least 2 tokens, not {}", seq);
  const int32_t bos = tokenizer.add_bos_default() ? tokenizer.bos_id() : -1;
  // Each file's own windows, read until they alone could fill max_tokens (or the file ends).
  std::vector<CalibrationText> per_file(files.size());
  for (size_t f = 0; f < files.size(); ++f) {
    Windows windows(bos, seq, max_tokens, per_file[f]);
    bool more = true;  // the windows want more tokens
    const DocumentFn document = [&](std::string_view text) {
      more = windows.add(tokenizer.encode(text, false));
      return more;
    };
    (files[f].ends_with(".jsonl") ? read_jsonl : read_plain)(files[f], document);
    per_file[f].exhausted = more;
  }
  // One window of each file in turn, the last one cut short to max_tokens.
  CalibrationText out;
  const int64_t shortest = bos >= 0 ? 2 : 1;  // BOS alone teaches nothing
  for (size_t i = 0, taken = 1; taken > 0; ++i) {
    taken = 0;
    for (CalibrationText& text : per_file) {
      const int64_t room = max_tokens - out.tokens;
      if (i >= text.sequences.size() || room < shortest) continue;
      std::vector<int32_t>& window = text.sequences[i];
      if (static_cast<int64_t>(window.size()) > room) window.resize(static_cast<size_t>(room));
      out.tokens += static_cast<int64_t>(window.size());
      out.sequences.push_back(std::move(window));
      ++taken;
    }
  }
  check(out.tokens > 0, "the calibration text ({} file{}) holds no tokens", files.size(), files.size() == 1 ? "" : "s");
  out.exhausted = out.tokens < max_tokens &&
                  std::all_of(per_file.begin(), per_file.end(), [](const CalibrationText& t) { return t.exhausted; });
  return out;
}

}  // namespace polar::calib
