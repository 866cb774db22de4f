// Token sampling on the host: greedy (temperature 0), temperature, top-k, top-p (nucleus), seeded.
#pragma once
#include <cstdint>
#include <random>

namespace polar {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = all tokens
  float top_p = 1.0f;        // 1 = no nucleus cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  // stream distinguishes sequences of one request so each gets its own reproducible random stream,
  // whatever else shares its batch.
  Sampler(const SamplingParams& params, uint64_t stream);
  int32_t sample(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

int32_t argmax(const float* logits, int64_t n);

}  // namespace polar
