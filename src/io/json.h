// JSON from outside input (config.json, tokenizer files, safetensors headers, router metadata, task lines),
// parsed with a bound on nesting. nlohmann parses any depth without recursing, but its dump() (in error
// messages) and polar's own walks of a parsed tree recurse: a few MB of "[[[[..." would overflow the stack.
// Deeper nesting is a json::parse_error like any other malformed input, so each caller reports it the way it
// reports those, naming its file.
#pragma once
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

namespace polar {

// Far deeper than any real file of these formats (tokenizer.json: 6), far shallower than the stack allows.
inline constexpr int kMaxJsonDepth = 128;

// nlohmann::json::parse(input...) refusing nesting deeper than kMaxJsonDepth.
template <typename... Input>
nlohmann::json parse_json(Input&&... input) {
  using json = nlohmann::json;
  return json::parse(std::forward<Input>(input)..., [](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonDepth)
      throw json::parse_error::create(
          101, 0, "nested deeper than " + std::to_string(kMaxJsonDepth) + " levels", static_cast<const json*>(nullptr));
    return true;
  });
}

}  // namespace polar
