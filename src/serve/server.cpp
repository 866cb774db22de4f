#include "serve/server.h"

#include <csignal>
#include <ctime>
#include <random>

#include <fmt/format.h>
#include <httplib.h>

#include "io/json.h"

namespace polar::serve {

using nlohmann::json;

namespace {

// While a streaming request waits for its first token (queued, or behind a long prompt), an SSE comment is
// sent this often: a client that has gone is noticed (the write fails) and its request cancelled.
constexpr auto kKeepAlive = std::chrono::seconds(1);
// How long a streaming loop waits on one choice before looking at the others and the connection.
constexpr auto kPoll = std::chrono::milliseconds(20);
// Connections the kernel queues before they are accepted (capped by net.core.somaxconn).
constexpr int kListenBacklog = 1024;

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(error_body(e).dump(), "application/json");
}

const char* error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 500: return "internal_error";
    case 503: return "service_unavailable";
    default: return "invalid_request_error";
  }
}

std::string request_id(Endpoint e, uint64_t n) { return fmt::format("{}-{:x}", e == Endpoint::chat ? "chatcmpl" : "cmpl", n); }

}  // namespace

Server::Server(ServerOptions options) : options_(std::move(options)), http_(std::make_unique<httplib::Server>()) {
  std::signal(SIGPIPE, SIG_IGN);  // a client gone mid-write is a failed write, not the end of the process
  started_ = static_cast<int64_t>(std::time(nullptr));
  const int threads = options_.http_threads;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  http_->set_payload_max_length(options_.max_body);
  http_->set_write_timeout(10, 0);  // a reader that takes nothing for 10 s is dropped (and its request cancelled)
  metrics_ = std::make_unique<ServerMetrics>(1.0);
  route();
  // httplib's own socket options set SO_REUSEPORT, which lets a second server bind a port already in use
  // without an error; SO_REUSEADDR alone only allows rebinding after a restart. The socket is kept so its
  // listen backlog can be raised from httplib's 5, which under a burst of connections drops SYNs (clients
  // then wait seconds to retry).
  int listen_fd = -1;
  http_->set_socket_options([&listen_fd](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    listen_fd = sock;
  });
  port_ = options_.port == 0 ? http_->bind_to_any_port(options_.host) : options_.port;
  const bool bound = options_.port == 0 ? port_ > 0 : http_->bind_to_port(options_.host, options_.port);
  check(bound, "cannot listen on {}:{} (in use, or not an address of this machine)", options_.host, options_.port);
  if (listen_fd >= 0) ::listen(listen_fd, kListenBacklog);
  listener_ = std::thread([this] { http_->listen_after_bind(); });
}

Server::~Server() { shutdown(); }

void Server::serve(Model& model, const SchedulerOptions& scheduler, ApiContext ctx, double head_density) {
  ctx_ = std::move(ctx);
  metrics_->set_density(head_density);
  scheduler_ = std::make_unique<Scheduler>(model, scheduler);
  // The loop's device work goes to the model's device (--device cuda:N), not this new thread's default: the
  // Engine makes rank 0's device current on whichever thread steps it, before any of that work.
  loop_ = std::thread([this] { scheduler_->run(); });
  ready_.store(true);
}

void Server::shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  draining_.store(true);
  if (scheduler_) {
    const Clock::time_point deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options_.drain_timeout_s));
    while (Clock::now() < deadline && (scheduler_->running() > 0 || scheduler_->waiting() > 0))
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::lock_guard lock(inflight_mu_);
    for (const auto& s : inflight_) s->cancel();
  }
  http_->stop();  // the listener returns; the request threads finish (their streams have ended) and are joined
  if (listener_.joinable()) listener_.join();
  if (scheduler_) {
    scheduler_->stop();
    if (loop_.joinable()) loop_.join();
  }
}

void Server::track(const std::shared_ptr<RequestStream>& s) {
  std::lock_guard lock(inflight_mu_);
  inflight_.insert(s);
}

void Server::untrack(const std::shared_ptr<RequestStream>& s) {
  std::lock_guard lock(inflight_mu_);
  inflight_.erase(s);
}

void Server::record(const ParsedRequest& r, size_t choice, FinishReason reason, const RequestStream& stream) {
  metrics_->finished(reason, static_cast<int64_t>(r.prompts[choice / static_cast<size_t>(r.n)].size()), stream.times());
}

void Server::authorize(const httplib::Request& req) const {
  if (options_.api_key.empty()) return;
  if (req.get_header_value("Authorization") != "Bearer " + options_.api_key)
    throw ApiError(401, "authentication_error", "missing or wrong API key (send 'Authorization: Bearer <key>')", "",
                   "invalid_api_key");
}

