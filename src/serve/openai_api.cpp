#include "serve/openai_api.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

namespace polar::serve {

using nlohmann::json;

namespace {

constexpr int64_t kMaxChoices = 64;      // n at most
constexpr size_t kMaxStopStrings = 16;
constexpr size_t kMaxStopLength = 256;   // bytes of one stop string
constexpr size_t kMaxPrompts = 1024;     // prompts of one completions request
constexpr int64_t kMaxCompletionLogprobs = 5;  // OpenAI's bound on the completions API's "logprobs"

[[noreturn]] void invalid(const std::string& param, const std::string& message) {
  throw ApiError(400, "invalid_request_error", message, param);
}

std::string type_name(const json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number()) return "number";
  return v.type_name();
}

const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

int64_t integer(const json& body, const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  if (!v) return fallback;
  int64_t x = 0;
  if (v->is_number_integer()) {
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      invalid(name, fmt::format("'{}' is out of range", name));
    x = v->get<int64_t>();
  } else if (v->is_number_float() && std::nearbyint(v->get<double>()) == v->get<double>() &&
             std::abs(v->get<double>()) < 9e18) {
    x = static_cast<int64_t>(v->get<double>());
  } else {
    invalid(name, fmt::format("'{}' must be an integer, got {}", name, type_name(*v)));
  }
  if (x < lo || x > hi) invalid(name, fmt::format("'{}' must be in [{}, {}], got {}", name, lo, hi, x));
  return x;
}

double number(const json& body, const char* name, double fallback, double lo, double hi, bool lo_open = false) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_number()) invalid(name, fmt::format("'{}' must be a number, got {}", name, type_name(*v)));
  const double x = v->get<double>();
  if (!(lo_open ? x > lo : x >= lo) || !(x <= hi))
    invalid(name, fmt::format("'{}' must be in {}{}, {}], got {}", name, lo_open ? "(" : "[", lo, hi, x));
  return x;
}

bool boolean(const json& body, const char* name, bool fallback) {
  const json* v = field(body, name);
  if (!v) return fallback;
  if (!v->is_boolean()) invalid(name, fmt::format("'{}' must be a boolean, got {}", name, type_name(*v)));
  return v->get<bool>();
}

// Parameters of OpenAI's API that polar does not implement: refused by name rather than silently ignored
// when a request asks for anything but their neutral value.
void refuse_unsupported(const json& body, Endpoint endpoint) {
  auto unsupported = [](const char* name) {
    invalid(name, fmt::format("'{}' is not supported by polar", name));
  };
  if (endpoint == Endpoint::chat && boolean(body, "echo", false)) unsupported("echo");
  if (endpoint == Endpoint::completions && field(body, "top_logprobs")) unsupported("top_logprobs");  // chat's
  if (const json* v = field(body, "logit_bias"); v && !(v->is_object() && v->empty())) unsupported("logit_bias");
  if (const json* v = field(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty())) unsupported("suffix");
  const int64_t n = integer(body, "n", 1, 1, kMaxChoices);
  if (integer(body, "best_of", n, 1, kMaxChoices) != n) unsupported("best_of");
  if (endpoint == Endpoint::chat) {
    for (const char* name : {"tools", "functions"})
      if (const json* v = field(body, name); v && !(v->is_array() && v->empty())) unsupported(name);
    if (const json* v = field(body, "response_format");
        v && !(v->is_object() && v->value("type", json()) == "text"))
      unsupported("response_format");
  }
}

void check_ids(const std::vector<int32_t>& ids, const ApiContext& ctx, const char* param) {
  if (ids.empty()) invalid(param, fmt::format("'{}' is empty: nothing to condition on", param));
  for (int32_t id : ids)
    if (id < 0 || id >= ctx.vocab_size)
      invalid(param, fmt::format("token id {} is out of range for a vocabulary of {}", id, ctx.vocab_size));
}

std::vector<int32_t> token_ids(const json& list, const ApiContext& ctx) {
  std::vector<int32_t> ids;
  for (const json& t : list) {
    if (!t.is_number_integer()) invalid("prompt", "'prompt' token lists must hold integers");
    const int64_t id = t.is_number_unsigned() && t.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX) ? -1
                                                                                                  : t.get<int64_t>();
    if (id < 0 || id >= ctx.vocab_size)
      invalid("prompt", fmt::format("token id {} is out of range for a vocabulary of {}", id, ctx.vocab_size));
    ids.push_back(static_cast<int32_t>(id));
  }
  check_ids(ids, ctx, "prompt");
  return ids;
}

