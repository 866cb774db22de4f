#include "eval/tasks.h"

#include <filesystem>
#include <fstream>
#include <optional>

#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json.h"

namespace polar {

namespace {

using nlohmann::json;

const json& field(const json& j, const char* name) {
  check(j.contains(name), "missing field '{}'", name);
  return j[name];
}

std::string string_field(const json& j, const char* name) {
  const json& v = field(j, name);
  check(v.is_string(), "field '{}' must be a string, got {}", name, v.type_name());
  return v.get<std::string>();
}

std::vector<std::string> string_list_field(const json& j, const char* name) {
  const json& v = field(j, name);
  check(v.is_array(), "field '{}' must be an array of strings, got {}", name, v.type_name());
  check(!v.empty(), "field '{}' is empty", name);
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) {
    check(v[i].is_string(), "field '{}' must be an array of strings, element {} is {}", name, i, v[i].type_name());
    out.push_back(v[i].get<std::string>());
  }
  return out;
}

int64_t gold_field(const json& j, size_t n) {
  const json& v = field(j, "gold");
  check(v.is_number_integer(), "field 'gold' must be an integer, got {}", v.dump());
  const int64_t gold = v.get<int64_t>();
  check(gold >= 0 && gold < static_cast<int64_t>(n), "gold {} is out of range for {} candidates", gold, n);
  return gold;
}

// The format a line's fields name; nullopt when they name none. A field that only one format has decides,
// so a line missing another field of that format is reported as such rather than as "unknown format".
std::optional<TaskFormat> detect(const json& j) {
  if (j.contains("query") || j.contains("choices")) return TaskFormat::kMultipleChoice;
  if (j.contains("context_options")) return TaskFormat::kSchema;
  if (j.contains("premise") || j.contains("hypothesis") || j.contains("label")) return TaskFormat::kRte;
  if (j.contains("context") || j.contains("continuation")) return TaskFormat::kLanguageModel;
  return std::nullopt;
}

// A continuation as scored: one space joins it to its context, as lm-evaluation-harness's target delimiter.
std::string delimited(const std::string& text) {
  std::string s = " ";
  s += text;
  return s;
}

// The format of a file's first valid line, which every later line must follow.
TaskFormat first_format(const json& j) {
  const std::optional<TaskFormat> detected = detect(j);
  if (!detected) {
    std::vector<std::string> keys;
    for (const auto& [key, value] : j.items()) keys.push_back(key);
    fail("no task format has the fields {}: expected query/choices/gold, context_options/continuation/gold, "
         "context/continuation or premise/hypothesis/label",
         keys);
  }
  return *detected;
}

json parse_line(const std::string& line) {
  try {
    return parse_json(line);
  } catch (const json::exception& e) {
    // nlohmann's message starts with its exception id ("[json.exception.parse_error.101] "): not for users.
    const std::string what = e.what();
    const size_t id_end = what.find("] ");
    fail("invalid JSON: {}", id_end == std::string::npos ? what : what.substr(id_end + 2));
  }
}

TaskItem parse_item(const json& j, TaskFormat format) {
  TaskItem item;
  switch (format) {
    case TaskFormat::kMultipleChoice: {
      const std::string query = string_field(j, "query");
      const std::vector<std::string> choices = string_list_field(j, "choices");
      for (const std::string& choice : choices) item.candidates.push_back({query, delimited(choice)});
      item.gold = gold_field(j, choices.size());
      break;
    }
    case TaskFormat::kSchema: {
      const std::string continuation = delimited(string_field(j, "continuation"));
      const std::vector<std::string> options = string_list_field(j, "context_options");
      for (const std::string& option : options) item.candidates.push_back({option, continuation});
      item.gold = gold_field(j, options.size());
      break;
    }
    case TaskFormat::kLanguageModel:
      item.candidates.push_back({string_field(j, "context"), delimited(string_field(j, "continuation"))});
      break;
    case TaskFormat::kRte: {
      const std::string prompt =
          fmt::format("{}\nQuestion: {} True or False?\nAnswer:", string_field(j, "premise"), string_field(j, "hypothesis"));
      item.candidates = {{prompt, " True"}, {prompt, " False"}};
      const std::string label = string_field(j, "label");
      check(label == "entailment" || label == "not_entailment",
            "field 'label' must be \"entailment\" or \"not_entailment\", got \"{}\"", label);
      item.gold = label == "entailment" ? 0 : 1;
      break;
    }
  }
  return item;
}

bool blank(const std::string& line) { return line.find_first_not_of(" \t\r\n") == std::string::npos; }

}  // namespace

std::string_view format_name(TaskFormat f) {
  switch (f) {
    case TaskFormat::kMultipleChoice: return "multiple_choice";
    case TaskFormat::kSchema: return "schema";
    case TaskFormat::kLanguageModel: return "language_modeling";
    case TaskFormat::kRte: return "rte";
  }
  return "unknown";
}

Task load_task(const std::string& path, const TaskLoadOptions& options) {
  check(options.limit >= 0, "the item limit must be >= 0, got {}", options.limit);
  std::ifstream f(path, std::ios::binary);
  check(f.good(), "cannot read task file {}", path);
  Task task;
  task.name = std::filesystem::path(path).stem().string();
  task.path = path;
  std::optional<TaskFormat> format;
  std::string line;
  for (int64_t line_no = 1; std::getline(f, line); ++line_no) {
    if (options.limit > 0 && static_cast<int64_t>(task.items.size()) == options.limit) break;
    if (blank(line)) continue;
    try {
      const json j = parse_line(line);
      check(j.is_object(), "expected a JSON object, got {}", j.type_name());
      const TaskFormat line_format = format ? *format : first_format(j);
      TaskItem item = parse_item(j, line_format);
      item.line = line_no;
      format = line_format;
      task.items.push_back(std::move(item));
    } catch (const Error& e) {
      const std::string where = fmt::format("{}:{}: {}", path, line_no, e.what());
      if (!options.skip_bad) fail("{}", where);
      ++task.skipped;
      if (options.warn) options.warn(where + " (skipped)");
    }
  }
  check(!f.bad(), "error reading task file {}", path);
  check(!task.items.empty(), "{}: no valid items{}", path,
        task.skipped ? fmt::format(" ({} malformed lines skipped)", task.skipped) : "");
  task.format = *format;
  return task;
}

}  // namespace polar
