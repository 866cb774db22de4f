// polar's OpenAI-compatible HTTP server (cpp-httplib): /v1/completions and /v1/chat/completions, streamed
// as server-sent events or whole, /v1/models, /health and /metrics (Prometheus text format). Request threads never touch the engine: they parse
// (serve/openai_api.h), submit to the Scheduler and read their requests' event streams; one thread runs the
// scheduler's loop and owns the engine. The socket is bound and /health answers 503 before the model is
// loaded, so a supervisor can watch start-up.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "runtime/scheduler.h"
#include "serve/metrics.h"
#include "serve/openai_api.h"

namespace httplib {
class Server;
class Request;
class Response;
}  // namespace httplib

namespace polar::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;            // 0: any free port (port() tells which)
  std::string api_key;        // non-empty: /v1 routes need "Authorization: Bearer <key>" (else 401)
  int64_t max_queue = 1024;   // requests waiting for a place in the batch at most; beyond, 429
  size_t max_body = 8 << 20;  // request body bytes at most; beyond, 413
  int http_threads = 512;     // connections served at once (a streaming client holds one for its request)
  double drain_timeout_s = 30;  // shutdown: how long running requests may take to finish
};

class Server {
 public:
  // Binds host:port and starts answering (/health: 503 until serve() is called). A port in use is a
  // polar::Error naming it.
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const { return port_; }
  // The model is loaded: starts the scheduler's loop over it; the API answers from now on. The model, the
  // tokenizer and the template in ctx must outlive the server. head_density: what /metrics reports.
  void serve(Model& model, const SchedulerOptions& scheduler, ApiContext ctx, double head_density = 1.0);
  // Graceful stop: new requests get 503, running ones may finish for drain_timeout_s, then the rest are
  // cancelled; returns once the listener, the request threads and the loop have stopped.
  void shutdown();

  // For tests and /metrics: the scheduler (null before serve()).
  Scheduler* scheduler() { return scheduler_.get(); }

 private:
  void route();
  void handle_generate(Endpoint endpoint, const httplib::Request& req, httplib::Response& res);
  void authorize(const httplib::Request& req) const;
  void track(const std::shared_ptr<RequestStream>& s);
  void untrack(const std::shared_ptr<RequestStream>& s);
  // A finished choice, for the metrics: prompt tokens of its prompt, its timings.
  void record(const ParsedRequest& r, size_t choice, FinishReason reason, const RequestStream& stream);

  ServerOptions options_;
  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
  std::thread listener_;
  std::unique_ptr<Scheduler> scheduler_;
  std::thread loop_;
  ApiContext ctx_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::atomic<bool> ready_{false}, draining_{false};
  std::atomic<uint64_t> next_id_{0};
  int64_t started_ = 0;  // unix time, for /v1/models
  std::mutex inflight_mu_;
  std::set<std::shared_ptr<RequestStream>> inflight_;  // cancelled at the end of a drain
  bool shut_down_ = false;
};

}  // namespace polar::serve
