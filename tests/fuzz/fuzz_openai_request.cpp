// OpenAI request bodies (serve/openai_api.h), as polar serve receives them: the JSON parse with its depth
// bound, then parse_request for both endpoints, with stories260K's tokenizer and a chat template. A body may
// be refused (ApiError, or polar::Error from a tokenizer or template limit); anything else — a crash, a
// sanitizer report, a hang — is a bug. An accepted body must give requests the scheduler can take.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/gguf.h"
#include "io/json.h"
#include "io/tokenizer.h"
#include "serve/openai_api.h"

using namespace polar;

namespace {

std::unique_ptr<Tokenizer> tokenizer;
std::unique_ptr<ChatTemplate> chat_template;
serve::ApiContext ctx;

std::string shared_path(const std::string& rel) {
  const char* env = std::getenv("POLAR_SHARED");
  return (std::filesystem::path(env && *env ? env : POLAR_DEFAULT_SHARED) / rel).string();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  try {
    tokenizer = load_tokenizer(gguf::File::open(shared_path("models/stories260K/stories260K.gguf")));
    // ChatML, as SmolLM2 and Qwen write it: loops, conditionals and string concatenation over the messages.
    chat_template = std::make_unique<ChatTemplate>(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}");
  } catch (const Error& e) {
    std::fprintf(stderr, "fuzz_openai_request: %s\n", e.what());
    std::abort();
  }
  ctx.model_name = "m";
  ctx.tokenizer = tokenizer.get();
  ctx.chat_template = chat_template.get();
  ctx.vocab_size = tokenizer->vocab_size();
  ctx.max_total_tokens = 512;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json body;
  try {
    body = parse_json(fuzz::as_text(data, size));
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  for (serve::Endpoint endpoint : {serve::Endpoint::completions, serve::Endpoint::chat}) {
    try {
      const serve::ParsedRequest r = serve::parse_request(endpoint, body, ctx);
      for (const std::vector<Request>& choices : r.choices())
        for (const Request& q : choices) {
          fuzz::require(!q.prompt.empty(), "an accepted request has a prompt");
          fuzz::require(static_cast<int64_t>(q.prompt.size()) + q.params.max_tokens <= ctx.max_total_tokens,
                        "an accepted request fits the context");
          for (int32_t id : q.prompt) fuzz::require(id >= 0 && id < ctx.vocab_size, "prompt ids in the vocabulary");
          fuzz::require(q.params.logprobs >= -1 && q.params.logprobs <= kMaxTopLogprobs &&
                            (!q.params.echo_logprobs || q.params.logprobs >= 0),
                        "logprobs the scheduler takes");
        }
    } catch (const serve::ApiError& e) {
      fuzz::require(e.status >= 400 && e.status < 500, "a refused request is a client error");
    } catch (const Error&) {
    }
  }
  return 0;
}
