// What every attention-head selector shares (issue 5's --selector router|oracle|static|random and
// --granularity group|head): how many heads a token keeps at a density, and the top-k that picks them.
//
// Granularity: KV groups (the default, what saves KV bandwidth: the attention op reads only the selected
// groups' cache; for MHA a group is one head) or, in GQA models, query heads (the unselected query heads'
// outputs are zeroed after a dense attention; no KV read is saved — for accuracy comparisons). Each token
// keeps k = max(1, int(density · n)) of the n units (Hkv groups or H query heads) at layers 1..L-1; layer 0
// is always dense, and so is every layer when k = n.
//
// Adaptive selection (issue 19, selection.h): with a calibrated schedule the k of each layer comes from the
// router file's coverage curves (the same mean); with a threshold rule a token keeps between kmin and kmax
// units, in [T, kmax] lists padded with n, and the units each token really kept are tallied on the device
// (density_reached).
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "model/model.h"
#include "sparse/selection.h"

namespace polar {

enum class Granularity { Group, Head };

// How the ranks of a tensor-parallel model share a token's heads (--tp-heads). global: every rank scores all
// units (the router's input is replicated) and takes the whole model's top k, the selection of one rank
// alone, then runs the units of it it owns, so ranks may get unequal work. balanced: each rank takes the
// top ceil(k / N) of its own units (the paper's scheme): equal work, another selection.
enum class TpHeads { Global, Balanced };
TpHeads parse_tp_heads(const std::string& name);

// "group" or "head"; anything else is a polar::Error naming the choices.
Granularity parse_granularity(const std::string& name);
const char* granularity_name(Granularity g);

class HeadSelector : public Sparsity {
 public:
  bool per_query_head() const override { return units_ != config_.n_kv_heads; }
  // Attention sparsity only; RouterSparsity adds the MLP's.
  Tensor mlp_neurons(int, const Tensor&, const StepLayout&) override { return Tensor(); }

  void begin_step(const Tensor& live_tokens, const Tensor& dense_tokens) override;

  double density() const { return density_; }
  Granularity granularity() const { return granularity_; }
  int64_t units() const { return units_; }  // KV groups, or query heads
  int64_t kept() const { return kept_; }    // units each token keeps at layers >= 1 under a uniform top-k
  // The units layer `layer` aims at per token: its schedule's k (0 at layer 0, which is dense).
  int64_t layer_kept(int layer) const { return layer_kept_.at(static_cast<size_t>(layer)); }
  // Width of layer `layer`'s index lists: its k for top-k, kmax for the threshold rules.
  int64_t width(int layer) const { return selection_.adaptive() ? kmax_ : layer_kept(layer); }
  // The share of its units layer `layer` >= 1 aims to keep per token: layer_kept / units for top-k; for
  // the threshold rules the density (uniform schedule) or the calibrated schedule's k / units, which the
  // tokens reach only on average (density_reached says how well).
  double aim(int layer) const;
  // KV heads whose cache each token's attention reads at layer `layer` >= 1 (on average, for the threshold
  // rules: the aim's share).
  double kv_heads_read(int layer) const {
    return per_query_head() ? static_cast<double>(config_.n_kv_heads) : aim(layer) * static_cast<double>(units_);
  }
  const SelectionOptions& selection() const { return selection_; }
  // "2 of 3 KV groups", "4 of 9 query heads", "threshold, 1..3 of 3 KV groups, 0.67 mean aimed at", ...
  std::string describe() const;
  // The mean share of units kept over layers 1..L-1 and the sparse tokens of the steps so far (per layer:
  // Σ units kept / (tokens · units), then the mean over the layers): exact for top-k; for the threshold
  // rules read from the device tally of the steps run (synchronises), nullopt before any step ran.
  std::optional<double> density_reached();

 protected:
  // density in (0, 1] (the mean over layers 1..L-1 with a calibrated schedule). Balanced (a tensor-parallel
  // model) only where the selector can score its own heads alone. stats: the routers' selection statistics
  // at this granularity ([layer]), which the calibrated schedule and the threshold rules need (a polar::Error
  // naming `source` without them).
  HeadSelector(const Model& model, double density, Granularity granularity, TpHeads tp_heads = TpHeads::Global,
               const SelectionOptions& selection = {}, const std::vector<UnitStats>* stats = nullptr,
               const std::string& source = "");
  // Whether `layer` selects at all (layer 0 and a layer keeping every unit by top-k are dense).
  bool selects(int layer) const {
    return layer > 0 && (selection_.adaptive() ? kmin_ < units_ : layer_kept(layer) < units_);
  }
  // [T, width(layer)] I32: each row's best units by scores [T, units() · pool], a unit's score being the max
  // over its `pool` consecutive columns (the route_heads op's rule: ascending, ties to the lower index) —
  // layer_kept(layer) of them, or as many as the threshold rule keeps, padded with units(); on a
  // tensor-parallel rank, the units of that it owns (localize).
  Tensor top(const Tensor& scores, int64_t pool, int layer);
  // A tensor-parallel rank's part of whole-model selections idx [T, k]: [T, min(k, its units)], padded
  // (Backend::localize_indices). idx itself alone.
  Tensor localize(const Tensor& idx) const;
  // Balanced: the rank's ceil(layer_kept / N) best of its own units by scores [T, its units · pool].
  Tensor top_own(const Tensor& scores, int64_t pool, int layer) const;
  bool balanced() const { return tp_heads_ == TpHeads::Balanced; }

  Backend& backend_;
  ModelConfig config_;
  ShardDims dims_;
  int tp_size_;

 private:
  double density_;
  Granularity granularity_;
  TpHeads tp_heads_;
  int64_t units_, kept_;
  int64_t first_unit_, own_units_;  // the rank's units: [first_unit_, first_unit_ + own_units_)
  std::string describe_units() const;  // "KV groups", "query heads" or "heads"
  double mean_layer_density() const;    // mean of aim over layers 1..L-1
  SelectionOptions selection_;
  int64_t kmin_ = 1, kmax_ = 0;       // the threshold rules' bounds (kmax_ = units_ unless asked)
  std::vector<int64_t> layer_kept_;   // [layer]: the schedule
  std::vector<float> cutoff_;         // [layer]: the threshold, or stat-topk's c
  std::vector<double> aim_;           // [layer]: the threshold rules' aim (aim())
  // [layers, 2] I32 on the backend: Σ (units kept, rows) per layer; good for 2^31 units kept per layer
  // (67M sparse tokens at 32 units: far beyond any one command's run)
  Tensor tally_;
  bool tallied_ = false;              // whether a step has added to tally_
  Tensor live_tokens_, dense_tokens_;  // this step's (begin_step)
};

}  // namespace polar
