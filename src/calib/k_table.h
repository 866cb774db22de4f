// The MLP k table (polar calibrate, step 4; polar-method.md §4, "dynamic layer-wise top-k"): for each
// layer and decode batch size B, how many neurons the step keeps. A step keeps the top k of the batch-summed
// router score Σ_b ReLU(logits[b]); k is the smallest multiple of 128 (or D itself) whose top-k recalls at
// least 99% of the true union of the batch's active neurons, averaged over random groups of B validation
// tokens. Nothing is capped: the search runs up to k = D, where the recall is 1, and the recall reached is
// recorded beside every k.
#pragma once
#include <cstdint>
#include <vector>

#include "calib/spill.h"
#include "calib/train.h"

namespace polar::calib {

struct KTableOptions {
  std::vector<int64_t> batch_sizes = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  int64_t groups = 32;       // random token groups per batch size
  double target = 0.99;      // mean union recall to reach
  int64_t multiple = 128;    // k is a multiple of this (the selective GEMMs' tile), or D
};

struct KChoice {
  int64_t k = 0;
  double recall = 0;  // mean union recall at k
};

// The smallest candidate k in multiple, 2·multiple, ... (then D) at which the top-k of score recalls on
// average at least `target` of the active set, over `groups` rows of score [groups, D] and active
// [groups, D] (1 = in the union). A group with an empty union counts as recall 1. Ties in score go to the
// lower index, as in the sparse ops.
KChoice smallest_k(const float* score, const uint8_t* active, int64_t groups, int64_t D, double target,
                   int64_t multiple);

struct KRow {
  std::vector<int64_t> k;      // [batch size]
  std::vector<double> recall;  // [batch size]
};

// Fails unless `val_tokens` validation tokens are enough for groups of the largest batch size.
void check_k_tokens(int64_t val_tokens, const KTableOptions& options);

// One layer's row of the table for `router`, from groups of distinct tokens of `val` drawn from `stream`.
// Fewer validation tokens than the largest batch size is a polar::Error.
KRow mlp_k_row(const LayerSpill& spill, const std::vector<int64_t>& val, const MlpRouter& router, uint64_t stream,
               const KTableOptions& options);

}  // namespace polar::calib
