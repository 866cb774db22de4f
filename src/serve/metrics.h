// The server's Prometheus metrics (prometheus-cpp; text exposition format at GET /metrics): HTTP responses by
// route and status, finished requests by finish reason, prompt and generated tokens, TTFT / TPOT / end-to-end
// latency histograms, and, read from the scheduler at each scrape, running and waiting requests, preemptions,
// steps and their time, KV-cache use, and the head density in force.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "runtime/scheduler.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
template <typename T>
class Family;
class Histogram;
}  // namespace prometheus

namespace polar::serve {

class ServerMetrics {
 public:
  // density: the share of heads (KV groups) sparse decode steps keep; 1 for a dense server.
  explicit ServerMetrics(double density);
  ~ServerMetrics();

  void set_density(double density);
  // An HTTP response: route is one of the server's routes, or "other" (so unknown paths cannot grow the
  // label set).
  void response(const std::string& route, int status);
  // A finished choice (a scheduler request): its finish reason, token counts and timings.
  void finished(FinishReason reason, int64_t prompt_tokens, const RequestTimes& times);
  // The text exposition of every metric, the scheduler's read now (null before the model is loaded).
  std::string render(const Scheduler* scheduler);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* responses_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Counter *prompt_tokens_, *generation_tokens_, *preemptions_, *steps_, *step_seconds_,
      *scored_prompt_tokens_, *prefix_queries_, *prefix_hits_;
  prometheus::Histogram *ttft_, *tpot_, *e2e_;
  prometheus::Gauge *running_, *waiting_, *kv_usage_, *kv_used_blocks_, *kv_cached_blocks_, *density_;
  std::mutex mu_;
  SchedulerStats seen_;  // the scheduler totals already added to the counters
};

}  // namespace polar::serve
