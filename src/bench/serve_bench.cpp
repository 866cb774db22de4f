#include "bench/serve_bench.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <thread>

#include <fmt/format.h>

namespace polar {

namespace {

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

int64_t draw(std::mt19937_64& rng, LengthRange r) {
  return std::uniform_int_distribution<int64_t>(r.lo, r.hi)(rng);
}

}  // namespace

std::vector<ServeRequestSpec> make_serve_workload(const ServeWorkloadOptions& o, int64_t vocab, double rate) {
  check(o.requests >= 1, "the workload needs at least one request, got {}", o.requests);
  check(o.prompt.lo >= 1 && o.prompt.lo <= o.prompt.hi, "prompt lengths [{}, {}]: need 1 <= lo <= hi", o.prompt.lo,
        o.prompt.hi);
  check(o.output.lo >= 1 && o.output.lo <= o.output.hi, "output lengths [{}, {}]: need 1 <= lo <= hi", o.output.lo,
        o.output.hi);
  check(rate > 0, "request rate must be > 0, got {}", rate);
  check(o.corpus.empty() || static_cast<int64_t>(o.corpus.size()) >= o.prompt.hi,
        "the text has {} tokens, fewer than the longest prompt of {}", o.corpus.size(), o.prompt.hi);
  check(o.shared_prefix >= 0, "shared prefix of {} tokens", o.shared_prefix);
  check(o.corpus.empty() || static_cast<int64_t>(o.corpus.size()) >= o.shared_prefix,
        "the text has {} tokens, fewer than the shared prefix of {}", o.corpus.size(), o.shared_prefix);
  // Lengths and prompts from one stream, arrivals from another: the requests do not depend on the rate. The
  // shared prefix from a third, so that the requests' own tokens do not depend on it.
  std::mt19937_64 rng(o.seed), arrivals(o.seed ^ 0x9e3779b97f4a7c15ull), prefix_rng(o.seed ^ 0x5851f42d4c957f2dull);
  std::exponential_distribution<double> gap(std::isinf(rate) ? 1.0 : rate);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> prefix(static_cast<size_t>(o.shared_prefix));
  if (o.corpus.empty()) {
    for (auto& id : prefix) id = token(prefix_rng);
  } else if (o.shared_prefix > 0) {
    const auto start = std::uniform_int_distribution<size_t>(0, o.corpus.size() - prefix.size())(prefix_rng);
    std::copy_n(o.corpus.begin() + static_cast<std::ptrdiff_t>(start), prefix.size(), prefix.begin());
  }
  std::vector<ServeRequestSpec> out;
  double t = 0;
  for (int64_t i = 0; i < o.requests; ++i) {
    ServeRequestSpec r;
    const int64_t len = draw(rng, o.prompt);
    r.output = draw(rng, o.output);
    if (o.corpus.empty()) {
      r.prompt.resize(static_cast<size_t>(len));
      for (auto& id : r.prompt) id = token(rng);
    } else {
      const auto start = std::uniform_int_distribution<size_t>(0, o.corpus.size() - static_cast<size_t>(len))(rng);
      r.prompt.assign(o.corpus.begin() + static_cast<std::ptrdiff_t>(start),
                      o.corpus.begin() + static_cast<std::ptrdiff_t>(start + static_cast<size_t>(len)));
    }
    r.prompt.insert(r.prompt.begin(), prefix.begin(), prefix.end());
    if (!std::isinf(rate) && i > 0) t += gap(arrivals);
    r.arrival_s = t;
    out.push_back(std::move(r));
  }
  return out;
}

Percentiles percentiles(std::vector<double> v) {
  Percentiles p;
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    const double pos = q * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(pos);
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
  };
  double sum = 0;
  for (double x : v) sum += x;
  p.mean = sum / static_cast<double>(v.size());
  p.p50 = at(0.5);
  p.p90 = at(0.9);
  p.p99 = at(0.99);
  return p;
}

