// Zero-shot tasks read from JSON Lines files (../shared/data/README.md). Every item becomes a list of
// candidates, each a (context, continuation) pair of texts whose continuation is scored by log-likelihood,
// and the index of the right one:
//   multiple choice {"query", "choices", "gold"}: (query, " " + choice) per choice;
//   schema {"context_options", "continuation", "gold"}: (option, " " + continuation) per option;
//   language modelling {"context", "continuation"}: one candidate (context, " " + continuation), right when
//     its every token is the greedy one;
//   RTE {"premise", "hypothesis", "label"}: ("{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
//     " True" / " False"), entailment = " True".
// The format of a file is detected from the fields of its first valid line; every other line must match it.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace polar {

enum class TaskFormat { kMultipleChoice, kSchema, kLanguageModel, kRte };

// "multiple_choice", "schema", "language_modeling", "rte"
std::string_view format_name(TaskFormat f);

struct Candidate {
  std::string context;
  std::string continuation;  // the text scored, its leading " " included
};

struct TaskItem {
  int64_t line = 0;  // 1-based line of the item in its file
  std::vector<Candidate> candidates;
  int64_t gold = 0;  // index of the right candidate (0 for language modelling)
};

struct Task {
  std::string name;  // the file's name without its extension
  std::string path;
  TaskFormat format = TaskFormat::kMultipleChoice;
  std::vector<TaskItem> items;
  int64_t skipped = 0;  // malformed lines skipped (TaskLoadOptions::skip_bad)
};

struct TaskLoadOptions {
  int64_t limit = 0;      // keep the first `limit` items (0 = all); lines after them are not read
  bool skip_bad = false;  // a malformed line is skipped with a warning instead of failing the load
  std::function<void(const std::string&)> warn = {};  // receives "FILE:LINE: problem (skipped)"; may be empty
};

// Reads a task file. A malformed line (bad JSON, a missing field, a wrong type, gold out of range, a line of
// another format) is a polar::Error "FILE:LINE: problem" unless skip_bad; blank lines are ignored. A file
// with no valid item is an error either way.
Task load_task(const std::string& path, const TaskLoadOptions& options = {});

}  // namespace polar
