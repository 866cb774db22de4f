// polar serve: the OpenAI-compatible HTTP server (serve/server.h) over a checkpoint or a synthetic shape.
// The socket is bound first (/health answers 503 while the model loads); SIGTERM or SIGINT stops accepting,
// lets running requests finish within --drain-timeout and exits 0.
#ifdef POLAR_HAVE_SERVE
#include <csignal>
#include <fstream>
#include <pthread.h>
#include <sstream>

#include <fmt/core.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "serve/server.h"

namespace polar::cli {

namespace {

struct ServeArgs {
  BenchModelOptions source;
  serve::ServerOptions server;
  std::string served_model_name;
  std::string chat_template_file;
  BatchingOptions batching;
  uint64_t seed = 0;
};

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot read {} {}", what, path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

int run_serve(ServeArgs& a) {
  // SIGINT and SIGTERM are taken by sigwait below, on this thread: blocked here, before any thread starts,
  // every thread inherits the mask, so no other thread is interrupted by them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::optional<ChatTemplate> chat_template;
  if (!a.chat_template_file.empty())
    chat_template.emplace(read_text_file(a.chat_template_file, "--chat-template"));
  const std::string name = a.served_model_name.empty() ? a.source.label() : a.served_model_name;
  serve::Server server(a.server);
  fmt::print(stderr, "listening on http://{}:{} (loading {})\n", a.server.host, server.port(), name);

  LoadedModel m = a.source.load(a.seed);
  load_sparsity(m, a.source.model, /*random_allowed=*/true, a.seed);
  const ModelConfig& c = m.model->config();
  const Tokenizer* tok = m.checkpoint.tokenizer.get();
  // The model's own template unless --chat-template overrides it; one it cannot parse stops the start-up.
  std::string template_source = a.chat_template_file.empty() ? "" : "--chat-template " + a.chat_template_file;
  if (!chat_template && m.checkpoint.chat_template) {
    try {
      chat_template.emplace(*m.checkpoint.chat_template);
    } catch (const Error& e) {
      fail("the chat template of {}: {} (pass another with --chat-template FILE)", name, e.what());
    }
    template_source = "the model's chat template";
  }
  const int64_t kv_tokens = a.batching.kv_tokens_for(m, c.max_positions);
  serve::ApiContext ctx;
  ctx.model_name = name;
  ctx.tokenizer = tok;
  ctx.chat_template = chat_template ? &*chat_template : nullptr;
  if (tok) {
    ctx.bos_token = tok->bos_text();
    ctx.eos_token = tok->eos_text();
  }
  ctx.vocab_size = c.vocab_size;
  ctx.max_total_tokens = std::min<int64_t>(c.max_positions, kv_tokens);
  ctx.ignore_eos_default = tok == nullptr;
  server.serve(*m.model,
               {.max_seqs = a.batching.max_seqs, .max_batch_tokens = a.batching.max_batch_tokens, .kv_tokens = kv_tokens,
                .sparsity = m.sparsity.get(), .prefix_caching = a.batching.prefix_caching, .tokenizer = tok},
               ctx, m.sparsity ? m.density : 1.0);
  fmt::print(stderr, "serving {} on http://{}:{}: {} sequences at most, KV cache of {} tokens ({}){}{}\n",
             name, a.server.host, server.port(), a.batching.max_seqs, kv_tokens, kv_cache_size(*m.model, kv_tokens),
             m.sparsity ? ", sparse decoding" : "",
             chat_template ? ", chat: " + template_source : ", no chat template");

  int sig = 0;
  sigwait(&signals, &sig);
  fmt::print(stderr, "{}: draining (up to {:g} s) and stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
             a.server.drain_timeout_s);
  server.shutdown();
  fmt::print(stderr, "stopped\n");
  return 0;
}

}  // namespace

Command serve_command() {
  auto a = std::make_shared<ServeArgs>();
  return {"serve",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("serve", "OpenAI-compatible HTTP server (completions, chat completions, streaming)");
            c->footer(
                "Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.\n"
                "--shape NAME serves a synthetic model with random weights (token-id prompts, EOS ignored) for "
                "benchmarks; --density X below 1 with it draws random routers.\n");
            a->source.add(*c);
            c->add_option("--host", a->server.host, "Address to listen on")->capture_default_str();
            c->add_option("--port", a->server.port, "Port to listen on (0: any free port)")->capture_default_str()
                ->check(CLI::Range(0, 65535));
            c->add_option("--served-model-name", a->served_model_name,
                          "The model's name in the API (default: the model file's or shape's name)");
            c->add_option("--api-key", a->server.api_key, "Require 'Authorization: Bearer KEY' on /v1 routes");
            c->add_option("--chat-template", a->chat_template_file, "Jinja chat template file for /v1/chat/completions");
            a->batching.add(*c, "max-seqs full contexts, within 90% of free memory");
            c->add_option("--max-queue", a->server.max_queue, "Requests waiting at most; beyond, 429")
                ->capture_default_str()->check(at_least(1));
            c->add_option("--max-body", a->server.max_body, "Request body bytes at most; beyond, 413")
                ->capture_default_str()->check(at_least(1));
            c->add_option("--http-threads", a->server.http_threads, "Connections served at once")
                ->capture_default_str()->check(at_least(1));
            c->add_option("--drain-timeout", a->server.drain_timeout_s,
                          "On SIGTERM/SIGINT: seconds running requests may take to finish")
                ->capture_default_str()->check(at_least(0));
            c->add_option("--seed", a->seed, "Seed of a synthetic model's weights and random routers")->capture_default_str();
          },
          [a] { return run_serve(*a); }};
}

}  // namespace polar::cli
#endif  // POLAR_HAVE_SERVE