void Server::route() {
  httplib::Server& h = *http_;
  h.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.status = ready_.load() && !draining_.load() ? 200 : 503;
    res.set_content(json{{"status", ready_.load() ? (draining_.load() ? "draining" : "ok") : "loading"}}.dump(),
                    "application/json");
  });
  h.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_->render(ready_.load() ? scheduler_.get() : nullptr), "text/plain; version=0.0.4");
  });
  h.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    try {
      authorize(req);
      if (!ready_.load()) throw ApiError(503, "service_unavailable", "the model is still loading");
      res.set_content(json{{"object", "list"},
                           {"data", json::array({{{"id", ctx_.model_name},
                                                  {"object", "model"},
                                                  {"created", started_},
                                                  {"owned_by", "polar"},
                                                  {"max_model_len", ctx_.max_total_tokens}}})}}
                          .dump(),
                      "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });
  h.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handle_generate(Endpoint::completions, req, res);
  });
  h.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handle_generate(Endpoint::chat, req, res);
  });
  // vLLM's route of the same name: forget the prefix cache, so that a benchmark serving the same prompts
  // again measures computation, not the cache. Authorized like the API; no body.
  h.Post("/reset_prefix_cache", [this](const httplib::Request& req, httplib::Response& res) {
    try {
      authorize(req);
      if (!ready_.load()) throw ApiError(503, "service_unavailable", "the model is still loading");
      scheduler_->reset_prefix_cache();
      res.set_content(json{{"status", "ok"}}.dump(), "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });
  // Known routes with the wrong method: 405, naming the allowed one.
  auto wrong_method = [](const char* allowed) {
    return [allowed](const httplib::Request& req, httplib::Response& res) {
      res.set_header("Allow", allowed);
      send_error(res, ApiError(405, "invalid_request_error",
                               fmt::format("{} {} is not allowed; use {}", req.method, req.path, allowed)));
    };
  };
  for (const char* path : {"/v1/completions", "/v1/chat/completions", "/reset_prefix_cache"}) {
    h.Get(path, wrong_method("POST"));
    h.Put(path, wrong_method("POST"));
    h.Delete(path, wrong_method("POST"));
    h.Patch(path, wrong_method("POST"));
  }
  for (const char* path : {"/v1/models", "/health", "/metrics"}) {
    h.Post(path, wrong_method("GET"));
    h.Put(path, wrong_method("GET"));
    h.Delete(path, wrong_method("GET"));
  }
  // Every response, by route (unknown paths as "other") and status.
  h.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    const bool known = req.path == "/v1/completions" || req.path == "/v1/chat/completions" ||
                       req.path == "/v1/models" || req.path == "/health" || req.path == "/metrics" ||
                       req.path == "/reset_prefix_cache";
    metrics_->response(known ? req.path : "other", res.status);
  });
  // Whatever httplib answers by itself (an unknown route, a body over --max-body, a malformed request line)
  // gets OpenAI's error body too.
  h.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string message;
    if (res.status == 404) message = fmt::format("no route {} {}", req.method, req.path);
    else if (res.status == 413) message = "the request body is larger than the server's --max-body";
    else message = fmt::format("HTTP {}", res.status);
    res.set_content(error_body(ApiError(res.status, error_type(res.status), message)).dump(), "application/json");
  });
  h.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, "internal_error", fmt::format("internal error: {}", what)));
  });
}

