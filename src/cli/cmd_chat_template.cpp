// polar chat-template: render chat messages with a model's own chat template (or a template file) and print
// the prompt exactly as the model would be fed it, byte for byte (no newline is added).
#include <fmt/core.h>

#include <cctype>
#include <cstdio>
#include <optional>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "io/chat_template.h"
#include "io/json.h"

namespace polar::cli {

namespace {
using ojson = nlohmann::ordered_json;

struct ChatTemplateArgs {
  std::string model;
  std::string template_file;
  std::string messages;
  bool no_generation_prompt = false;
  std::vector<std::string> vars;
  std::string bos, eos;
  CLI::Option* bos_option = nullptr;
  CLI::Option* eos_option = nullptr;
};

// JSON keeping the order of object keys (tojson shows it), nesting bounded as io/json.h's parse_json.
ojson parse_ordered(const std::string& text) {
  return ojson::parse(text, [](int depth, ojson::parse_event_t, ojson&) {
    if (depth > kMaxJsonDepth)
      throw ojson::parse_error::create(101, 0, "nested deeper than " + std::to_string(kMaxJsonDepth) + " levels",
                                       static_cast<const ojson*>(nullptr));
    return true;
  });
}

// The messages of a --messages file: a list of {role, content, ...}, or an object {"messages": [...]}. Content
// given as a list of parts ({"type": "text", "text": ...}, as OpenAI clients send it) becomes the
// concatenation of its text, since templates expect a string; other members are passed through as written.
ojson read_messages(const std::string& path) {
  ojson j;
  try {
    j = parse_ordered(read_text_file(path));
  } catch (const ojson::exception& e) {
    fail("{}: malformed JSON: {}", path, e.what());
  }
  if (j.is_object() && j.contains("messages")) {
    ojson inner = std::move(j["messages"]);
    j = std::move(inner);
  }
  check(j.is_array(), "{}: expected a list of messages ({{\"role\": ..., \"content\": ...}}) or an object "
        "{{\"messages\": [...]}}, got {}", path, j.type_name());
  for (size_t i = 0; i < j.size(); ++i) {
    ojson& m = j[i];
    check(m.is_object(), "{}: message {} is {}, not an object {{\"role\": ..., \"content\": ...}}", path, i, m.type_name());
    check(m.contains("role") && m["role"].is_string(), "{}: message {} has no \"role\" string", path, i);
    if (!m.contains("content") || m["content"].is_string() || m["content"].is_null()) continue;
    const ojson& parts = m["content"];
    check(parts.is_array(), "{}: message {}: content is {}, not a string or a list of text parts", path, i,
          parts.type_name());
    std::string text;
    for (size_t k = 0; k < parts.size(); ++k) {
      const ojson& p = parts[k];
      check(p.is_object() && p.contains("type") && p["type"].is_string(),
            "{}: message {}: content part {} is not an object with a \"type\"", path, i, k);
      const std::string type = p["type"].get<std::string>();
      check(type == "text", "{}: message {}: content part {} is of type '{}'; only text parts can be rendered", path,
            i, k, type);
      check(p.contains("text") && p["text"].is_string(), "{}: message {}: text part {} has no \"text\" string", path,
            i, k);
      text += p["text"].get<std::string>();
    }
    m["content"] = text;
  }
  return j;
}

// --var NAME=VALUE: VALUE as JSON when it parses as JSON (true, 3, [1,2], "quoted"), else as the string.
ojson parse_vars(const std::vector<std::string>& vars) {
  ojson extra = ojson::object();
  for (const std::string& v : vars) {
    const size_t eq = v.find('=');
    check(eq != std::string::npos && eq > 0, "--var '{}': expected NAME=VALUE", v);
    const std::string name = v.substr(0, eq);
    bool ident = !std::isdigit(static_cast<unsigned char>(name[0]));
    for (char c : name) ident = ident && (std::isalnum(static_cast<unsigned char>(c)) || c == '_');
    check(ident, "--var '{}': '{}' is not a variable name (letters, digits and _, not starting with a digit)", v, name);
    check(name != "messages" && name != "add_generation_prompt",
          "--var {}: set by --messages and --no-generation-prompt, not by --var", name);
    const std::string value = v.substr(eq + 1);
    try {
      extra[name] = parse_ordered(value);
    } catch (const ojson::exception&) {
      extra[name] = value;
    }
  }
  return extra;
}

int run_chat_template(const ChatTemplateArgs& a) {
  check(a.model.empty() != a.template_file.empty(), "chat-template needs --model PATH or --template FILE (one of them)");
  // Inputs first: their mistakes are reported before a model is read.
  const ojson messages = read_messages(a.messages);
  const ojson extra = parse_vars(a.vars);
  std::string source, origin, bos, eos;
  if (!a.template_file.empty()) {
    source = read_text_file(a.template_file);
    origin = a.template_file;
  } else {
    Checkpoint ck = load_checkpoint_metadata(a.model);
    check(ck.chat_template.has_value(),
          "{}: the model carries no chat template (GGUF tokenizer.chat_template, or a Hugging Face directory's "
          "chat_template.jinja / tokenizer_config.json); pass one with --template FILE",
          a.model);
    source = *ck.chat_template;
    origin = "the chat template of " + a.model;
    if (ck.tokenizer) {
      bos = ck.tokenizer->bos_text();
      eos = ck.tokenizer->eos_text();
    }
  }
  if (a.bos_option->count()) bos = a.bos;
  if (a.eos_option->count()) eos = a.eos;
  std::string out;
  try {
    out = ChatTemplate(source).render(messages, !a.no_generation_prompt, bos, eos, extra);
  } catch (const Error& e) {
    fail("{}: {}", origin, e.what());
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  std::fflush(stdout);
  return 0;
}
}  // namespace

Command chat_template_command() {
  auto a = std::make_shared<ChatTemplateArgs>();
  return {"chat-template",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("chat-template",
                                         "Render chat messages with a model's chat template and print the prompt exactly");
            auto* model = c->add_option("--model,-m", a->model, "Model whose own template renders: a Hugging Face directory or a GGUF file");
            auto* tmpl = c->add_option("--template", a->template_file, "A Jinja chat template file to render with instead");
            model->excludes(tmpl);
            c->add_option("--messages", a->messages,
                          "JSON file: a list of {\"role\", \"content\"} (content a string or a list of text parts), or "
                          "{\"messages\": [...]}")
                ->required();
            c->add_flag("--no-generation-prompt", a->no_generation_prompt,
                        "Leave out the assistant header that prompts a reply (add_generation_prompt=false)");
            c->add_option("--var", a->vars,
                          "NAME=VALUE: another template variable (e.g. date_string=...); VALUE is JSON if it parses as JSON, "
                          "else a string. Repeatable");
            a->bos_option = c->add_option("--bos", a->bos, "bos_token (default: the text of the model's BOS token, else empty)");
            a->eos_option = c->add_option("--eos", a->eos, "eos_token (default: the text of the model's EOS token, else empty)");
          },
          [a] { return run_chat_template(*a); }};
}

}  // namespace polar::cli