std::vector<int32_t> encode_text(const std::string& text, const ApiContext& ctx, bool add_bos, const char* param) {
  if (!ctx.tokenizer)
    invalid(param, "this model has no tokenizer: send the prompt as token ids");
  if (text.empty()) invalid(param, fmt::format("'{}' is empty: nothing to condition on", param));
  std::vector<int32_t> ids = ctx.tokenizer->encode(text, add_bos);
  check_ids(ids, ctx, param);
  return ids;
}

// A completions prompt: a string, a list of strings, a list of token ids, or a list of such lists.
std::vector<std::vector<int32_t>> completion_prompts(const json& body, const ApiContext& ctx) {
  const json* p = field(body, "prompt");
  if (!p) invalid("prompt", "'prompt' is required");
  const bool bos = ctx.tokenizer && ctx.tokenizer->add_bos_default();
  std::vector<std::vector<int32_t>> out;
  if (p->is_string()) return {encode_text(p->get<std::string>(), ctx, bos, "prompt")};
  if (!p->is_array() || p->empty())
    invalid("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists");
  if (p->size() > kMaxPrompts) invalid("prompt", fmt::format("at most {} prompts a request", kMaxPrompts));
  if ((*p)[0].is_number()) return {token_ids(*p, ctx)};
  for (const json& item : *p) {
    if (item.is_string()) out.push_back(encode_text(item.get<std::string>(), ctx, bos, "prompt"));
    else if (item.is_array()) out.push_back(token_ids(item, ctx));
    else invalid("prompt", "'prompt' list items must be strings or token id lists");
  }
  return out;
}

// The messages as the template sees them: content a string (text parts concatenated), other fields kept.
nlohmann::ordered_json chat_messages(const json& body) {
  const json* m = field(body, "messages");
  if (!m || !m->is_array() || m->empty()) invalid("messages", "'messages' must be a non-empty list");
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!msg.is_object()) invalid(where, fmt::format("'{}' must be an object", where));
    const json* role = field(msg, "role");
    if (!role || !role->is_string()) invalid(where + ".role", fmt::format("'{}.role' must be a string", where));
    nlohmann::ordered_json o = nlohmann::ordered_json::object();
    o["role"] = role->get<std::string>();
    const json* content = field(msg, "content");
    if (!content) {
      o["content"] = "";
    } else if (content->is_string()) {
      o["content"] = content->get<std::string>();
    } else if (content->is_array()) {
      std::string text;
      for (const json& part : *content) {
        if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
            !part["text"].is_string())
          invalid(where + ".content", fmt::format("'{}.content' parts must be {{\"type\": \"text\", \"text\": ...}}: "
                                                  "polar serves text only", where));
        text += part["text"].get<std::string>();
      }
      o["content"] = text;
    } else {
      invalid(where + ".content", fmt::format("'{}.content' must be a string or a list of text parts", where));
    }
    for (const auto& [key, value] : msg.items())
      if (key != "role" && key != "content") o[key] = nlohmann::ordered_json::parse(value.dump());
    out.push_back(std::move(o));
  }
  return out;
}

std::vector<int32_t> chat_prompt(const json& body, const ApiContext& ctx) {
  const nlohmann::ordered_json messages = chat_messages(body);
  if (!ctx.chat_template)
    throw ApiError(400, "invalid_request_error",
                   "this model has no chat template: use /v1/completions, or start the server with --chat-template",
                   "messages");
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
  if (const json* kw = field(body, "chat_template_kwargs")) {
    if (!kw->is_object()) invalid("chat_template_kwargs", "'chat_template_kwargs' must be an object");
    extra = nlohmann::ordered_json::parse(kw->dump());
  }
  std::string text;
  try {
    text = ctx.chat_template->render(messages, boolean(body, "add_generation_prompt", true), ctx.bos_token,
                                     ctx.eos_token, extra);
  } catch (const Error& e) {
    invalid("messages", fmt::format("the chat template cannot render these messages: {}", e.what()));
  }
  // The template writes BOS itself where the model wants one; it is not added again.
  const bool bos = ctx.tokenizer && ctx.tokenizer->add_bos_default() &&
                   (ctx.bos_token.empty() || !text.starts_with(ctx.bos_token));
  return encode_text(text, ctx, bos, "messages");
}

