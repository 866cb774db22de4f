#include "runtime/scheduler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>
#include <utility>

namespace polar {

namespace {

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

bool same_rule(const SamplingParams& a, const SamplingParams& b) {
  return a.temperature == b.temperature && a.top_k == b.top_k && a.top_p == b.top_p;
}

}  // namespace

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::cancelled: return "cancelled";
  }
  return "?";
}

// ---- RequestStream

void RequestStream::push(RequestEvent e) {
  {
    std::lock_guard lock(mu_);
    if (e.token) times_.tokens.push_back(e.time);
    if (e.token && times_.tokens.size() == 1) times_.first_token = e.time;
    if (e.finish) {
      done_ = true;
      times_.finished = e.time;
    }
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

std::optional<RequestEvent> RequestStream::next(std::optional<Clock::time_point> deadline) {
  std::unique_lock lock(mu_);
  auto ready = [&] { return !events_.empty() || drained_; };
  if (deadline) {
    if (!cv_.wait_until(lock, *deadline, ready)) return std::nullopt;
  } else {
    cv_.wait(lock, ready);
  }
  if (events_.empty()) return std::nullopt;
  RequestEvent e = std::move(events_.front());
  events_.pop_front();
  if (e.finish) drained_ = true;
  return e;
}

bool RequestStream::finished() const {
  std::lock_guard lock(mu_);
  return done_;
}

RequestTimes RequestStream::times() const {
  std::lock_guard lock(mu_);
  return times_;
}

// ---- Scheduler

// echo_logprobs: a prompt's log-probabilities, shared by its choices (submit_choices) so that each position
// is scored once, by whichever choice reads it first. Kept across a preemption, so a prompt read again is not
// scored again.
struct Scheduler::PromptScores {
  explicit PromptScores(int32_t first) : tokens{{first, std::nullopt, {}}} {}  // nothing precedes it to score it
  std::vector<TokenLogprob> tokens;  // of prompt tokens [0, tokens.size()), in order
  // Prompt tokens [0, claimed) are scored, or are being scored in the step being formed: position p scores
  // token p + 1, so a chunk scores positions from claimed - 1 on.
  int64_t claimed = 1;
};

struct Scheduler::Sequence {
  Sequence(int64_t id_, Request r, const Tokenizer* tok, std::shared_ptr<PromptScores> echo_)
      : id(id_), request(std::move(r)), stream(new RequestStream(id_)), sampler(request.params.sampling,
                                                                                 request.params.sample_stream),
        echo(std::move(echo_)) {
    tokens = request.prompt;
    if (tok) {  // the text continues the prompt's: SPM keeps the leading space of a first produced "▁word"
      decoder.emplace(*tok);
      for (int32_t id : tokens) decoder->push(id);
      decoder->flush();
    }
  }
  int64_t id;
  Request request;
  std::shared_ptr<RequestStream> stream;
  Sampler sampler;
  std::vector<int32_t> tokens;  // the prompt, then every produced token
  int64_t produced = 0;
  std::unordered_map<int32_t, int32_t> produced_counts;  // for the penalties: how often each token was produced
  int64_t engine_seq = -1;  // -1: holds no place in the engine (waiting)
  int64_t cached = 0;       // tokens of `tokens` whose K/V are in the cache
  int64_t admitted = -1;    // admission order, for preemption
  int64_t prompt_end = 0;   // tokens read as a prompt (dense) from admission on: the prompt, or all on recompute
  std::optional<StreamDecoder> decoder;
  std::string held;  // decoded text not yet sent: it might be the start of a stop string
  std::shared_ptr<PromptScores> echo;  // echo_logprobs: its prompt's scores (null without)
  bool echo_sent = false;
  // With prefix caching, the later choices of one prompt (submit_choices) wait for the first, `leader` (its
  // id), to read the prompt, then attach its cached blocks: the prompt is computed once, not n times. -1: none.
  int64_t leader = -1;
  // Read its prompt (and anything it recomputes): its next step is a decode token, tokens.back().
  bool prefilled() const { return cached >= prompt_end; }
  // The prompt's log-probabilities for the sequence's first event, none for later ones. Once it has read its
  // prompt they are all there, whichever choice scored them: no sequence reads past a position nobody scores.
  std::vector<TokenLogprob> first_event_echo() {
    if (!echo || std::exchange(echo_sent, true)) return {};
    return echo->tokens;
  }
};

Scheduler::Scheduler(Model& model, SchedulerOptions options)
    : model_(model),
      options_(std::move(options)),
      engine_(model, {.kv_tokens = options_.kv_tokens, .block_size = options_.block_size, .graphs = options_.graphs,
                      .sparsity = options_.sparsity}),
      blocks_total_(engine_.cache().num_blocks()),
      scored_rows_(options_.max_scored_rows > 0
                       ? options_.max_scored_rows
                       : std::max<int64_t>(16, (int64_t(256) << 20) / (4 * model.config().vocab_size))) {
  check(options_.kv_tokens > 0, "scheduler: the KV cache needs a capacity (kv_tokens)");
  check(options_.max_scored_rows >= 0, "max_scored_rows must be >= 0, got {}", options_.max_scored_rows);
  check(options_.max_seqs >= 1, "--max-seqs must be >= 1, got {}", options_.max_seqs);
  // Every running sequence decodes in every step: the step budget must hold a full batch of decode tokens.
  check(options_.max_batch_tokens >= options_.max_seqs, "--max-batch-tokens ({}) must be >= --max-seqs ({})",
        options_.max_batch_tokens, options_.max_seqs);
}

Scheduler::~Scheduler() = default;

void Scheduler::check_request(const Request& r) {
  const ModelConfig& c = model_.config();
  const RequestParams& p = r.params;
  check(!r.prompt.empty(), "empty prompt: nothing to condition on");
  for (int32_t id : r.prompt)
    check(id >= 0 && id < c.vocab_size, "token id {} is out of range for a vocabulary of {}", id, c.vocab_size);
  check(p.max_tokens >= 0, "max_tokens must be >= 0, got {}", p.max_tokens);
  check(p.min_tokens >= 0 && p.min_tokens <= p.max_tokens, "min_tokens must be in [0, max_tokens = {}], got {}",
        p.max_tokens, p.min_tokens);
  validate(p.sampling);
  for (const auto& [name, v] : {std::pair{"presence_penalty", p.presence_penalty}, {"frequency_penalty", p.frequency_penalty}})
    check(std::isfinite(v) && v >= -2 && v <= 2, "{} must be in [-2, 2], got {}", name, v);
  for (int32_t id : p.stop_token_ids)
    check(id >= 0 && id < c.vocab_size, "stop token id {} is out of range for a vocabulary of {}", id, c.vocab_size);
  check(p.stop_strings.empty() || options_.tokenizer, "stop strings need a tokenizer (the model has none)");
  check(p.logprobs >= -1 && p.logprobs <= kMaxTopLogprobs, "logprobs must be in [-1, {}], got {}", kMaxTopLogprobs,
        p.logprobs);
  check(!p.echo_logprobs || p.logprobs >= 0, "echo_logprobs needs logprobs >= 0");
  for (const std::string& s : p.stop_strings) check(!s.empty(), "empty stop string");
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + p.max_tokens;
  check(total <= c.max_positions, "prompt of {} tokens plus {} new tokens exceeds the model's context length of {}",
        r.prompt.size(), p.max_tokens, c.max_positions);
  const int64_t bs = engine_.cache().block_size();
  check((total + bs - 1) / bs <= blocks_total_,
        "prompt of {} tokens plus {} new tokens exceeds the KV cache of {} tokens", r.prompt.size(), p.max_tokens,
        blocks_total_ * bs);
}

std::shared_ptr<RequestStream> Scheduler::submit(Request r) {
  std::vector<Request> one;
  one.push_back(std::move(r));
  return submit_choices(std::move(one))[0];
}

std::vector<std::shared_ptr<RequestStream>> Scheduler::submit_choices(std::vector<Request> choices) {
  check(!choices.empty(), "no request to submit");
  const Request& head = choices[0];
  for (const Request& r : choices) {
    check_request(r);
    check(r.prompt == head.prompt && r.params.logprobs == head.params.logprobs &&
              r.params.echo_logprobs == head.params.echo_logprobs,
          "the choices of one prompt must share the prompt, logprobs and echo_logprobs");
  }
  const auto echo = head.params.echo_logprobs ? std::make_shared<PromptScores>(head.prompt[0]) : nullptr;
  std::vector<std::shared_ptr<RequestStream>> streams;
  // (Echoed prompts are read by every choice, scored once between them; a prompt shorter than a block has
  // nothing to share.)
  const bool follow = options_.prefix_caching && !echo && static_cast<int64_t>(head.prompt.size()) > options_.block_size;
  std::lock_guard lock(submit_mu_);
  int64_t leader = -1;
  for (Request& r : choices) {
    auto s = std::make_unique<Sequence>(next_id_++, std::move(r), options_.tokenizer, echo);
    if (follow) {
      s->leader = leader;
      if (leader < 0 && s->request.params.max_tokens > 0) leader = s->id;
    }
    streams.push_back(s->stream);
    s->stream->times_.arrival = Clock::now();
    if (s->request.params.max_tokens == 0 && !echo) {  // nothing to compute: finished on arrival
      s->stream->push({std::nullopt, "", FinishReason::length, s->stream->times_.arrival, std::nullopt, {}});
      continue;
    }
    submitted_.push_back(std::move(s));
    waiting_count_.fetch_add(1);
  }
  submit_cv_.notify_all();
  return streams;
}

void Scheduler::admit_submitted() {
  std::lock_guard lock(submit_mu_);
  for (auto& s : submitted_) waiting_.push_back(std::move(s));
  submitted_.clear();
}

int64_t Scheduler::waiting() const { return waiting_count_.load(); }
int64_t Scheduler::running() const { return running_count_.load(); }

void Scheduler::finish(Sequence& s, FinishReason reason) {
  std::string text = s.held;
  if (s.decoder && reason != FinishReason::cancelled) text += s.decoder->flush();
  s.held.clear();
  if (s.engine_seq >= 0) engine_.remove_sequence(s.engine_seq);
  s.engine_seq = -1;
  s.stream->push({std::nullopt, reason == FinishReason::cancelled ? "" : text, reason, Clock::now(), std::nullopt,
                  s.first_event_echo()});
}

void Scheduler::preempt(Sequence& s) {
  engine_.remove_sequence(s.engine_seq);
  s.engine_seq = -1;
  s.cached = 0;  // recomputed: the prompt and the produced tokens are read again as a prompt
  s.admitted = -1;
  ++stats_.preemptions;
}

bool Scheduler::is_stop_token(const Sequence& s, int32_t token) const {
  const RequestParams& p = s.request.params;
  if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) != p.stop_token_ids.end()) return true;
  return !p.ignore_eos && options_.tokenizer && options_.tokenizer->is_eos(token);
}

