// Scheduler: serves many requests at once over one Engine by iteration-level (continuous) batching.
// Requests arrive at any time (submit, from any thread); each engine step is formed anew: every running
// sequence that has read its prompt decodes one token, and the rest of a per-step token budget goes to
// prompt chunks — first of sequences already reading theirs, then of waiting requests admitted first come,
// first served while the batch has room (max_seqs) and the KV cache has blocks. When the cache runs out,
// the most recently admitted sequence is preempted: its blocks are freed and it is requeued at the front,
// to be recomputed (its prompt and the tokens it produced, read again as a prompt) when blocks free up.
// Finished sequences leave the batch at once. One thread runs the loop (step / run) and owns the engine;
// other threads only submit, read their request's events and cancel.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "io/tokenizer.h"
#include "runtime/engine.h"
#include "runtime/sampler.h"

namespace polar {

using Clock = std::chrono::steady_clock;

struct RequestParams {
  SamplingParams sampling;  // temperature, top_k, top_p, seed
  // The request's random stream (Sampler): requests with the same seed and stream draw the same numbers,
  // whatever else shares their batches.
  uint64_t sample_stream = 0;
  int64_t max_tokens = 16;  // tokens to produce at most (0: none; the request finishes at once)
  int64_t min_tokens = 0;   // EOS and stop tokens are not sampled before this many
  std::vector<int32_t> stop_token_ids;    // finish when one is produced (it is reported, its text is not)
  std::vector<std::string> stop_strings;  // finish when the text contains one (the text ends before it)
  bool ignore_eos = false;                // the tokenizer's EOS tokens do not finish the request
  // OpenAI's penalties, in [-2, 2], over the tokens produced so far: logit[v] -= frequency_penalty *
  // count(v) + presence_penalty * (count(v) > 0). Rows with a penalty are sampled on the host.
  float presence_penalty = 0, frequency_penalty = 0;
  // Log-probabilities: -1 none; n >= 0 (at most kMaxTopLogprobs): each produced token's log-probability and
  // the n most likely tokens at its position (RequestEvent::logprob). They are the log-softmax of the
  // model's raw logits, before temperature, top-k/top-p, penalties and the min_tokens mask: the model's
  // distribution, as vLLM reports it by default, whatever rule sampled the token.
  int64_t logprobs = -1;
  // With logprobs >= 0: the prompt's tokens too (RequestEvent::prompt_logprobs), each scored by the logits
  // of the position before it (the first has none). With max_tokens 0 the request reads its prompt and
  // finishes: how a prompt's log-likelihood is computed.
  bool echo_logprobs = false;
};

constexpr int64_t kMaxTopLogprobs = 20;  // RequestParams::logprobs at most (OpenAI chat's top_logprobs limit)

// A token's log-probability in its context and the most likely tokens there.
struct TokenLogprob {
  int32_t token = 0;
  std::optional<float> logprob;  // unset for a prompt's first token: nothing before it predicts it
  std::vector<std::pair<int32_t, float>> top;  // RequestParams::logprobs (token, log-probability), descending
};

struct Request {
  std::vector<int32_t> prompt;
  RequestParams params;
};

enum class FinishReason { stop, length, cancelled };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled"

// What a request's stream delivers: one event per produced token (its text is the newly complete UTF-8,
// held back while it might be the start of a stop string), and a last event with the finish reason.
struct RequestEvent {
  std::optional<int32_t> token;  // unset for a final event that produced no token (cancellation, max_tokens 0)
  std::string text;
  std::optional<FinishReason> finish;  // set on the last event
  Clock::time_point time;
  std::optional<TokenLogprob> logprob;  // the produced token's, when the request asked for logprobs
  // With echo_logprobs: every prompt token's, in order, on the request's first event (with its first token,
  // or on the final event of a request with max_tokens 0).
  std::vector<TokenLogprob> prompt_logprobs;
};

// Timings of a finished request, for benchmarks (all on Clock).
struct RequestTimes {
  Clock::time_point arrival, first_token, finished;
  std::vector<Clock::time_point> tokens;  // each produced token's time
};

// One request's event stream: the scheduler's loop pushes, any thread reads or cancels.
class RequestStream {
 public:
  // Blocks until an event is there (or until `deadline`, then nullopt). After the final event: nullopt.
  std::optional<RequestEvent> next(std::optional<Clock::time_point> deadline = std::nullopt);
  // Asks the loop to finish the request with FinishReason::cancelled at its next step (its blocks are freed
  // there); no effect once it has finished.
  void cancel() { cancelled_.store(true); }
  bool finished() const;
  // After the final event: the request's timings (arrival, first token, each token, finish).
  RequestTimes times() const;
  // Prompt tokens found in the prefix cache when the request was first admitted (0 before, or without the
  // cache): OpenAI's usage.prompt_tokens_details.cached_tokens.
  int64_t cached_prompt_tokens() const { return cached_prompt_tokens_.load(); }
  int64_t id() const { return id_; }