void Server::handle_generate(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
  try {
    authorize(req);
    if (!ready_.load()) throw ApiError(503, "service_unavailable", "the model is still loading");
    if (draining_.load()) throw ApiError(503, "service_unavailable", "the server is shutting down");
    json body;
    try {
      body = parse_json(req.body);
    } catch (const json::exception& e) {
      throw ApiError(400, "invalid_request_error", fmt::format("the request body is not valid JSON: {}", e.what()));
    }
    auto parsed = std::make_shared<ParsedRequest>(parse_request(endpoint, body, ctx_));
    if (!parsed->seeded) parsed->params.sampling.seed = std::random_device()() | (uint64_t{std::random_device()()} << 32);
    const int64_t requests = static_cast<int64_t>(parsed->prompts.size()) * parsed->n;  // a choice is a request
    if (scheduler_->waiting() + requests > options_.max_queue)
      throw ApiError(429, "rate_limit_error",
                     fmt::format("the queue is full ({} requests waiting, --max-queue {}): retry later",
                                 scheduler_->waiting(), options_.max_queue));
    auto streams = std::make_shared<std::vector<std::shared_ptr<RequestStream>>>();
    auto release = [this, streams] {  // cancels what has not finished (a no-op for the finished) and forgets all
      for (const auto& s : *streams) {
        s->cancel();
        untrack(s);
      }
    };
    try {
      for (std::vector<Request>& prompt_choices : parsed->choices())
        for (std::shared_ptr<RequestStream>& s : scheduler_->submit_choices(std::move(prompt_choices))) {
          streams->push_back(std::move(s));
          track(streams->back());
        }
    } catch (const Error& e) {
      release();
      throw ApiError(400, "invalid_request_error", e.what());
    }
    const std::string id = request_id(endpoint, next_id_.fetch_add(1));
    const int64_t created = static_cast<int64_t>(std::time(nullptr));

    if (!parsed->stream) {
      std::vector<ChoiceResult> choices(streams->size());
      for (size_t i = 0; i < streams->size(); ++i) {
        LogprobsWriter logprobs = logprobs_writer(*parsed, i, ctx_);
        choices[i].text = echo_text(*parsed, i, ctx_);
        if (parsed->params.logprobs >= 0) choices[i].logprobs = logprobs.empty();
        while (std::optional<RequestEvent> e = (*streams)[i]->next()) {
          choices[i].text += e->text;
          choices[i].tokens += e->token.has_value();
          if (parsed->params.logprobs >= 0) LogprobsWriter::append(choices[i].logprobs, logprobs.write(*e));
          if (e->finish) {
            choices[i].finish = *e->finish;
            choices[i].cached_prompt_tokens = (*streams)[i]->cached_prompt_tokens();
            record(*parsed, i, *e->finish, *(*streams)[i]);
          }
        }
      }
      release();
      res.set_content(response_body(*parsed, id, created, ctx_.model_name, choices).dump(), "application/json");
      return;
    }

    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, parsed, streams, id, created](size_t, httplib::DataSink& sink) {
          auto write = [&](const std::string& s) { return sink.is_writable() && sink.write(s.data(), s.size()); };
          auto send = [&](const json& j) { return write("data: " + j.dump() + "\n\n"); };
          const size_t n = streams->size();
          std::vector<ChoiceResult> choices(n);
          std::vector<bool> done(n, false), echoed(n, !parsed->echo);  // echo: the prompt goes in the first chunk
          std::vector<LogprobsWriter> logprobs;
          for (size_t i = 0; i < n; ++i) logprobs.push_back(logprobs_writer(*parsed, i, ctx_));
          if (parsed->endpoint == Endpoint::chat)  // the role first, as OpenAI's streams begin
            for (size_t i = 0; i < n; ++i)
              if (!send(stream_chunk(*parsed, id, created, ctx_.model_name, static_cast<int64_t>(i), "", std::nullopt,
                                     true)))
                return false;
          Clock::time_point last_write = Clock::now();
          for (size_t left = n; left > 0;) {
            bool wrote = false;
            for (size_t i = 0; i < n; ++i) {
              if (done[i]) continue;
              const Clock::time_point wait_until = Clock::now() + (wrote ? Clock::duration(0) : Clock::duration(kPoll));
              while (std::optional<RequestEvent> e = (*streams)[i]->next(wait_until)) {
                choices[i].tokens += e->token.has_value();
                if (e->finish) {
                  done[i] = true;
                  --left;
                  choices[i].cached_prompt_tokens = (*streams)[i]->cached_prompt_tokens();
                  record(*parsed, i, *e->finish, *(*streams)[i]);
                }
                const std::string text = (echoed[i] ? "" : echo_text(*parsed, i, ctx_)) + e->text;
                echoed[i] = true;
                const bool scored = e->logprob || !e->prompt_logprobs.empty();
                // An event without new text or tokens scored is skipped, except for a model without a tokenizer
                // (no text ever): there each token is a chunk, so clients and benchmarks still see every token.
                if (text.empty() && !scored && !e->finish && ctx_.tokenizer) continue;
                if (!send(stream_chunk(*parsed, id, created, ctx_.model_name, static_cast<int64_t>(i), text, e->finish,
                                       false, parsed->params.logprobs >= 0 ? logprobs[i].write(*e) : json())))
                  return false;
                wrote = true;
                if (done[i]) break;
              }
            }
            if (wrote) {
              last_write = Clock::now();
            } else if (Clock::now() - last_write >= kKeepAlive) {
              if (!write(": keep-alive\n\n")) return false;
              last_write = Clock::now();
            }
          }
          if (parsed->include_usage &&
              !send(usage_chunk(*parsed, id, created, ctx_.model_name, usage_of(*parsed, choices))))
            return false;
          if (!write("data: [DONE]\n\n")) return false;
          sink.done();
          return true;
        },
        [release](bool) { release(); });  // also when the client went away: its requests are cancelled
  } catch (const ApiError& e) {
    send_error(res, e);
  }
}

}  // namespace polar::serve
