// Chat templates: an interpreter of the Jinja subset that Hugging Face chat templates (tokenizer_config.json's
// `chat_template`) are written in, so that a server renders chat messages into a prompt with the model's own
// template, byte for byte as transformers' render_jinja_template does (trim_blocks, lstrip_blocks, the
// loopcontrols extension, tojson keeping non-ASCII text, raise_exception, strftime_now).
//
// Parsing happens once, so a template using a construct outside the subset (an unknown filter, test, method,
// function or statement) fails when it is loaded, with an error naming the construct and its line. Rendering
// is bounded (see chat_template.cpp: steps, bytes, nesting), so no template and no input can make it loop
// forever, exhaust memory or overflow the stack: those are errors like any other.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace polar {

class ChatTemplate {
 public:
  // Parses the template; a polar::Error names what it cannot handle and the line.
  explicit ChatTemplate(std::string source);
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Renders with the variables messages, add_generation_prompt, bos_token, eos_token, tools and documents
  // (none, as transformers passes them when there are none), then every member of `extra` (an object), which
  // override all but the first two. Dicts keep the order they have in the JSON (ordered_json; a plain
  // nlohmann::json converts, with its keys sorted), as tojson shows. A template's raise_exception(msg), and
  // every failure, is a polar::Error whose message contains the line and msg.
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt, const std::string& bos_token,
                     const std::string& eos_token,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  struct Program;  // the parsed template (chat_template.cpp)

 private:
  std::unique_ptr<const Program> program_;
};

// The chat template of a Hugging Face model directory: chat_template.jinja, else tokenizer_config.json's
// `chat_template` (a string, or a list of {name, template} of which the one named "default"), else
// chat_template.json's. nullopt when the directory has none.
std::optional<std::string> chat_template_from_hf_dir(const std::string& dir);

}  // namespace polar
