// The chance baseline for router accuracy (issue 5's --selector random): every token keeps as many KV
// heads (groups) as the routers would at the same density, drawn uniformly at random, so a router's
// accuracy can be compared with selection by chance at equal cost. Layer 0 and the MLP stay dense.
#pragma once
#include <cstdint>

#include "model/model.h"

namespace polar {

class RandomSparsity final : public Sparsity {
 public:
  // density in (0, 1]; the draw of call n at layer l comes from (seed, l, n), so a run is reproducible.
  RandomSparsity(const Model& model, double density, uint64_t seed);

  Tensor attention_heads(int layer, const Tensor& h) override;
  Tensor mlp_neurons(int, const Tensor&, const StepLayout&) override { return Tensor(); }

  int64_t kv_heads_kept() const { return kv_heads_kept_; }

 private:
  Backend& backend_;
  int64_t n_kv_heads_;
  int64_t kv_heads_kept_;
  uint64_t seed_;
  uint64_t calls_ = 0;
};

}  // namespace polar
