// The serving benchmark behind `polar bench-serve`, in the style of vLLM's serving benchmark but in process:
// a workload of requests (prompt and output lengths fixed or uniform in a range, prompts cut from a token
// corpus or drawn at random) arrives all at once or as a Poisson process, the continuous-batching Scheduler
// serves it, and each request's timings give the latency distributions (TTFT, TPOT, ITL, end to end) and
// the throughputs. Requests ignore EOS, so each produces exactly its output length and dense and sparse runs
// of one workload do the same work.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/scheduler.h"

namespace polar {

struct LengthRange {
  int64_t lo = 0, hi = 0;  // uniform over [lo, hi]
};

struct ServeWorkloadOptions {
  int64_t requests = 64;
  LengthRange prompt{128, 128};
  LengthRange output{128, 128};
  uint64_t seed = 0;
  // Tokens every prompt starts with (one draw for the workload, from a stream of its own), before the
  // request's own `prompt` tokens: a shared system prompt, what prefix caching serves (vLLM's
  // --random-prefix-len).
  int64_t shared_prefix = 0;
  // Prompts are cut from here at random offsets (real text for real models); empty: random token ids.
  std::vector<int32_t> corpus;
};

struct ServeRequestSpec {
  std::vector<int32_t> prompt;
  int64_t output = 0;     // tokens to produce (max_tokens, EOS ignored)
  double arrival_s = 0;   // after the start of the run
};

// The workload's requests in arrival order. rate: requests per second of a Poisson process (exponential gaps,
// seeded), or infinity: all arrive at 0. The prompts and output lengths depend on the seed only, so runs at
// different rates, dense or sparse, serve the same requests.
std::vector<ServeRequestSpec> make_serve_workload(const ServeWorkloadOptions& options, int64_t vocab, double rate);

struct Percentiles {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
};
// Linear interpolation between order statistics (numpy's default); all zero for no samples.
Percentiles percentiles(std::vector<double> samples);

struct ServeResult {
  double rate = 0;  // requests/s offered (infinity: all at once)
  int64_t requests = 0, prompt_tokens = 0, output_tokens = 0;
  double duration_s = 0;  // the start of the run to the last request's end
  double request_throughput = 0, output_tokens_per_s = 0, total_tokens_per_s = 0;
  // Milliseconds. TTFT: arrival to first token (queueing and prefill included); TPOT: per output token after
  // the first, per request (requests of one token have none); ITL: every gap between consecutive tokens of a
  // request; E2E: arrival to last token.
  Percentiles ttft_ms, tpot_ms, itl_ms, e2e_ms;
  double mean_batch = 0;  // sequences served per step
  double mean_step_ms = 0;
  double mean_decode_step_ms = 0, mean_mixed_step_ms = 0;  // engine time of decode-only and of mixed steps
  double schedule_share = 0;  // the scheduler's own host time / (its host time + engine time)
  int64_t graphs_captured = 0;
  SchedulerStats stats;
};

// The throughputs and latency percentiles of a run that started at t0: each request's arrival and token
// times (every request must have produced its output length). Leaves the scheduler fields empty.
ServeResult summarize_serve_run(const std::vector<ServeRequestSpec>& requests, Clock::time_point t0,
                                const std::vector<Clock::time_point>& arrivals,
                                const std::vector<std::vector<Clock::time_point>>& token_times);

// Serves `requests` on `scheduler` (idle; its stats and prefix cache are reset first), submitting each at its arrival time from
// the loop thread between steps (its TTFT counts from the arrival, so a request that arrives during a step
// waits for it, as it would in a server). One scheduler can serve several runs: decode graphs captured in one
// are replayed in the next (graphs_captured counts the new ones). log gets a progress line every few seconds.
ServeResult run_serve_bench(Scheduler& scheduler, const std::vector<ServeRequestSpec>& requests,
                            const std::function<void(const std::string&)>& log = {});

}  // namespace polar
