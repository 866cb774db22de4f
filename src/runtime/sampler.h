// Seeded sampling streams: a Sampler gives one sequence its reproducible sequence of uniform numbers and
// applies the sampling rule of ops/sampling.h with them, on the host (sample) or wherever the caller
// evaluates the rule (next_uniform feeds Backend::sample).
#pragma once
#include <cstdint>

#include "ops/sampling.h"

namespace polar {

class Sampler {
 public:
  // stream distinguishes sequences of one request so each gets its own reproducible random stream,
  // whatever else shares its batch.
  Sampler(const SamplingParams& params, uint64_t stream);
  const SamplingParams& params() const { return params_; }
  // The uniform number of this stream's next draw.
  float next_uniform();
  int32_t sample(const float* logits, int64_t vocab) { return sample_row(logits, vocab, params_, next_uniform()); }

 private:
  SamplingParams params_;
  uint64_t stream_seed_;
  uint64_t draws_ = 0;
};

int32_t argmax(const float* logits, int64_t n);

}  // namespace polar
