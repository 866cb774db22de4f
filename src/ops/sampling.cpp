#include "ops/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "core/error.h"

namespace polar {

void validate(const SamplingParams& p) {
  check(p.temperature >= 0, "temperature must be >= 0, got {}", p.temperature);
  check(p.top_p > 0 && p.top_p <= 1, "top-p must be in (0, 1], got {}", p.top_p);
  check(p.top_k >= 0, "top-k must be >= 0, got {}", p.top_k);
}

int32_t sample_row(const float* l, int64_t V, const SamplingParams& p, float u) {
  const int32_t best = static_cast<int32_t>(std::max_element(l, l + V) - l);
  if (p.temperature == 0.0f) return best;
  float kth = -INFINITY;
  if (p.top_k > 0 && p.top_k < V) {
    std::vector<float> sorted(l, l + V);
    std::nth_element(sorted.begin(), sorted.begin() + (p.top_k - 1), sorted.end(), std::greater<float>());
    kth = sorted[p.top_k - 1];
  }
  std::vector<float> prob(V, 0.0f);
  double total = 0;
  for (int64_t i = 0; i < V; ++i)
    if (l[i] >= kth) total += (prob[i] = std::exp((l[i] - l[best]) / p.temperature));
  if (p.top_p < 1.0f) {
    std::vector<float> kept;
    for (float q : prob)
      if (q > 0) kept.push_back(q);
    std::sort(kept.begin(), kept.end(), std::greater<float>());
    double cum = 0;
    float cut = kept.back();
    for (float q : kept)
      if ((cum += q) >= p.top_p * total) {
        cut = q;
        break;
      }
    total = 0;
    for (float& q : prob) total += (q = q >= cut ? q : 0.0f);
  }
  const double target = static_cast<double>(u) * total;
  double cum = 0;
  int32_t last = best;
  for (int64_t i = 0; i < V; ++i) {
    if (prob[i] <= 0) continue;
    last = static_cast<int32_t>(i);
    if ((cum += prob[i]) > target) return last;
  }
  return last;  // u * total rounded up to the full mass
}

}  // namespace polar