 private:
  friend class Scheduler;
  explicit RequestStream(int64_t id) : id_(id) {}
  void push(RequestEvent e);

  const int64_t id_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int64_t> cached_prompt_tokens_{0};
  bool admitted_ = false;  // the loop's: cached_prompt_tokens_ is set at the first admission only
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<RequestEvent> events_;
  bool done_ = false;     // the final event was pushed
  bool drained_ = false;  // and read
  RequestTimes times_;
};

struct SchedulerOptions {
  int64_t max_seqs = 256;          // sequences in the running batch at most
  int64_t max_batch_tokens = 2048;  // tokens per engine step at most (decode tokens + prompt chunks)
  // Prompt positions scored for echo_logprobs per step at most: each adds a vocabulary-wide row to the step's
  // logits, so a long echoed prompt would otherwise ask for a [max_batch_tokens, vocab] block at once (512 MB
  // in fp16 at 2048 x 128k). 0: as many as 256 MiB of fp32 rows hold, at least 16. A longer prompt is scored
  // over several steps, reading its prompt in shorter chunks.
  int64_t max_scored_rows = 0;
  int64_t kv_tokens = 0;           // KV cache capacity in tokens (EngineOptions::kv_tokens); required
  int64_t block_size = 16;
  bool graphs = true;
  Sparsity* sparsity = nullptr;  // sparse decode tokens in every step (EngineOptions::sparsity); not owned
  // Automatic prefix caching (KVCache): a request whose tokens start with whole cached blocks — a shared
  // system prompt, the earlier turns of a conversation, a preempted sequence coming back — reads only the
  // rest. What is cached: every whole block of a prompt once read (prompts run dense), and with a dense
  // engine the produced tokens' blocks too; with sparsity those stay private, since a sparse decode step's
  // K/V differ from a prompt's. Requests with echo_logprobs read their whole prompt (they score it).
  bool prefix_caching = true;
  // Text of the events, stop strings and EOS; null: events carry token ids only (stop strings refused), and
  // no token is EOS. Not owned.
  const Tokenizer* tokenizer = nullptr;
};

struct SchedulerStats {
  int64_t steps = 0, decode_only_steps = 0, mixed_steps = 0, prefill_only_steps = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t preemptions = 0;
  int64_t batch_sum = 0;  // Σ over steps of the running sequences served (mean running batch = batch_sum / steps)
  double engine_seconds = 0;     // in Engine::forward and sampling
  double decode_only_seconds = 0;  // the part of engine_seconds spent in decode-only steps
  double mixed_seconds = 0;        // ... in mixed steps (decode tokens beside prompt chunks)
  int64_t decode_only_tokens = 0;  // tokens those steps produced
  double schedule_seconds = 0;   // the loop's own host time: forming steps, events, bookkeeping
  int64_t scored_prompt_tokens = 0;  // prompt tokens scored for echo_logprobs (once for all choices of a prompt)
  // Prefix caching: prompt tokens looked up at admission (each prompt but its last token, recomputed ones
  // included) and those found cached, whose K/V were not computed again.
  int64_t prefix_query_tokens = 0, prefix_hit_tokens = 0;
};

// What a monitor reads from any thread (Scheduler::gauges): the stats and the batch and cache occupancy as
// of the end of the last step.
struct SchedulerGauges {
  SchedulerStats stats;
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_used = 0, kv_blocks_total = 0;
  int64_t kv_blocks_cached = 0;  // blocks of the prefix cache, held by running sequences or not
};

class Scheduler {
 public:
  Scheduler(Model& model, SchedulerOptions options);
  ~Scheduler();

