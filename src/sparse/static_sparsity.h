// Static head selection (issue 5's --selector static): every token keeps the same KV groups (or query
// heads) at a layer, the k that were most often among the true top heads in calibration (the router file's
// head shares, routers.h). What a learned router must beat to show that head importance is contextual.
#pragma once
#include <vector>

#include "sparse/head_selector.h"
#include "sparse/routers.h"

namespace polar {

class StaticSparsity final : public HeadSelector {
 public:
  // Routers without head shares (files made before calibration recorded them, random routers) are a
  // polar::Error naming `source` (the router file) and what to do.
  StaticSparsity(const Model& model, const Routers& routers, double density, const std::string& source,
                 Granularity granularity = Granularity::Group);

  // [T, k]: the layer's kept units, the same in every row. Built on the host and uploaded on each call, so
  // not for steps captured in a graph (scoring passes only).
  Tensor attention_heads(int layer, const Tensor& h) override;
  // The units layer `layer` keeps, ascending (empty where it is dense).
  const std::vector<int32_t>& kept_units(int layer) const { return kept_units_.at(static_cast<size_t>(layer)); }

 private:
  std::vector<std::vector<int32_t>> kept_units_;  // per layer
};

}  // namespace polar