bool Scheduler::produce(Sequence& s, int32_t token, std::optional<TokenLogprob> logprob, Clock::time_point now) {
  const RequestParams& p = s.request.params;
  s.tokens.push_back(token);
  ++s.produced;
  if (p.presence_penalty != 0 || p.frequency_penalty != 0) ++s.produced_counts[token];
  ++stats_.generated_tokens;
  const bool stop_token = s.produced > p.min_tokens && is_stop_token(s, token);
  std::string text;
  if (s.decoder && !stop_token) text = s.decoder->push(token);
  // Stop strings: search the text not yet sent; send all of it but the longest tail that could still grow
  // into a stop string.
  std::optional<FinishReason> finish;
  bool stop_string = false;
  if (!p.stop_strings.empty() && s.produced > p.min_tokens) {
    s.held += text;
    size_t cut = std::string::npos;
    for (const std::string& stop : p.stop_strings) cut = std::min(cut, s.held.find(stop));
    if (cut != std::string::npos) {
      text = s.held.substr(0, cut);
      s.held.clear();
      finish = FinishReason::stop;
      stop_string = true;
    } else {
      size_t keep = 0;
      for (const std::string& stop : p.stop_strings)
        for (size_t n = std::min(stop.size() - 1, s.held.size()); n > keep; --n)
          if (s.held.compare(s.held.size() - n, n, stop, 0, n) == 0) {
            keep = n;
            break;
          }
      text = s.held.substr(0, s.held.size() - keep);
      s.held.erase(0, s.held.size() - keep);
    }
  } else if (!p.stop_strings.empty()) {
    text = s.held + text;  // before min_tokens nothing stops, nothing is held
    s.held.clear();
  }
  if (!finish && stop_token) finish = FinishReason::stop;
  if (!finish && s.produced >= p.max_tokens) finish = FinishReason::length;
  if (finish) {  // what was held back is text after all, unless a stop string ended it
    if (!stop_string) text += s.held + (s.decoder ? s.decoder->flush() : "");
    s.held.clear();
    if (s.engine_seq >= 0) engine_.remove_sequence(s.engine_seq);
    s.engine_seq = -1;
  }
  s.stream->push({token, std::move(text), finish, now, std::move(logprob), s.first_event_echo()});
  return finish.has_value();
}

