// Chat templates (ChatTemplate): parsing the input as a Jinja template, then rendering it with and without a
// generation prompt. The input is the template, optionally followed by a kSeparator line and a JSON object of
// variables (its "messages" replacing the default conversation, the rest passed as extra variables); without
// one, a conversation with a system prompt, tool calls and a tool result, and a tool list, is rendered.
// A template or render that fails is a polar::Error; the render's bounds make runaway templates errors too.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/chat_template.h"
#include "io/json.h"

using namespace polar;
using ojson = nlohmann::ordered_json;

namespace {

constexpr std::string_view kSeparator = "\n=====\n";

const ojson& default_variables() {
  static const ojson vars = ojson::parse(R"({
    "messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Hi \u00e9\u65e5 \ud83d\ude42"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"id": "call12345", "type": "function",
                       "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
      {"role": "tool", "content": "{\"temp\": 21.5}", "tool_call_id": "call12345"},
      {"role": "assistant", "content": "  It is 21.5 C.  "},
      {"role": "user", "content": "Thanks"}
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "date_string": "26 Jul 2024"
  })");
  return vars;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input = fuzz::as_text(data, size);
  const size_t split = input.find(kSeparator);
  ojson vars = default_variables();
  if (split != std::string_view::npos) {
    try {
      vars = parse_json(input.substr(split + kSeparator.size()));
    } catch (const nlohmann::json::exception&) {
      return 0;
    }
    if (!vars.is_object()) return 0;
  }
  ojson messages = ojson::array();
  if (vars.contains("messages")) {
    messages = vars["messages"];
    vars.erase("messages");
  }
  try {
    const ChatTemplate tmpl(std::string(input.substr(0, split)));
    for (bool add_generation_prompt : {false, true}) {
      try {
        tmpl.render(messages, add_generation_prompt, "<s>", "</s>", vars);
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  }
  return 0;
}
