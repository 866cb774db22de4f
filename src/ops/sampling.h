// Token sampling, defined once for every backend. A row of logits gives a token:
//   temperature 0: the argmax (lowest index on ties);
//   otherwise p_i = exp((l_i - max l) / temperature) over the kept tokens, where a token is kept when its
//   logit is >= the top_k-th largest logit (top_k 0 = all; ties at the threshold are kept) and, when
//   top_p < 1, its p_i is >= the largest threshold whose kept mass is still >= top_p of the total (the
//   nucleus); the token drawn is the first in index order at which the running kept mass exceeds
//   u * (kept mass), for a uniform number u in [0, 1).
// Thresholds rather than a sort make the rule computable in a few passes on a GPU, and drawing in index
// order with an explicit u makes the CPU and CUDA backends pick the same token for the same u.
#pragma once
#include <cstdint>

namespace polar {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = all tokens
  float top_p = 1.0f;        // 1 = no nucleus cut
  uint64_t seed = 0;
};

// Throws polar::Error naming the bad parameter.
void validate(const SamplingParams& p);

// The reference rule above on one row of fp32 logits.
int32_t sample_row(const float* logits, int64_t vocab, const SamplingParams& p, float u);

}  // namespace polar
