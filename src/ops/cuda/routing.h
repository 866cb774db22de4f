// Sparse selection kernels (routing.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/elem.h"

namespace polar::cuda {

// Sparse selection (backend.h: route_heads, route_neurons). Keys order scores higher first, NaN as -inf,
// the lower index first among equals; selections are written in ascending index order.
// How many units a row of route_heads keeps (backend.h: HeadCutoff, with device pointers): kTopK, exactly
// k; kThreshold, the units whose pooled score >= value, clamped to [kmin, k]; kRowStat, the same with the
// threshold mean + value · std of the row's pooled scores. tally [2] (or nullptr) += (kept, rows) over the
// rows r < live_rows[0] (nullptr: all) with dense_rows[r] == 0 (nullptr: none flagged).
struct RowCutoff {
  enum Mode : int { kTopK, kThreshold, kRowStat };
  int mode = kTopK;
  int kmin = 1;
  float value = 0;
  int32_t* tally = nullptr;
  const int32_t* live_rows = nullptr;
  const int32_t* dense_rows = nullptr;
};
// idx[R, k] = the best of each row's H / group pooled scores (max over `group` consecutive heads): k of
// them, or as many as `cutoff` keeps, the rest of the row padded with H / group. One CTA per row;
// H / group <= 1024.
void route_heads(const void* scores, int64_t R, int64_t H, int64_t group, int64_t k, const RowCutoff& cutoff,
                 int32_t* idx, Elem e, cudaStream_t stream);
// idx[k] = the k best j by Σ_{r < live_rows[0]} max(logits[r, j], 0) over logits [R, D]; scratch holds
// route_neurons_scratch(D) ints.
inline int64_t route_neurons_scratch(int64_t D) { return D + 2048; }
void route_neurons(const void* logits, int64_t R, int64_t D, const int32_t* live_rows, int64_t k, int32_t* scratch,
                   int32_t* idx, Elem e, cudaStream_t stream);
// Zeroes the rows of out [T, H, dh] whose head h is not kept, h / group not among heads[t · heads_stride +
// 0:k] (heads_stride k: a set per token; 0: one set for all), except for tokens with dense_tokens[t] != 0
// (nullptr: none) (backend.h: keep_heads). One CTA per token, O(H·dh + k) each; H / group <= 393216 (a
// shared-memory bitmap). An id equal to H / group is padding (localize_indices) and skipped; one outside
// [0, H / group] sets kErrorHeadOutOfRange.
void keep_heads(void* out, int64_t T, int64_t H, int64_t group, int64_t dh, const int32_t* heads, int64_t k,
                int64_t heads_stride, const int32_t* dense_tokens, int32_t* error_flag, Elem e, cudaStream_t stream);
// out [R, m] = each ascending row of idx [R, k] restricted to [first, first + count), renumbered from 0, then
// padded with count (backend.h: localize_indices).
void localize_indices(const int32_t* idx, int64_t R, int64_t k, int64_t first, int64_t count, int32_t* out, int64_t m,
                      cudaStream_t stream);

}  // namespace polar::cuda
