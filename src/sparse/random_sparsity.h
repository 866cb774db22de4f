// The chance baseline for router accuracy (issue 5's --selector random): every token keeps as many KV
// groups (or query heads) as the routers would at the same density, drawn uniformly at random, so a
// router's accuracy can be compared with selection by chance at equal cost. Layer 0 and the MLP stay dense.
#pragma once
#include <cstdint>

#include "sparse/head_selector.h"

namespace polar {

class RandomSparsity final : public HeadSelector {
 public:
  // density in (0, 1]; the draw of call n at layer l comes from (seed, l, n), so a run is reproducible.
  RandomSparsity(const Model& model, double density, uint64_t seed, Granularity granularity = Granularity::Group);

  Tensor attention_heads(int layer, const Tensor& h) override;

 private:
  uint64_t seed_;
  uint64_t calls_ = 0;
};

}  // namespace polar
