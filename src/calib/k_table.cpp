#include "calib/k_table.h"

#include <algorithm>
#include <numeric>
#include <span>

#include "core/error.h"
#include "core/random.h"

namespace polar::calib {

KChoice smallest_k(const float* score, const uint8_t* active, int64_t groups, int64_t D, double target,
                   int64_t multiple) {
  check(groups >= 1 && D >= 1 && multiple >= 1, "k search needs groups, neurons and a multiple >= 1");
  std::vector<int64_t> candidates;
  for (int64_t k = multiple; k < D; k += multiple) candidates.push_back(k);
  candidates.push_back(D);
  std::vector<double> recall_sum(candidates.size(), 0.0);
  std::vector<int32_t> order(static_cast<size_t>(D));
  for (int64_t g = 0; g < groups; ++g) {
    const float* s = score + g * D;
    const uint8_t* a = active + g * D;
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return s[x] > s[y] || (s[x] == s[y] && x < y); });
    const int64_t union_size = std::count_if(a, a + D, [](uint8_t v) { return v != 0; });
    int64_t hits = 0, taken = 0;
    for (size_t c = 0; c < candidates.size(); ++c) {
      for (; taken < candidates[c]; ++taken) hits += a[order[size_t(taken)]] != 0;
      recall_sum[c] += union_size ? double(hits) / double(union_size) : 1.0;
    }
  }
  for (size_t c = 0; c < candidates.size(); ++c)
    if (recall_sum[c] / double(groups) >= target) return {candidates[c], recall_sum[c] / double(groups)};
  // Unreachable for target <= 1 (k = D recalls everything); a target above 1 is the caller's mistake.
  fail("no k reaches a union recall of {} (at most 1)", target);
}

void check_k_tokens(int64_t val_tokens, const KTableOptions& o) {
  check(!o.batch_sizes.empty() && o.groups >= 1, "the MLP k table needs batch sizes and groups");
  const int64_t largest = *std::max_element(o.batch_sizes.begin(), o.batch_sizes.end());
  check(val_tokens >= largest,
        "the MLP k table draws groups of up to {} distinct validation tokens, but there are only {} (the validation "
        "share of the calibration tokens, 1 in {}): calibrate on at least {} tokens",
        largest, val_tokens, kValidationShare, kValidationShare * largest);
}

KRow mlp_k_row(const LayerSpill& spill, const std::vector<int64_t>& val, const MlpRouter& router, uint64_t stream,
               const KTableOptions& o) {
  const int64_t d = spill.dims().hidden, D = spill.dims().ffn, n = static_cast<int64_t>(val.size());
  check_k_tokens(n, o);
  KRow row;
  std::vector<int64_t> pool;
  std::vector<float> x, logits, score(size_t(o.groups * D));
  std::vector<uint8_t> active(size_t(o.groups * D));
  for (int64_t B : o.batch_sizes) {
    std::fill(score.begin(), score.end(), 0.0f);
    std::fill(active.begin(), active.end(), 0);
    x.resize(size_t(B * d));
    logits.resize(size_t(B * D));
    for (int64_t g = 0; g < o.groups; ++g) {
      // B distinct tokens: the first B steps of a Fisher-Yates shuffle of the validation tokens.
      const uint64_t s = mix64(mix64(stream + uint64_t(B)) + uint64_t(g));
      pool = val;
      for (int64_t i = 0; i < B; ++i) std::swap(pool[size_t(i)], pool[size_t(i) + mix64(s + uint64_t(i)) % size_t(n - i)]);
      const std::span<const int64_t> tokens(pool.data(), size_t(B));
      spill.inputs(tokens, x.data());
      mlp_logits(router, d, D, x.data(), B, logits.data());
      float* sg = score.data() + g * D;
      uint8_t* ag = active.data() + g * D;
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* mask = spill.active(tokens[size_t(b)]);
        for (int64_t j = 0; j < D; ++j) {
          sg[j] += std::max(0.0f, logits[size_t(b * D + j)]);
          ag[j] |= (mask[j / 8] >> (j % 8)) & 1u;
        }
      }
    }
    const KChoice c = smallest_k(score.data(), active.data(), o.groups, D, o.target, o.multiple);
    row.k.push_back(c.k);
    row.recall.push_back(c.recall);
  }
  return row;
}

}  // namespace polar::calib
