// What every attention-head selector shares (issue 5's --selector router|oracle|static|random and
// --granularity group|head): how many heads a token keeps at a density, and the top-k that picks them.
//
// Granularity: KV groups (the default, what saves KV bandwidth: the attention op reads only the selected
// groups' cache; for MHA a group is one head) or, in GQA models, query heads (the unselected query heads'
// outputs are zeroed after a dense attention; no KV read is saved — for accuracy comparisons). Each token
// keeps k = max(1, int(density · n)) of the n units (Hkv groups or H query heads) at layers 1..L-1; layer 0
// is always dense, and so is every layer when k = n.
#pragma once
#include <string>

#include "model/model.h"

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

  double density() const { return density_; }
  Granularity granularity() const { return granularity_; }
  int64_t units() const { return units_; }  // KV groups, or query heads
  int64_t kept() const { return kept_; }    // units each token keeps at layers >= 1
  // KV heads whose cache each token's attention reads at layers >= 1.
  int64_t kv_heads_read() const { return per_query_head() ? config_.n_kv_heads : kept_; }
  // "2 of 3 KV groups", "4 of 9 query heads", ...
  std::string describe() const;

 protected:
  // density in (0, 1]. Balanced (a tensor-parallel model) only where the selector can score its own heads alone.
  HeadSelector(const Model& model, double density, Granularity granularity, TpHeads tp_heads = TpHeads::Global);
  // Whether `layer` selects at all (layer 0 and a density keeping every unit are dense).
  bool selects(int layer) const { return layer > 0 && kept_ < units_; }
  // [T, kept()] I32: each row's best units by scores [T, units() · pool], a unit's score being the max over
  // its `pool` consecutive columns (the route_heads op's rule: ascending, ties to the lower index); on a
  // tensor-parallel rank, the units of that it owns (localize).
  Tensor top(const Tensor& scores, int64_t pool) const;
  // A tensor-parallel rank's part of whole-model selections idx [T, kept()]: [T, min(kept(), its units)],
  // padded (Backend::localize_indices). idx itself alone.
  Tensor localize(const Tensor& idx) const;
  // Balanced: the rank's ceil(kept() / N) best of its own units by scores [T, its units · pool].
  Tensor top_own(const Tensor& scores, int64_t pool) const;
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
};

}  // namespace polar