std::vector<int32_t> Scheduler::sample(const Tensor& logits, const std::vector<Sequence*>& seqs,
                                       const std::vector<int64_t>& rows) {
  Backend& be = model_.backend();
  const int64_t R = logits.dim(0), V = logits.dim(1);  // rows[i]: seqs[i]'s row
  std::vector<int32_t> out(seqs.size(), -1);
  std::vector<float> u(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) u[i] = seqs[i]->sampler.next_uniform();
  // Rows with penalties, or that must not produce a stop token yet (min_tokens): sampled on the host from
  // their own row, penalised, with the stop tokens' logits at -inf. Every other row: on the device, one pass
  // per distinct sampling rule.
  std::vector<bool> masked(seqs.size(), false);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& s = *seqs[i];
    const RequestParams& p = s.request.params;
    const bool penalised = !s.produced_counts.empty();
    if (s.produced >= p.min_tokens && !penalised) continue;
    masked[i] = true;
    // Penalised in a copy: on the CPU to_host_f32 is a view of the logits, which logprobs still read raw.
    const Tensor row = be.to_host_f32(logits.slice_rows(rows[i], rows[i] + 1));
    std::vector<float> l(row.data<float>(), row.data<float>() + V);
    for (const auto& [token, count] : s.produced_counts)
      l[token] -= p.frequency_penalty * static_cast<float>(count) + p.presence_penalty;
    if (s.produced < p.min_tokens)
      for (int64_t v = 0; v < V; ++v)
        if (is_stop_token(s, static_cast<int32_t>(v))) l[v] = -INFINITY;
    out[i] = sample_row(l.data(), V, p.sampling, u[i]);
  }
  std::vector<bool> done = masked;
  for (size_t first = 0; first < seqs.size(); ++first) {
    if (done[first]) continue;
    const SamplingParams& rule = seqs[first]->request.params.sampling;
    Tensor uniforms = Tensor::zeros(DType::F32, {R});
    for (size_t i = first; i < seqs.size(); ++i)
      if (!done[i] && same_rule(seqs[i]->request.params.sampling, rule)) uniforms.data<float>()[rows[i]] = u[i];
    Tensor ids = be.alloc(DType::I32, {R});
    be.sample(logits, rule, be.upload(uniforms, DType::F32), ids);
    Tensor host = be.to_host_f32(ids);
    for (size_t i = first; i < seqs.size(); ++i)
      if (!done[i] && same_rule(seqs[i]->request.params.sampling, rule)) {
        out[i] = host.data<int32_t>()[rows[i]];
        done[i] = true;
      }
  }
  return out;
}

