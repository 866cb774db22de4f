// Perplexity over a token stream: the stream is cut into non-overlapping windows of ctx tokens, each scored
// as its own sequence (windows batched together); every token but a window's first is predicted from the
// tokens before it in its window. With a BOS token, each window is BOS + (ctx - 1) text tokens and all of
// its text tokens are scored.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/model.h"

namespace polar {

struct PerplexityResult {
  double nll_sum = 0;     // sum of -log p over scored tokens (nats)
  int64_t scored = 0;     // tokens scored
  double perplexity() const;
};

// bos < 0: no BOS. max_scored > 0 stops after that many scored tokens. batch: windows per forward pass.
// progress(scored_so_far, total_to_score) is called after each batch. With sparsity, every token after a
// window's first is processed as a sparse decode step would process it (its own head selection and MLP
// neuron set), in one pass per window: the perplexity that decoding the text token by token would see.
PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int32_t bos,
                            int64_t max_scored, int64_t batch,
                            const std::function<void(int64_t, int64_t)>& progress = {}, Sparsity* sparsity = nullptr);

// log p(target) under logits (log-softmax in double).
double log_prob(const float* logits, int64_t vocab, int32_t target);

}  // namespace polar