ServeResult summarize_serve_run(const std::vector<ServeRequestSpec>& requests, Clock::time_point t0,
                                const std::vector<Clock::time_point>& arrival,
                                const std::vector<std::vector<Clock::time_point>>& token_times) {
  ServeResult r;
  const size_t n = requests.size();
  r.requests = static_cast<int64_t>(n);
  std::vector<double> ttft, tpot, itl, e2e;
  Clock::time_point end = t0;
  for (size_t i = 0; i < n; ++i) {
    const std::vector<Clock::time_point>& t = token_times[i];
    check(static_cast<int64_t>(t.size()) == requests[i].output, "request {} produced {} of its {} tokens", i,
          t.size(), requests[i].output);
    r.prompt_tokens += static_cast<int64_t>(requests[i].prompt.size());
    r.output_tokens += static_cast<int64_t>(t.size());
    ttft.push_back(ms(t.front() - arrival[i]));
    e2e.push_back(ms(t.back() - arrival[i]));
    if (t.size() > 1) tpot.push_back(ms(t.back() - t.front()) / static_cast<double>(t.size() - 1));
    for (size_t k = 1; k < t.size(); ++k) itl.push_back(ms(t[k] - t[k - 1]));
    end = std::max(end, t.back());
  }
  r.duration_s = ms(end - t0) / 1e3;
  r.request_throughput = static_cast<double>(n) / r.duration_s;
  r.output_tokens_per_s = static_cast<double>(r.output_tokens) / r.duration_s;
  r.total_tokens_per_s = static_cast<double>(r.output_tokens + r.prompt_tokens) / r.duration_s;
  r.ttft_ms = percentiles(std::move(ttft));
  r.tpot_ms = percentiles(std::move(tpot));
  r.itl_ms = percentiles(std::move(itl));
  r.e2e_ms = percentiles(std::move(e2e));
  return r;
}

ServeResult run_serve_bench(Scheduler& scheduler, const std::vector<ServeRequestSpec>& requests,
                            const std::function<void(const std::string&)>& log) {
  check(!requests.empty(), "no requests to serve");
  check(scheduler.running() == 0 && scheduler.waiting() == 0, "the scheduler is busy");
  scheduler.reset_stats();
  // Runs serve the same prompts (every rate, dense and sparse, the warm-up's among them): each starts with an
  // empty prefix cache, so that it measures computing them.
  scheduler.reset_prefix_cache();
  const size_t graphs_before = scheduler.graph_count();
  const size_t n = requests.size();
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<Clock::time_point> arrival(n);
  const Clock::time_point t0 = Clock::now();
  for (size_t i = 0; i < n; ++i)
    arrival[i] = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(requests[i].arrival_s));
  Clock::time_point next_log = t0 + std::chrono::seconds(2);
  size_t submitted = 0;
  for (;;) {
    const Clock::time_point now = Clock::now();
    for (; submitted < n && arrival[submitted] <= now; ++submitted) {
      RequestParams p;
      p.max_tokens = requests[submitted].output;
      p.ignore_eos = true;
      streams.push_back(scheduler.submit({requests[submitted].prompt, p}));
    }
    if (!scheduler.step()) {  // idle: the rest have not arrived yet
      if (submitted == n) break;
      std::this_thread::sleep_until(arrival[submitted]);
      continue;
    }
    if (log && Clock::now() >= next_log) {
      next_log += std::chrono::seconds(2);
      size_t done = 0;
      for (auto& s : streams) done += s->finished();
      const SchedulerStats& st = scheduler.stats();
      log(fmt::format("  {:.0f} s: {}/{} requests done, {} running, {} waiting, {:.0f} output tokens/s", ms(now - t0) / 1e3,
                      done, n, scheduler.running(), scheduler.waiting() + static_cast<int64_t>(n - submitted),
                      st.generated_tokens / (ms(now - t0) / 1e3)));
    }
  }

  std::vector<std::vector<Clock::time_point>> token_times;
  for (size_t i = 0; i < n; ++i) token_times.push_back(streams[i]->times().tokens);
  ServeResult r = summarize_serve_run(requests, t0, arrival, token_times);
  r.stats = scheduler.stats();
  const double steps = static_cast<double>(std::max<int64_t>(r.stats.steps, 1));
  r.mean_batch = static_cast<double>(r.stats.batch_sum) / steps;
  r.mean_step_ms = 1e3 * (r.stats.engine_seconds + r.stats.schedule_seconds) / steps;
  r.mean_decode_step_ms = 1e3 * r.stats.decode_only_seconds / static_cast<double>(std::max<int64_t>(r.stats.decode_only_steps, 1));
  r.mean_mixed_step_ms = 1e3 * r.stats.mixed_seconds / static_cast<double>(std::max<int64_t>(r.stats.mixed_steps, 1));
  r.schedule_share = r.stats.schedule_seconds / std::max(r.stats.engine_seconds + r.stats.schedule_seconds, 1e-12);
  r.graphs_captured = static_cast<int64_t>(scheduler.graph_count() - graphs_before);
  return r;
}

}  // namespace polar
