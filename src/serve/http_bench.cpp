#include "serve/http_bench.h"

#include <atomic>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

namespace polar::serve {

namespace {

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

struct Outcome {
  std::vector<Clock::time_point> tokens;  // one per streamed token event
  int64_t completion_tokens = -1;         // from the usage chunk
  std::string error;
};

// One streamed request; every SSE data event that carries a choice is one token (polar serve sends one per
// token, with text or not, for token-id prompts of a model without a tokenizer).
Outcome stream_one(const std::string& host, int port, const ServeRequestSpec& spec) {
  Outcome o;
  httplib::Client client(host, port);
  client.set_read_timeout(600, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body = nlohmann::json{{"prompt", spec.prompt},         {"max_tokens", spec.output},
                            {"temperature", 0},              {"ignore_eos", true},
                            {"stream", true},                {"stream_options", {{"include_usage", true}}}}
                 .dump();
  std::string pending;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    pending.append(data, n);
    for (size_t end; (end = pending.find("\n\n")) != std::string::npos; pending.erase(0, end + 2)) {
      const std::string event = pending.substr(0, end);
      if (!event.starts_with("data: ") || event == "data: [DONE]") continue;
      const auto j = nlohmann::json::parse(event.substr(6), nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("usage") && j["usage"].is_object()) o.completion_tokens = j["usage"].value("completion_tokens", -1);
      if (j.contains("choices") && !j["choices"].empty()) o.tokens.push_back(Clock::now());
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  if (!client.send(req, res, err)) o.error = fmt::format("connection failed ({})", httplib::to_string(err));
  else if (res.status != 200) o.error = fmt::format("HTTP {}: {}", res.status, res.body.substr(0, 200));
  return o;
}

}  // namespace

ServeResult run_http_bench(const std::string& url, const std::vector<ServeRequestSpec>& requests,
                           const std::function<void(const std::string&)>& log) {
  check(!requests.empty(), "no requests to send");
  // http://HOST:PORT (a path after it is ignored: the API's paths are fixed)
  std::string rest = url;
  check(rest.starts_with("http://"), "--url {}: expected http://HOST:PORT", url);
  rest = rest.substr(7);
  rest = rest.substr(0, rest.find('/'));
  const size_t colon = rest.rfind(':');
  check(colon != std::string::npos && colon > 0, "--url {}: expected http://HOST:PORT", url);
  const std::string host = rest.substr(0, colon);
  int port = 0;
  try {
    port = std::stoi(rest.substr(colon + 1));
  } catch (const std::exception&) {
    fail("--url {}: '{}' is not a port", url, rest.substr(colon + 1));
  }
  // As in-process runs do (run_serve_bench), each run starts with an empty prefix cache: polar serve (and vLLM
  // in its development mode) forget theirs on this POST; a server without the route keeps its cache.
  {
    httplib::Client client(host, port);
    const httplib::Result r = client.Post("/reset_prefix_cache");
    if (log && (!r || r->status != 200))
      log(fmt::format("  (the server did not reset its prefix cache: {}; repeated prompts may be served from it)",
                      r ? fmt::format("HTTP {}", r->status) : httplib::to_string(r.error())));
  }
  const size_t n = requests.size();
  std::vector<Outcome> outcomes(n);
  std::vector<Clock::time_point> arrival(n);
  std::vector<std::thread> threads;
  std::atomic<size_t> done{0};
  const Clock::time_point t0 = Clock::now();
  Clock::time_point next_log = t0 + std::chrono::seconds(2);
  for (size_t i = 0; i < n; ++i) {
    arrival[i] = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(requests[i].arrival_s));
    while (Clock::now() < arrival[i]) {
      std::this_thread::sleep_until(std::min(arrival[i], next_log));
      if (log && Clock::now() >= next_log) {
        next_log += std::chrono::seconds(2);
        log(fmt::format("  {:.0f} s: {}/{} requests done", ms(Clock::now() - t0) / 1e3, done.load(), n));
      }
    }
    threads.emplace_back([&, i] {
      outcomes[i] = stream_one(host, port, requests[i]);
      done.fetch_add(1);
    });
  }
  while (done.load() < n) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (log && Clock::now() >= next_log) {
      next_log += std::chrono::seconds(2);
      log(fmt::format("  {:.0f} s: {}/{} requests done", ms(Clock::now() - t0) / 1e3, done.load(), n));
    }
  }
  for (auto& t : threads) t.join();

  std::vector<std::vector<Clock::time_point>> token_times;
  for (size_t i = 0; i < n; ++i) {
    const Outcome& o = outcomes[i];
    check(o.error.empty(), "request {}: {}", i, o.error);
    check(o.completion_tokens == requests[i].output, "request {}: {} completion tokens of its {}", i,
          o.completion_tokens, requests[i].output);
    token_times.push_back(o.tokens);
  }
  ServeResult r = summarize_serve_run(requests, t0, arrival, token_times);
  return r;
}

}  // namespace polar::serve
