// What the routers are trained to predict (issue 5's --selector oracle; an upper bound on their recall, not
// on the quality it buys: docs/accuracy.md): each token keeps, per layer, the KV groups
// (or query heads) whose true attention output is largest, measured on the layer's dense attention — the
// L2 norm of the unit's output rows, which is what calibration labels its routers with (a group's norm is
// sqrt(Σ of its heads' norms²)). It needs that dense attention, so no KV read is saved. It selects with
// backend ops only (l2_norms, route_heads; the model then applies keep_heads), with no host round trip.
#pragma once
#include "sparse/head_selector.h"

namespace polar {

class OracleSparsity final : public HeadSelector {
 public:
  OracleSparsity(const Model& model, double density, Granularity granularity = Granularity::Group)
      : HeadSelector(model, density, granularity) {
    check(tp_size_ == 1, "--selector oracle ranks heads by a layer's whole attention output, which tensor parallelism "
                         "splits over the ranks: use --tp 1");
  }

  // Nothing before attention: the choice needs its output.
  Tensor attention_heads(int, const Tensor&) override { return Tensor(); }
  Tensor heads_from_attention(int layer, const Tensor& attn) override;
};

}  // namespace polar
