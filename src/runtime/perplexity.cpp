#include "runtime/perplexity.h"

#include <algorithm>
#include <cmath>

#include "runtime/engine.h"

namespace polar {

double PerplexityResult::perplexity() const { return scored ? std::exp(nll_sum / scored) : NAN; }

double log_prob(const float* logits, int64_t vocab, int32_t target) {
  const float mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - mx);
  return double(logits[target]) - mx - std::log(sum);
}

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int32_t bos,
                            int64_t max_scored, int64_t batch, const std::function<void(int64_t, int64_t)>& progress,
                            Sparsity* sparsity) {
  const ModelConfig& c = model.config();
  check(ctx >= 2, "context must be at least 2 tokens, got {}", ctx);
  check(ctx <= c.max_positions, "context {} exceeds the model's context length of {}", ctx, c.max_positions);
  check(batch >= 1, "batch must be >= 1");
  // Windows of text tokens: with BOS each holds ctx - 1 text tokens (all scored), else ctx (first not scored).
  const int64_t text_per_window = bos >= 0 ? ctx - 1 : ctx;
  std::vector<std::vector<int32_t>> windows;
  int64_t to_score = 0;
  for (size_t begin = 0; begin < tokens.size(); begin += text_per_window) {
    const size_t end = std::min(tokens.size(), begin + static_cast<size_t>(text_per_window));
    std::vector<int32_t> w;
    if (bos >= 0) w.push_back(bos);
    w.insert(w.end(), tokens.begin() + begin, tokens.begin() + end);
    if (w.size() < 2) break;
    int64_t n = static_cast<int64_t>(w.size()) - 1;
    if (max_scored > 0 && to_score + n > max_scored) {
      w.resize(static_cast<size_t>(max_scored - to_score + 1));
      n = max_scored - to_score;
    }
    to_score += n;
    windows.push_back(std::move(w));
    if (max_scored > 0 && to_score >= max_scored) break;
  }
  check(to_score > 0, "not enough tokens to score (got {})", tokens.size());
  PerplexityResult r;
  for (size_t first = 0; first < windows.size(); first += batch) {
    const size_t last = std::min(windows.size(), first + static_cast<size_t>(batch));
    Engine engine(model, {.kv_tokens = static_cast<int64_t>(last - first) * (ctx + 16), .sparsity = sparsity});
    std::vector<SeqChunk> chunks;
    for (size_t w = first; w < last; ++w)
      chunks.push_back({engine.add_sequence(), windows[w], sparsity ? std::optional<int64_t>(1) : std::nullopt});
    Tensor logits = engine.step(chunks, /*all_logits=*/true);
    int64_t row = 0;
    for (size_t w = first; w < last; ++w) {
      const std::vector<int32_t>& win = windows[w];
      for (size_t i = 0; i + 1 < win.size(); ++i, ++row) {
        r.nll_sum -= log_prob(logits.data<float>() + row * c.vocab_size, c.vocab_size, win[i + 1]);
        ++r.scored;
      }
      ++row;  // the last token of a window predicts nothing we score
    }
    if (progress) progress(r.scored, to_score);
  }
  return r;
}

}  // namespace polar
