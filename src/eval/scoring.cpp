#include "eval/scoring.h"

#include <optional>

#include <algorithm>
#include <span>
#include <string>

#include "core/error.h"
#include "runtime/engine.h"
#include "runtime/perplexity.h"
#include "runtime/sampler.h"

namespace polar {

ScoreRequest make_request(const Tokenizer& tok, std::string_view context, std::string_view continuation,
                          int64_t max_positions) {
  const bool bos = tok.add_bos_default();
  const std::vector<int32_t> ctx = tok.encode(context, bos);
  ScoreRequest r;
  r.tokens = tok.encode(std::string(context) + std::string(continuation), bos);
  const auto [end, _] = std::mismatch(ctx.begin(), ctx.end(), r.tokens.begin(), r.tokens.end());
  r.context_len = end - ctx.begin();
  const int64_t n = static_cast<int64_t>(r.tokens.size());
  check(r.context_len < n, "the continuation \"{}\" adds no tokens to the context", continuation);
  check(r.context_len > 0,
        "no context token precedes the continuation (the context is empty or merges into the continuation's first "
        "token, and the model has no BOS token)");
  const int64_t continuation_len = n - r.context_len;
  check(continuation_len < max_positions,
        "the continuation is {} tokens long: with at least one token of context it does not fit the model's context "
        "of {} tokens",
        continuation_len, max_positions);
  if (n > max_positions) {
    // Drop the oldest context tokens; BOS stays first, where the model saw it in training.
    r.truncated = n - max_positions;
    const auto first = r.tokens.begin() + (bos ? 1 : 0);
    r.tokens.erase(first, first + r.truncated);
    r.context_len -= r.truncated;
  }
  return r;
}

std::vector<Score> score(Model& model, const std::vector<ScoreRequest>& requests, const ScoreOptions& options,
                         const std::function<void(int64_t, int64_t)>& progress) {
  check(options.batch >= 1, "the batch must be at least 1 request, got {}", options.batch);
  const int64_t vocab = model.config().vocab_size;
  for (size_t i = 0; i < requests.size(); ++i) {
    const ScoreRequest& r = requests[i];
    check(r.context_len >= 1 && r.context_len < static_cast<int64_t>(r.tokens.size()),
          "request {}: context length {} must be at least 1 and less than its {} tokens", i, r.context_len,
          r.tokens.size());
  }
  const int64_t row_bytes = vocab * static_cast<int64_t>(sizeof(float));
  const int64_t block_size = EngineOptions{}.block_size;
  std::vector<Score> scores(requests.size());
  for (size_t first = 0; first < requests.size();) {
    // The batch: up to options.batch requests whose logits fit max_logit_bytes (at least one request).
    // Row t - 1 predicts token t, so a request needs the rows of tokens context_len - 1 .. len - 2: one per
    // continuation token. Its last token predicts nothing scored and is not fed at all.
    size_t last = first;
    int64_t rows = 0, kv_tokens = 0;
    while (last < requests.size() && last - first < static_cast<size_t>(options.batch)) {
      const int64_t len = static_cast<int64_t>(requests[last].tokens.size());
      const int64_t need = len - requests[last].context_len;
      if (last > first && (rows + need) * row_bytes > options.max_logit_bytes) break;
      rows += need;
      kv_tokens += (len + block_size - 1) / block_size * block_size;
      ++last;
    }
    // Each request is one chunk, context and continuation in a single prefill; with sparsity, the tokens
    // from the continuation on (from the second with sparse_context) are processed as decode steps would.
    Engine engine(model, {.kv_tokens = kv_tokens, .block_size = block_size, .sparsity = options.sparsity});
    std::vector<SeqChunk> chunks;
    for (size_t i = first; i < last; ++i) {
      std::optional<int64_t> sparse_from;
      if (options.sparsity) sparse_from = options.sparse_context ? 1 : requests[i].context_len;
      const std::span<const int32_t> fed(requests[i].tokens.data(), requests[i].tokens.size() - 1);
      chunks.push_back({engine.add_sequence(), fed, sparse_from, requests[i].context_len - 1});
    }
    const Tensor logits = engine.step(chunks, /*all_logits=*/true);
    int64_t row = 0;
    for (size_t i = first; i < last; ++i) {
      const ScoreRequest& r = requests[i];
      const int64_t len = static_cast<int64_t>(r.tokens.size());
      Score& s = scores[i];
      for (int64_t t = r.context_len; t < len; ++t, ++row) {
        const float* l = logits.data<float>() + row * vocab;
        s.logprob += log_prob(l, vocab, r.tokens[t]);
        s.greedy = s.greedy && argmax(l, vocab) == r.tokens[t];
        ++s.tokens;
      }
    }
    first = last;
    if (progress) progress(static_cast<int64_t>(first), static_cast<int64_t>(requests.size()));
  }
  return scores;
}

}  // namespace polar
