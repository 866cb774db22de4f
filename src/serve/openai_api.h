// The OpenAI-compatible API's requests and responses, as pure functions over JSON (no sockets, no engine),
// so the request parser is tested and fuzzed on its own: a request body becomes the scheduler requests it
// asks for, or an ApiError with the HTTP status and OpenAI's error body; results become the response bodies
// and server-sent-event chunks of /v1/completions and /v1/chat/completions.
#pragma once
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/chat_template.h"
#include "io/tokenizer.h"
#include "runtime/scheduler.h"

namespace polar::serve {

// An error the client gets: status, OpenAI's type ("invalid_request_error", ...), the parameter at fault.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string type, std::string message, std::string param = "", std::string code = "")
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string type, param, code;
};
// {"error": {"message", "type", "param", "code"}} (param and code null when empty).
nlohmann::json error_body(const ApiError& e);

// What a request is checked against.
struct ApiContext {
  std::string model_name;           // the served model's name: a request naming another gets 404
  const Tokenizer* tokenizer = nullptr;  // null: prompts must be token ids, responses carry no text (--shape)
  const ChatTemplate* chat_template = nullptr;  // null: /v1/chat/completions is refused
  std::string bos_token, eos_token;  // the template's bos_token / eos_token
  int64_t vocab_size = 0;
  int64_t max_total_tokens = 0;  // prompt + output of one sequence at most (the context, or the cache if smaller)
  bool ignore_eos_default = false;  // synthetic models: EOS never ends a request
};

enum class Endpoint { completions, chat };

struct ParsedRequest {
  Endpoint endpoint = Endpoint::completions;
  std::vector<std::vector<int32_t>> prompts;  // token ids, one list per prompt
  int64_t n = 1;                               // choices per prompt
  RequestParams params;  // max_tokens, sampling, stop conditions; sample_stream is set per choice
  bool seeded = false;   // "seed" given: choices draw from streams 0..; else the server draws a seed
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool echo = false;           // completions: the prompt's text (and, with logprobs, its tokens) come first
  // params.logprobs >= 0: completions' "logprobs" (0..5) or chat's "logprobs": true with "top_logprobs"
  // (0..20); params.echo_logprobs: echo with logprobs.
  // The scheduler requests, per prompt its n choices (submitted together: Scheduler::submit_choices); prompt
  // p's choice j is choice p * n + j of the response.
  std::vector<std::vector<Request>> choices() const;
};

// Parses a request body (already a JSON value) for an endpoint; ApiError (400, or 404 for an unknown model,
// or 400 for chat without a template) names the parameter.
ParsedRequest parse_request(Endpoint endpoint, const nlohmann::json& body, const ApiContext& ctx);

// The text a completions choice begins with: its prompt decoded, when the request echoes (else, and without a
// tokenizer, ""). Decoded from the ids, so that its tokens' text_offset values point into it.
std::string echo_text(const ParsedRequest& r, size_t choice, const ApiContext& ctx);

// A choice's log-probabilities in the API's format, written as its events arrive (whole or chunk by chunk).
// Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}: a token is the text it adds
// (invalid UTF-8 as "bytes:\\xNN..." escapes; "token_id:N" without a tokenizer, where the text is empty);
// top_logprobs maps the most likely tokens and the chosen one to their log-probabilities (null for the
// prompt's first token); text_offset counts the characters (code points) of the choice's text before the
// token. Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
class LogprobsWriter {
 public:
  // `context`: the tokens before the first one written (the prompt, unless it is echoed), which the
  // tokens' text continues.
  LogprobsWriter(Endpoint endpoint, const Tokenizer* tokenizer, std::span<const int32_t> context = {});
  // The logprobs object of an event's tokens: its prompt tokens (echo), then its produced token.
  nlohmann::json write(const RequestEvent& e);
  // An object with no tokens, to append() to.
  nlohmann::json empty() const;
  // Appends the arrays of `more` (a write()) to those of `into`.
  static void append(nlohmann::json& into, const nlohmann::json& more);

 private:
  void add(nlohmann::json& out, const TokenLogprob& t);
  Endpoint endpoint_;
  const Tokenizer* tokenizer_;
  Tokenizer::DecodeState state_;  // of the text so far (SPM drops the leading space of the first text token)
  int64_t chars_ = 0;             // characters of the choice's text so far
};
// The writer of choice `choice` of a request.
LogprobsWriter logprobs_writer(const ParsedRequest& r, size_t choice, const ApiContext& ctx);

// One choice's outcome, for the response.
struct ChoiceResult {
  std::string text;
  int64_t tokens = 0;  // tokens produced (a stop token included)
  FinishReason finish = FinishReason::length;
  nlohmann::json logprobs;  // null: not asked for; else LogprobsWriter's object
  int64_t cached_prompt_tokens = 0;  // RequestStream::cached_prompt_tokens
};

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
  // Prompt tokens read from the prefix cache: per prompt, the fewest any of its choices found there (the
  // later choices of a prompt attach what the first computed; that is not a hit from an earlier request).
  int64_t cached_prompt_tokens = 0;
};
Usage usage_of(const ParsedRequest& r, const std::vector<ChoiceResult>& choices);

// A whole (non-streaming) response.
nlohmann::json response_body(const ParsedRequest& r, const std::string& id, int64_t created, const std::string& model,
                             const std::vector<ChoiceResult>& choices);
// A streaming chunk: choice `index`'s new text and, on its last chunk, its finish reason; `first` adds the
// chat role; `logprobs`, the chunk's tokens' (LogprobsWriter::write) or null. Serialised as
// "data: {...}\n\n" by the server.
nlohmann::json stream_chunk(const ParsedRequest& r, const std::string& id, int64_t created, const std::string& model,
                            int64_t index, const std::string& text, const std::optional<FinishReason>& finish,
                            bool first, const nlohmann::json& logprobs = nullptr);
// The last chunk with stream_options.include_usage: no choices, the usage.
nlohmann::json usage_chunk(const ParsedRequest& r, const std::string& id, int64_t created, const std::string& model,
                           const Usage& usage);

}  // namespace polar::serve