std::vector<std::string> stop_strings(const json& body) {
  const json* s = field(body, "stop");
  if (!s) return {};
  std::vector<std::string> out;
  if (s->is_string()) {
    out.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    if (s->size() > kMaxStopStrings) invalid("stop", fmt::format("'stop' holds at most {} strings", kMaxStopStrings));
    for (const json& x : *s) {
      if (!x.is_string()) invalid("stop", "'stop' must be a string or a list of strings");
      out.push_back(x.get<std::string>());
    }
  } else {
    invalid("stop", "'stop' must be a string or a list of strings");
  }
  for (const std::string& x : out) {
    if (x.empty()) invalid("stop", "'stop' strings must not be empty");
    if (x.size() > kMaxStopLength) invalid("stop", fmt::format("'stop' strings are at most {} bytes", kMaxStopLength));
  }
  return out;
}

}  // namespace

json error_body(const ApiError& e) {
  return {{"error",
           {{"message", e.what()},
            {"type", e.type},
            {"param", e.param.empty() ? json() : json(e.param)},
            {"code", e.code.empty() ? json() : json(e.code)}}}};
}

std::vector<std::vector<Request>> ParsedRequest::choices() const {
  std::vector<std::vector<Request>> out;
  uint64_t stream = 0;  // the choice's index in the response
  for (const auto& prompt : prompts) {
    out.emplace_back();
    for (int64_t j = 0; j < n; ++j) {
      Request r{prompt, params};
      r.params.sample_stream = stream++;
      out.back().push_back(std::move(r));
    }
  }
  return out;
}

ParsedRequest parse_request(Endpoint endpoint, const json& body, const ApiContext& ctx) {
  if (!body.is_object()) invalid("", "the request body must be a JSON object");
  if (const json* m = field(body, "model")) {
    if (!m->is_string()) invalid("model", "'model' must be a string");
    if (m->get<std::string>() != ctx.model_name)
      throw ApiError(404, "invalid_request_error",
                     fmt::format("the model '{}' does not exist (this server serves '{}')", m->get<std::string>(),
                                 ctx.model_name),
                     "model", "model_not_found");
  }
  refuse_unsupported(body, endpoint);
  ParsedRequest r;
  r.endpoint = endpoint;
  r.prompts = endpoint == Endpoint::chat ? std::vector<std::vector<int32_t>>{chat_prompt(body, ctx)}
                                         : completion_prompts(body, ctx);
  r.n = integer(body, "n", 1, 1, kMaxChoices);
  r.stream = boolean(body, "stream", false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) invalid("stream_options", "'stream_options' must be an object");
    r.include_usage = boolean(*so, "include_usage", false);
  }
  size_t longest = 0;
  for (const auto& p : r.prompts) longest = std::max(longest, p.size());
  const int64_t room = ctx.max_total_tokens - static_cast<int64_t>(longest);
  if (room < 0)
    invalid(endpoint == Endpoint::chat ? "messages" : "prompt",
            fmt::format("the prompt has {} tokens, more than this model's maximum context length of {} tokens",
                        longest, ctx.max_total_tokens));
  RequestParams& p = r.params;
  // Completions produce 16 tokens unless told; chat runs to the end of the context.
  const char* max_name = endpoint == Endpoint::chat && field(body, "max_completion_tokens") ? "max_completion_tokens"
                                                                                           : "max_tokens";
  p.max_tokens = integer(body, max_name, endpoint == Endpoint::chat ? room : std::min<int64_t>(16, room), 0,
                         std::numeric_limits<int64_t>::max());
  if (p.max_tokens > room)
    invalid(max_name, fmt::format("this model's maximum context length is {} tokens, but {} were requested ({} in "
                                  "the prompt, {} to generate)",
                                  ctx.max_total_tokens, static_cast<int64_t>(longest) + p.max_tokens, longest,
                                  p.max_tokens));
  p.min_tokens = integer(body, "min_tokens", 0, 0, p.max_tokens);
  p.sampling.temperature = static_cast<float>(number(body, "temperature", 1.0, 0.0, 2.0));
  p.sampling.top_p = static_cast<float>(number(body, "top_p", 1.0, 0.0, 1.0, /*lo_open=*/true));
  const int64_t top_k = integer(body, "top_k", 0, -1, std::numeric_limits<int32_t>::max());
  p.sampling.top_k = top_k < 0 ? 0 : top_k;  // -1: all tokens, as vLLM takes it
  r.seeded = field(body, "seed") != nullptr;
  p.sampling.seed = static_cast<uint64_t>(
      integer(body, "seed", 0, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()));
  p.stop_strings = stop_strings(body);
  if (!p.stop_strings.empty() && !ctx.tokenizer) invalid("stop", "'stop' needs a tokenizer; this model has none");
  if (const json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) invalid("stop_token_ids", "'stop_token_ids' must be a list of token ids");
    for (const json& id : *ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= ctx.vocab_size)
        invalid("stop_token_ids", fmt::format("'stop_token_ids' must hold token ids below {}", ctx.vocab_size));
      p.stop_token_ids.push_back(id.get<int32_t>());
    }
  }
  p.ignore_eos = boolean(body, "ignore_eos", ctx.ignore_eos_default);
  p.presence_penalty = static_cast<float>(number(body, "presence_penalty", 0.0, -2.0, 2.0));
  p.frequency_penalty = static_cast<float>(number(body, "frequency_penalty", 0.0, -2.0, 2.0));
  if (endpoint == Endpoint::completions) {
    // An integer; false (which some clients send for "none") is taken as absent.
    if (const json* v = field(body, "logprobs"); v && !(v->is_boolean() && !v->get<bool>()))
      p.logprobs = integer(body, "logprobs", -1, 0, kMaxCompletionLogprobs);
    r.echo = boolean(body, "echo", false);
    p.echo_logprobs = r.echo && p.logprobs >= 0;
  } else if (boolean(body, "logprobs", false)) {
    p.logprobs = integer(body, "top_logprobs", 0, 0, kMaxTopLogprobs);
  } else if (field(body, "top_logprobs")) {
    invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  }
  return r;
}

