#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace polar {

int32_t argmax(const float* logits, int64_t n) {
  return static_cast<int32_t>(std::max_element(logits, logits + n) - logits);  // first of ties
}

Sampler::Sampler(const SamplingParams& params, uint64_t stream) : params_(params) {
  check(params.temperature >= 0, "temperature must be >= 0, got {}", params.temperature);
  check(params.top_p > 0 && params.top_p <= 1, "top-p must be in (0, 1], got {}", params.top_p);
  check(params.top_k >= 0, "top-k must be >= 0, got {}", params.top_k);
  std::seed_seq seq{params.seed, stream};
  rng_.seed(seq);
}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  if (params_.temperature == 0.0f) return argmax(logits, vocab);
  // Candidates sorted by logit, cut to top-k, softmax at temperature, cut to the nucleus, then draw.
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = params_.top_k > 0 ? std::min(params_.top_k, vocab) : vocab;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), by_logit);
  idx.resize(k);
  std::vector<double> p(k);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += (p[i] = std::exp((logits[idx[i]] - mx) / params_.temperature));
  int64_t keep = k;
  if (params_.top_p < 1.0f) {
    double cum = 0;
    for (int64_t i = 0; i < k; ++i) {
      cum += p[i] / sum;
      if (cum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double total = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (int64_t i = 0; i < keep; ++i) {
    r -= p[i];
    if (r < 0) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace polar
