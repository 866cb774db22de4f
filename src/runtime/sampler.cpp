#include "runtime/sampler.h"

#include <algorithm>

#include "core/random.h"

namespace polar {

int32_t argmax(const float* logits, int64_t n) {
  return static_cast<int32_t>(std::max_element(logits, logits + n) - logits);  // first of ties
}

Sampler::Sampler(const SamplingParams& params, uint64_t stream)
    : params_(params), stream_seed_(mix64(params.seed) ^ mix64(stream + 0x5851F42D4C957F2DULL)) {
  validate(params);
}

float Sampler::next_uniform() { return uniform_hash(stream_seed_, draws_++); }

}  // namespace polar
