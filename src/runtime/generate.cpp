#include "runtime/generate.h"

#include <algorithm>
#include <functional>

namespace polar {

std::vector<std::vector<int32_t>> generate(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt,
                                           const std::function<void(size_t, const RequestEvent&)>& on_event,
                                           GenerateStats* stats) {
  check(!prompts.empty(), "no prompts given");
  check(opt.max_new_tokens >= 0, "max new tokens must be >= 0");
  check(opt.max_step_tokens >= 1, "the step token budget must be >= 1, got {}", opt.max_step_tokens);
  const size_t n = prompts.size();
  const int64_t max_seqs = std::min({opt.max_seqs, opt.max_step_tokens, static_cast<int64_t>(n)});
  check(max_seqs >= 1, "max seqs must be >= 1, got {}", opt.max_seqs);
  // A cache for the max_seqs longest requests at once (plus a partly used block each): whatever runs
  // together fits, so nothing is ever preempted, and a long list of prompts does not size the cache.
  constexpr int64_t block_size = 16;
  std::vector<int64_t> totals;
  for (auto& p : prompts) totals.push_back(static_cast<int64_t>(p.size()) + opt.max_new_tokens + block_size);
  std::partial_sort(totals.begin(), totals.begin() + max_seqs, totals.end(), std::greater<>());
  int64_t kv_tokens = 0;
  for (int64_t i = 0; i < max_seqs; ++i) kv_tokens += totals[static_cast<size_t>(i)];

  Scheduler scheduler(model, {.max_seqs = max_seqs,
                              .max_batch_tokens = opt.max_step_tokens,
                              .kv_tokens = kv_tokens,
                              .block_size = block_size,
                              .sparsity = opt.sparsity,
                              .tokenizer = opt.tokenizer});
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (size_t i = 0; i < n; ++i) {
    RequestParams p;
    p.sampling = opt.sampling;
    p.sample_stream = i;
    p.max_tokens = opt.max_new_tokens;
    streams.push_back(scheduler.submit({prompts[i], p}));
  }
  std::vector<std::vector<int32_t>> out(n);
  std::vector<bool> done(n, false);
  auto drain = [&] {  // the events so far, without waiting
    for (size_t i = 0; i < n; ++i)
      while (!done[i]) {
        std::optional<RequestEvent> e = streams[i]->next(Clock::now());
        if (!e) break;
        if (e->token) out[i].push_back(*e->token);
        if (e->finish) done[i] = true;
        if (on_event) on_event(i, *e);
      }
  };
  const Clock::time_point t0 = Clock::now();
  drain();  // requests of max_tokens 0 finished on arrival
  while (scheduler.step()) drain();
  drain();

  if (stats) {
    GenerateStats st;
    st.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    int64_t with_first = 0;
    for (size_t i = 0; i < n; ++i) {
      st.prompt_tokens += static_cast<int64_t>(prompts[i].size());
      st.generated_tokens += static_cast<int64_t>(out[i].size());
      const RequestTimes t = streams[i]->times();
      if (t.tokens.empty()) continue;
      st.mean_ttft_seconds += std::chrono::duration<double>(t.first_token - t.arrival).count();
      ++with_first;
    }
    if (with_first) st.mean_ttft_seconds /= static_cast<double>(with_first);
    st.scheduler = scheduler.stats();
    *stats = st;
  }
  return out;
}

}  // namespace polar
