// Calibration text (polar calibrate, step 1): text files turned into the token sequences the model is run
// over while the routers' training data is collected.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/tokenizer.h"

namespace polar::calib {

struct CalibrationText {
  std::vector<std::vector<int32_t>> sequences;  // each at most `seq` tokens, BOS first where the model has one
  int64_t tokens = 0;                           // over all sequences (BOS included: every row is collected)
  bool exhausted = false;                       // the files held fewer tokens than asked for
};

// Reads each file and tokenizes it document by document: a file ending in ".jsonl" holds one JSON object
// per line with a "text" field, or "prefix" and "gold_completion" (concatenated); any other file is plain
// text, read in pieces of about 1 MiB cut at line ends so a file of any size is never held whole. A file's
// documents form one token stream, cut into windows of `seq` tokens (BOS followed by seq - 1 text tokens
// when the tokenizer adds BOS); each file is read only until its windows could fill max_tokens alone.
// The sequences are then one window of each file in turn (so every file contributes) until they hold
// max_tokens tokens, the last window cut short. Deterministic: no seed is involved. Memory: at most
// max_tokens token ids per file. A missing or unreadable file, a malformed JSONL line, max_tokens < 1,
// seq < 2 or text without a single token are polar::Errors naming the problem.
// Fails, naming the file, unless every file exists and is a regular file (checked by read_calibration_text
// too; callers with slow work before it can check first).
void check_text_files(const std::vector<std::string>& files);

CalibrationText read_calibration_text(const std::vector<std::string>& files, const Tokenizer& tokenizer, int64_t seq,
                                      int64_t max_tokens);

}  // namespace polar::calib