std::vector<TokenLogprob> Scheduler::score(const Tensor& logits, const std::vector<Scored>& scored) {
  Backend& be = model_.backend();
  const int64_t M = static_cast<int64_t>(scored.size());
  int64_t n = 1;  // the most alternatives any row asks for (the op computes at least one)
  Tensor rows = Tensor::empty(DType::I32, {M}), targets = Tensor::empty(DType::I32, {M});
  for (int64_t m = 0; m < M; ++m) {
    n = std::max(n, scored[m].s->request.params.logprobs);
    rows.data<int32_t>()[m] = static_cast<int32_t>(scored[m].row);
    targets.data<int32_t>()[m] = scored[m].target;
  }
  Tensor target_lp = be.alloc(DType::F32, {M}), top_ids = be.alloc(DType::I32, {M, n}),
         top_lp = be.alloc(DType::F32, {M, n});
  be.logprobs(logits, be.upload(rows, DType::I32), be.upload(targets, DType::I32), target_lp, top_ids, top_lp);
  const Tensor lp = be.to_host_f32(target_lp), ids = be.to_host_f32(top_ids), tlp = be.to_host_f32(top_lp);
  std::vector<TokenLogprob> out(scored.size());
  for (int64_t m = 0; m < M; ++m) {
    out[m].token = scored[m].target;
    out[m].logprob = lp.data<float>()[m];
    for (int64_t j = 0; j < scored[m].s->request.params.logprobs; ++j)
      out[m].top.emplace_back(ids.data<int32_t>()[m * n + j], tlp.data<float>()[m * n + j]);
  }
  return out;
}

