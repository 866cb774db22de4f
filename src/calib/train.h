// Router training (polar calibrate, step 3; polar-method.md §4): each layer's routers are trained
// independently on the host in fp32, on the arrays collection spilled (spill.h), with a hand-written loop:
// cblas GEMMs for the Linear layers, sigmoid + weighted binary cross-entropy (mean over the minibatch's
// elements), AdamW. Deterministic for a seed: initial weights from core/random.h streams, a fixed
// minibatch order, and every reduction either a GEMM (OpenBLAS splits GEMMs over rows and columns, never
// over the summed dimension) or a single-threaded loop in a fixed order.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "calib/spill.h"
#include "sparse/routers.h"

namespace polar::calib {

struct TrainOptions {
  double lr = 1e-4;
  double weight_decay = 0.01;
  int64_t batch = 64;
  // Attention routers run every epoch and keep the one with the best validation recall; MLP routers run
  // at most this many, stopping early after `patience` epochs without a better validation F1 or once F1
  // exceeds f1_stop, and keep the best.
  int64_t epochs = 20;
  int64_t patience = 5;
  double f1_stop = 0.99;
  double head_density = 0.5;  // attention labels: the top int(density · H) heads of each token by norm
};

// Tokens [0, n) split 95/5 into training and validation by a seeded shuffle: validation_tokens(n) =
// max(1, n / kValidationShare) of them validate, the rest (at least one) train.
constexpr int64_t kValidationShare = 20;
int64_t validation_tokens(int64_t n);
// Rows evaluated per GEMM when a router is measured on the validation tokens.
constexpr int64_t kValidationChunk = 256;
struct Split {
  std::vector<int64_t> train, val;  // ascending
};
Split split_tokens(int64_t n, uint64_t seed);

// Independent random streams of one calibration: weights, minibatch orders and k-table groups of each
// layer are drawn from their own stream, so none depends on what another consumed.
enum class Stream : uint64_t { AttnInit, AttnOrder, MlpInit, MlpOrder, KGroups, Split };
uint64_t stream_seed(uint64_t seed, int64_t layer, Stream stream);

// Heads (or KV groups) kept out of `heads` at `density`: max(1, int(density · heads)), as sparse decoding
// keeps them.
int64_t heads_kept(double density, int64_t heads);

// Mean over n tokens of |top-k of score ∩ top-k of norm| / k, where both [n, H] are first pooled over
// groups of `group` consecutive heads (score: max, as sparse decoding selects KV groups; norm: the L2 norm
// of the group's output, sqrt(Σ norm²)) and k = heads_kept(density, H / group). group = 1: per head.
// Ties go to the lower index, as in the sparse ops.
double topk_recall(const float* score, const float* norm, int64_t n, int64_t heads, int64_t group, double density);

// Share of the spill's tokens for which each head (group = 1) or KV group (group consecutive heads) is among
// the true top heads_kept(density, H / group) by norm, pooled as topk_recall pools it: [H / group], each in
// [0, 1]. The static selector keeps the units with the largest shares.
std::vector<float> top_share(const LayerSpill& spill, int64_t group, double density);

struct AttentionRouter {
  std::vector<float> w;  // [H, d]
  std::vector<float> b;  // [H]
  double head_recall = 0;   // validation recall of the selected epoch, per query head
  double group_recall = 0;  // the same with the scores max-pooled per KV group (= head_recall for MHA)
  int64_t epoch = 0;        // the selected epoch, from 1
};

struct AttentionRecall {
  double head = 0, group = 0;
};
// Recall of router (w [H, d], b [H]) on spill rows `rows`, at head and at KV-group granularity.
AttentionRecall attention_recall(const LayerSpill& spill, const std::vector<int64_t>& rows, const std::vector<float>& w,
                                 const std::vector<float>& b, double density);

// Adaptive selection's statistics (sparse/routers.h: UnitStats) of router (w [H, d], b [H]) on spill rows
// `rows`, with the scores max-pooled over groups of `group` consecutive heads (1: per query head): quantiles
// of the unit scores and of each token's standardised unit scores, and the mean share of a token's
// attention-output energy (Σ over its units of the pooled norm²) that the router's best k units carry.
UnitStats selection_stats(const LayerSpill& spill, const std::vector<int64_t>& rows, const std::vector<float>& w,
                          const std::vector<float>& b, int64_t group);

// on_epoch(epoch from 1, validation metric) after each epoch.
using EpochFn = std::function<void(int64_t, double)>;

// Linear(d → H) with bias; labels: the top int(density · H) heads of each token by recorded norm; weighted
// BCE, negatives weighted 0.5. Keeps the epoch of the best validation head recall.
AttentionRouter train_attention_router(const LayerSpill& spill, const Split& split, const TrainOptions& options,
                                       uint64_t seed, int64_t layer, const EpochFn& on_epoch = {});

struct MlpRouter {
  int64_t rank = 0;
  std::vector<float> a;  // [r, d]
  std::vector<float> b;  // [D, r]
  double f1 = 0;           // validation F1 of `logit > 0` against `activation > 0`, at the selected epoch
  int64_t epoch = 0;       // the selected epoch, from 1
  int64_t epochs_run = 0;  // epochs trained before stopping
};

// logits [n, D] = (x [n, d] · aᵀ) · bᵀ.
void mlp_logits(const MlpRouter& router, int64_t d, int64_t D, const float* x, int64_t n, float* logits);

// Linear(d → r) · Linear(r → D), no bias, nothing between; labels: activation > 0; weighted BCE with
// positives 1 and negatives (fraction of positives in the minibatch + 0.005). Early stopping on
// validation F1, the best epoch kept.
MlpRouter train_mlp_router(const LayerSpill& spill, const Split& split, int64_t rank, const TrainOptions& options,
                           uint64_t seed, int64_t layer, const EpochFn& on_epoch = {});

}  // namespace polar::calib
