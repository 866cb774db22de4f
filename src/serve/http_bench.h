// bench-serve --url: the serving benchmark's workload sent to a running `polar serve` (or any OpenAI-compatible
// server) over HTTP, each request streamed from its own connection at its arrival time, so the HTTP layer's
// cost shows beside the in-process numbers of bench/serve_bench.h (same workloads, same metrics).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "bench/serve_bench.h"

namespace polar::serve {

// POSTs each request's token ids to URL/v1/completions (stream, include_usage, ignore_eos, greedy) at its
// arrival time (after asking the server to reset its prefix cache: POST /reset_prefix_cache); a token's time
// is when its server-sent event arrives. A request that fails (status, a broken
// stream, fewer tokens than asked) is a polar::Error naming it. The result's scheduler stats stay empty (the
// server's own are at its /metrics).
ServeResult run_http_bench(const std::string& url, const std::vector<ServeRequestSpec>& requests,
                           const std::function<void(const std::string&)>& log = {});

}  // namespace polar::serve