bool Scheduler::step() {
  const Clock::time_point t0 = Clock::now();
  // Before the submitted requests are taken: one submitted after a reset never sees the old cache.
  if (reset_prefix_cache_.exchange(false)) engine_.cache().drop_cached();
  admit_submitted();
  // Cancellations, wherever the request is. The flag is read once per sequence: other threads set it at any
  // time, and a sequence dropped on a second reading without being finished would keep its blocks and
  // leave its stream without a final event.
  auto finish_if_cancelled = [this](std::unique_ptr<Sequence>& s) {
    if (!s->stream->cancelled_.load()) return false;
    finish(*s, FinishReason::cancelled);
    return true;
  };
  std::erase_if(running_, finish_if_cancelled);  // remove_if: the predicate runs exactly once per element
  std::erase_if(waiting_, finish_if_cancelled);
  if (running_.empty() && waiting_.empty()) {
    waiting_count_.store(0);
    running_count_.store(0);
    publish();
    return false;
  }
  KVCache& cache = engine_.cache();
  const int64_t bs = cache.block_size();
  auto blocks_for = [&](int64_t tokens) { return (tokens + bs - 1) / bs; };
  // Reserves blocks for n tokens of s if the pool has them.
  auto try_reserve = [&](const Sequence& s, int64_t n) {
    const int64_t need = blocks_for(n) - static_cast<int64_t>(cache.blocks(s.engine_seq).size());
    if (need > cache.free_blocks()) return false;
    cache.reserve(s.engine_seq, n);
    return true;
  };
  auto requeue_last = [&] {  // preempts the most recently admitted running sequence
    std::unique_ptr<Sequence> victim = std::move(running_.back());
    running_.pop_back();
    preempt(*victim);
    waiting_.push_front(std::move(victim));
  };

  std::vector<SeqChunk> chunks;
  std::vector<Sequence*> owners;
  // Per chunk: its positions from its logits_from up to this one score prompt tokens (echo_logprobs); 0: none.
  std::vector<int64_t> scored_until;
  int64_t budget = options_.max_batch_tokens;
  // Decode tokens: every sequence that has read its prompt, oldest first. When the cache cannot grow one,
  // the most recently admitted sequence gives its blocks back (it may be this one).
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence& s = *running_[i];
    if (!s.prefilled()) continue;
    bool placed = true;
    while (!try_reserve(s, s.cached + 1)) {
      const bool self = running_.back().get() == &s;
      requeue_last();
      if (self) {
        placed = false;
        break;
      }
    }
    if (!placed) break;
    chunks.push_back({s.engine_seq, std::span<const int32_t>(&s.tokens[s.cached], 1)});
    owners.push_back(&s);
    scored_until.push_back(0);
    --budget;
  }
  const int64_t decode_tokens = static_cast<int64_t>(chunks.size());
  // Prompt chunks: sequences reading their prompts (their blocks were reserved at admission), then new
  // admissions, first come first served, while the batch and the cache have room for a whole prompt.
  // A chunk's logit rows run from its logits_from to its end: its last token's (which samples) and, under
  // echo_logprobs, those of the positions that score prompt tokens not scored yet (nor claimed by another
  // choice of the prompt earlier in this step) — position p scores token p + 1 of the prompt, so the chunk's
  // positions [max(cached, claimed - 1), prompt length - 1). The rows a step adds for scoring stay within
  // scored_rows_: an echoed prompt's chunk ends where its share runs out (or waits for the next step, when it
  // would score from its first token), so no sequence reads past a position nobody scores.
  bool all_logits = false;
  int64_t scored_left = scored_rows_;
  auto add_prompt_chunk = [&](Sequence& s) {
    int64_t take = std::min<int64_t>(s.prompt_end - s.cached, budget);
    int64_t from = take - 1, until = 0;
    if (s.echo) {
      // Chunk offsets: scoring starts at `first`, and positions before `last` score a prompt token.
      const int64_t first = std::max(s.cached, s.echo->claimed - 1) - s.cached,
                    last = static_cast<int64_t>(s.request.prompt.size()) - 1 - s.cached;
      if (first < std::min(take, last)) {
        if (scored_left == 0 && first == 0) return;
        take = std::min(take, first + scored_left);
        if (first < std::min(take, last)) {
          from = first;
          until = s.cached + std::min(take, last);
          scored_left -= take - from;
          s.echo->claimed = until + 1;
        } else {
          from = take - 1;
        }
      }
    }
    all_logits = all_logits || from < take - 1;
    chunks.push_back({s.engine_seq, std::span<const int32_t>(s.tokens).subspan(static_cast<size_t>(s.cached),
                                                                                static_cast<size_t>(take)),
                      std::nullopt, from, /*prefill=*/true});
    owners.push_back(&s);
    scored_until.push_back(until);
    budget -= take;
  };
  for (auto& s : running_) {
    if (budget == 0) break;
    if (!s->prefilled()) add_prompt_chunk(*s);
  }
  while (budget > 0 && !waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_seqs) {
    Sequence& s = *waiting_.front();
    if (s.leader >= 0) {  // a later choice: not before the first has read the prompt (Sequence::leader)
      auto lead = std::find_if(running_.begin(), running_.end(), [&](const auto& r) { return r->id == s.leader; });
      if (lead != running_.end() && !(*lead)->prefilled()) break;
    }
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    s.engine_seq = engine_.add_sequence();
    // The cached whole blocks of its tokens but the last, which is read in any case: its logits sample.
    const bool lookup = options_.prefix_caching && !s.echo;
    const int64_t hit =
        lookup ? engine_.attach_prefix(s.engine_seq, std::span<const int32_t>(s.tokens).first(static_cast<size_t>(n - 1)))
               : 0;
    if (blocks_for(n) - hit / bs > cache.free_blocks()) {
      engine_.remove_sequence(s.engine_seq);
      s.engine_seq = -1;
      break;
    }
    if (lookup) {
      stats_.prefix_query_tokens += n - 1;
      stats_.prefix_hit_tokens += hit;
    }
    if (!std::exchange(s.stream->admitted_, true)) s.stream->cached_prompt_tokens_.store(hit);
    s.cached = hit;
    s.admitted = admissions_++;
    s.prompt_end = n;
    cache.reserve(s.engine_seq, n);
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    add_prompt_chunk(s);
  }
  waiting_count_.store(static_cast<int64_t>(waiting_.size()));
  running_count_.store(static_cast<int64_t>(running_.size()));
  if (chunks.empty()) return !running_.empty() || !waiting_.empty();  // nothing fits this step (cannot last)

  const Clock::time_point t1 = Clock::now();
  const Tensor logits = engine_.forward(chunks, all_logits);  // [rows, V]: a row per chunk, or from logits_from on
  std::vector<Sequence*> ready;  // sequences whose pending tokens are all read: they sample
  std::vector<Sequence*> read;   // ... that produce nothing (max_tokens 0 with echo_logprobs): they finish
  std::vector<int64_t> rows;     // ready[i]'s logits row
  std::vector<Scored> scored;    // prompt positions to score (echo_logprobs), then the sampled tokens
  int64_t row = 0;               // the chunk's first logits row
  for (size_t r = 0; r < chunks.size(); ++r) {
    Sequence& s = *owners[r];
    const int64_t n = static_cast<int64_t>(chunks[r].tokens.size()), from = all_logits ? chunks[r].logits_from : n - 1;
    for (int64_t p = s.cached + from; p < scored_until[r]; ++p)
      scored.push_back({&s, row + p - s.cached - from, s.tokens[static_cast<size_t>(p + 1)]});
    s.cached += n;
    row += n - from;
    if (options_.prefix_caching)  // what may be cached: see SchedulerOptions::prefix_caching
      engine_.publish_prefix(s.engine_seq, std::span<const int32_t>(s.tokens).first(static_cast<size_t>(
                                               options_.sparsity ? std::min(s.cached, s.prompt_end) : s.cached)));
    if (r >= static_cast<size_t>(decode_tokens)) stats_.prompt_tokens += n;
    if (s.cached < static_cast<int64_t>(s.tokens.size())) continue;
    if (s.produced == s.request.params.max_tokens) {
      read.push_back(&s);
      continue;
    }
    ready.push_back(&s);
    rows.push_back(row - 1);
  }
  const size_t prompt_scored = scored.size();
  std::vector<int32_t> next;
  if (!ready.empty() && all_logits) {  // the sampled rows alone, so sampling passes over no prompt rows
    Backend& be = model_.backend();
    Tensor ids = Tensor::empty(DType::I32, {static_cast<int64_t>(rows.size())});
    for (size_t i = 0; i < rows.size(); ++i) ids.data<int32_t>()[i] = static_cast<int32_t>(rows[i]);
    Tensor compact = be.alloc(logits.dtype(), {ids.numel(), logits.dim(1)});
    be.embedding(logits, be.upload(ids, DType::I32), compact);
    std::vector<int64_t> compact_rows(rows.size());
    std::iota(compact_rows.begin(), compact_rows.end(), 0);
    next = sample(compact, ready, compact_rows);
  } else if (!ready.empty()) {
    next = sample(logits, ready, rows);
  }
  for (size_t i = 0; i < ready.size(); ++i)
    if (ready[i]->request.params.logprobs >= 0) scored.push_back({ready[i], rows[i], next[i]});
  std::vector<TokenLogprob> logprobs = scored.empty() ? std::vector<TokenLogprob>() : score(logits, scored);
  for (size_t m = 0; m < prompt_scored; ++m) scored[m].s->echo->tokens.push_back(std::move(logprobs[m]));
  stats_.scored_prompt_tokens += static_cast<int64_t>(prompt_scored);
  const Clock::time_point t2 = Clock::now();
  for (size_t i = 0, m = prompt_scored; i < ready.size(); ++i) {
    std::optional<TokenLogprob> lp;
    if (ready[i]->request.params.logprobs >= 0) lp = std::move(logprobs[m++]);
    produce(*ready[i], next[i], std::move(lp), t2);
  }
  for (Sequence* s : read) finish(*s, FinishReason::length);
  std::erase_if(running_, [](const std::unique_ptr<Sequence>& s) { return s->engine_seq < 0; });
  running_count_.store(static_cast<int64_t>(running_.size()));

  ++stats_.steps;
  stats_.batch_sum += static_cast<int64_t>(chunks.size());
  if (decode_tokens == static_cast<int64_t>(chunks.size())) {
    ++stats_.decode_only_steps;
    stats_.decode_only_tokens += decode_tokens;
    stats_.decode_only_seconds += seconds(t2 - t1);
  } else if (decode_tokens == 0) {
    ++stats_.prefill_only_steps;
  } else {
    ++stats_.mixed_steps;
    stats_.mixed_seconds += seconds(t2 - t1);
  }
  const Clock::time_point t3 = Clock::now();
  stats_.engine_seconds += seconds(t2 - t1);
  stats_.schedule_seconds += seconds(t1 - t0) + seconds(t3 - t2);
  publish();
  return true;
}

void Scheduler::publish() {
  const KVCache& cache = engine_.cache();
  std::lock_guard lock(gauges_mu_);
  gauges_.stats = stats_;
  gauges_.running = static_cast<int64_t>(running_.size());
  gauges_.waiting = static_cast<int64_t>(waiting_.size());
  gauges_.kv_blocks_total = cache.num_blocks();
  gauges_.kv_blocks_used = cache.num_blocks() - cache.free_blocks();
  gauges_.kv_blocks_cached = cache.cached_blocks();
}

SchedulerGauges Scheduler::gauges() const {
  std::lock_guard lock(gauges_mu_);
  return gauges_;
}

void Scheduler::run_until_idle() {
  while (step()) {
  }
}

void Scheduler::run() {
  for (;;) {
    if (step()) continue;
    std::unique_lock lock(submit_mu_);
    submit_cv_.wait(lock, [&] { return stopping_ || !submitted_.empty(); });
    if (stopping_) return;
  }
}

void Scheduler::stop() {
  std::lock_guard lock(submit_mu_);
  stopping_ = true;
  submit_cv_.notify_all();
}

}  // namespace polar