  // Queues a request (any thread). A request that can never run — an empty prompt, token ids outside the
  // vocabulary, prompt + max_tokens over the model's context or over the whole cache, stop strings without a
  // tokenizer — is a polar::Error here, naming the limit.
  std::shared_ptr<RequestStream> submit(Request request);
  // Queues the choices of one prompt (the API's n): requests with the same prompt and log-probability
  // parameters, sampled each by its own parameters. Under echo_logprobs the prompt is scored once for them
  // all, each position by whichever choice reads it first, and every choice's first event carries the same
  // scores. Otherwise, with prefix caching, the later choices are admitted once the first has read the
  // prompt, and find its whole blocks cached: the prompt is computed once for them all. A choice that can
  // never run is a polar::Error, as for submit, and then none is queued.
  std::vector<std::shared_ptr<RequestStream>> submit_choices(std::vector<Request> choices);
  // One engine step over what is running and waiting (the loop thread). False when there was nothing to do.
  bool step();
  // Steps until no request is running or waiting.
  void run_until_idle();
  // The loop for a server: steps while there is work, sleeps while there is none, returns after stop().
  void run();
  void stop();
  // Forgets the prefix cache before the next step admits anything (any thread): benchmarks that serve the
  // same prompts again, and a server's POST /reset_prefix_cache.
  void reset_prefix_cache() { reset_prefix_cache_.store(true); }

  int64_t waiting() const;  // requests queued, not yet admitted (or preempted)
  int64_t running() const;  // sequences in the batch
  const SchedulerStats& stats() const { return stats_; }  // the loop thread's view
  SchedulerGauges gauges() const;                         // any thread
  void reset_stats() { stats_ = {}; }
  size_t graph_count() const { return engine_.graph_count(); }  // decode graphs captured so far
  KVCache& cache() { return engine_.cache(); }

 private:
  struct Sequence;
  struct PromptScores;
  void check_request(const Request& r);  // what submit refuses, as a polar::Error
  void admit_submitted();
  void finish(Sequence& s, FinishReason reason);
  void preempt(Sequence& s);
  // Appends a produced token: its event (with its log-probabilities, when asked for), stop conditions.
  // Returns true when the sequence finished.
  bool produce(Sequence& s, int32_t token, std::optional<TokenLogprob> logprob, Clock::time_point now);
  // One scored position: logits row `row` of the step scores `target` for sequence s (a prompt token under
  // echo_logprobs, or the token just sampled from that row).
  struct Scored {
    Sequence* s;
    int64_t row;
    int32_t target;
  };
  // Log-probabilities of the scored rows (Backend::logprobs, on the device; only these rows are read), each
  // with its sequence's RequestParams::logprobs most likely tokens.
  std::vector<TokenLogprob> score(const Tensor& logits, const std::vector<Scored>& scored);
  // The next token of each listed sequence from its logits row, by its own sampling parameters, on the device.
  std::vector<int32_t> sample(const Tensor& logits, const std::vector<Sequence*>& seqs, const std::vector<int64_t>& rows);
  bool is_stop_token(const Sequence& s, int32_t token) const;

  Model& model_;
  SchedulerOptions options_;
  Engine engine_;
  int64_t blocks_total_;
  int64_t scored_rows_;  // the effective max_scored_rows

  mutable std::mutex submit_mu_;
  std::condition_variable submit_cv_;
  std::vector<std::unique_ptr<Sequence>> submitted_;  // by other threads, taken by the loop
  int64_t next_id_ = 0;
  bool stopping_ = false;
  std::atomic<bool> reset_prefix_cache_{false};

  std::deque<std::unique_ptr<Sequence>> waiting_;   // FCFS; preempted sequences go to the front
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  int64_t admissions_ = 0;
  SchedulerStats stats_;
  std::atomic<int64_t> waiting_count_{0}, running_count_{0};
  void publish();  // copies stats and occupancy for gauges()
  mutable std::mutex gauges_mu_;
  SchedulerGauges gauges_;
};

}  // namespace polar