std::string echo_text(const ParsedRequest& r, size_t choice, const ApiContext& ctx) {
  if (!r.echo || !ctx.tokenizer) return "";
  return ctx.tokenizer->decode(r.prompts[choice / static_cast<size_t>(r.n)]);
}

namespace {

// Whether s is well-formed UTF-8 (a JSON string can carry it as it is): no overlong forms, no UTF-16
// surrogates, nothing past U+10FFFF.
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<uint8_t>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t j = 1; j < n; ++j)
      if ((static_cast<uint8_t>(s[i + j]) & 0xc0) != 0x80) return false;
    const auto c1 = n > 1 ? static_cast<uint8_t>(s[i + 1]) : 0;
    if ((n == 2 && c < 0xc2) || (c == 0xe0 && c1 < 0xa0) || (c == 0xed && c1 >= 0xa0) || (c == 0xf0 && c1 < 0x90) ||
        c > 0xf4 || (c == 0xf4 && c1 >= 0x90))
      return false;
    i += n;
  }
  return true;
}

// A token's text as a JSON string: as it is, or, when it is not whole UTF-8 (a byte-fallback token, part
// of a character), OpenAI's "bytes:\xNN..." escapes.
std::string token_string(const std::string& piece) {
  if (valid_utf8(piece)) return piece;
  std::string out = "bytes:";
  for (char c : piece) out += fmt::format("\\x{:02x}", static_cast<uint8_t>(c));
  return out;
}

// Characters (code points) in UTF-8 bytes: every byte but continuation bytes starts one.
int64_t utf8_chars(const std::string& s) {
  return std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<uint8_t>(c) & 0xc0) != 0x80; });
}

json byte_list(const std::string& s) {
  json out = json::array();
  for (char c : s) out.push_back(static_cast<uint8_t>(c));
  return out;
}

}  // namespace

json LogprobsWriter::empty() const {
  if (endpoint_ == Endpoint::chat) return {{"content", json::array()}};
  return {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
          {"text_offset", json::array()}};
}

void LogprobsWriter::append(json& into, const json& more) {
  for (const auto& [key, list] : more.items())
    for (const json& x : list) into[key].push_back(x);
}

LogprobsWriter::LogprobsWriter(Endpoint endpoint, const Tokenizer* tokenizer, std::span<const int32_t> context)
    : endpoint_(endpoint), tokenizer_(tokenizer) {
  if (tokenizer_)
    for (int32_t id : context) tokenizer_->decode_next(id, state_);
}

LogprobsWriter logprobs_writer(const ParsedRequest& r, size_t choice, const ApiContext& ctx) {
  if (r.params.echo_logprobs) return LogprobsWriter(r.endpoint, ctx.tokenizer);  // the prompt's tokens come first
  return LogprobsWriter(r.endpoint, ctx.tokenizer, r.prompts[choice / static_cast<size_t>(r.n)]);
}

void LogprobsWriter::add(json& out, const TokenLogprob& t) {
  // A token's text in its context: SPM drops the leading space of the first text token, so what a token
  // adds depends on what came before (alternatives are decoded in the chosen token's context).
  const Tokenizer::DecodeState before = state_;
  auto text_of = [&](int32_t id, Tokenizer::DecodeState& st) {
    return tokenizer_ ? tokenizer_->decode_next(id, st) : fmt::format("token_id:{}", id);
  };
  const std::string piece = text_of(t.token, state_);
  auto alternative = [&](int32_t id) {
    Tokenizer::DecodeState st = before;
    return text_of(id, st);
  };
  const json lp = t.logprob ? json(*t.logprob) : json();
  if (endpoint_ == Endpoint::chat) {
    json top = json::array();
    for (const auto& [id, v] : t.top) {
      const std::string alt = alternative(id);
      top.push_back({{"token", token_string(alt)}, {"logprob", v}, {"bytes", byte_list(alt)}});
    }
    out["content"].push_back({{"token", token_string(piece)}, {"logprob", lp}, {"bytes", byte_list(piece)},
                              {"top_logprobs", top}});
    return;
  }
  json top = json();
  if (t.logprob) {  // the most likely tokens and the chosen one (OpenAI: up to logprobs + 1 entries)
    top = json::object();
    for (const auto& [id, v] : t.top) top.emplace(token_string(alternative(id)), v);
    top.emplace(token_string(piece), *t.logprob);
  }
  out["tokens"].push_back(token_string(piece));
  out["token_logprobs"].push_back(lp);
  out["top_logprobs"].push_back(top);
  out["text_offset"].push_back(chars_);
  if (tokenizer_) chars_ += utf8_chars(piece);  // without a tokenizer the text is empty
}

json LogprobsWriter::write(const RequestEvent& e) {
  json out = empty();
  for (const TokenLogprob& t : e.prompt_logprobs) add(out, t);
  if (e.logprob) add(out, *e.logprob);
  return out;
}

Usage usage_of(const ParsedRequest& r, const std::vector<ChoiceResult>& choices) {
  Usage u;
  for (const auto& p : r.prompts) u.prompt_tokens += static_cast<int64_t>(p.size());
  for (const ChoiceResult& c : choices) u.completion_tokens += c.tokens;
  const size_t n = static_cast<size_t>(r.n);
  for (size_t first = 0; first < choices.size(); first += n) {  // a prompt's n choices: the fewest cached
    const auto end = choices.begin() + static_cast<std::ptrdiff_t>(std::min(choices.size(), first + n));
    u.cached_prompt_tokens +=
        std::min_element(choices.begin() + static_cast<std::ptrdiff_t>(first), end, [](const auto& a, const auto& b) {
          return a.cached_prompt_tokens < b.cached_prompt_tokens;
        })->cached_prompt_tokens;
  }
  return u;
}

namespace {
json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_prompt_tokens}}}};
}
json finish_json(const std::optional<FinishReason>& f) {
  // A cancelled request's stream ends without a reason a client knows; it only reaches clients that are gone.
  return f ? json(finish_reason_name(*f)) : json();
}
}  // namespace

json response_body(const ParsedRequest& r, const std::string& id, int64_t created, const std::string& model,
                   const std::vector<ChoiceResult>& choices) {
  const bool chat = r.endpoint == Endpoint::chat;
  json list = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    json c = {{"index", i}, {"logprobs", choices[i].logprobs}, {"finish_reason", finish_json(choices[i].finish)}};
    if (chat) c["message"] = {{"role", "assistant"}, {"content", choices[i].text}};
    else c["text"] = choices[i].text;
    list.push_back(std::move(c));
  }
  return {{"id", id},
          {"object", chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", list},
          {"usage", usage_json(usage_of(r, choices))}};
}

json stream_chunk(const ParsedRequest& r, const std::string& id, int64_t created, const std::string& model,
                  int64_t index, const std::string& text, const std::optional<FinishReason>& finish, bool first,
                  const json& logprobs) {
  const bool chat = r.endpoint == Endpoint::chat;
  json c = {{"index", index}, {"logprobs", logprobs}, {"finish_reason", finish_json(finish)}};
  if (chat) {
    c["delta"] = json::object();
    if (first) c["delta"]["role"] = "assistant";
    if (!text.empty() || first) c["delta"]["content"] = text;
  } else {
    c["text"] = text;
  }
  return {{"id", id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({c})}};
}

json usage_chunk(const ParsedRequest& r, const std::string& id, int64_t created, const std::string& model,
                 const Usage& usage) {
  return {{"id", id},
          {"object", r.endpoint == Endpoint::chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array()},
          {"usage", usage_json(usage)}};
}

}  // namespace polar::serve
