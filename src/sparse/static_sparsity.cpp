#include "sparse/static_sparsity.h"

#include <algorithm>
#include <numeric>

namespace polar {

StaticSparsity::StaticSparsity(const Model& model, const Routers& routers, double density, const std::string& source,
                               Granularity granularity)
    : HeadSelector(model, density, granularity) {
  check(static_cast<int64_t>(routers.layers.size()) == config_.n_layers, "{}: routers for {} layers, the model has {}",
        source, routers.layers.size(), config_.n_layers);
  check(has_head_shares(routers),
        "{} records no head importance, which --selector static ranks heads by (router files written by polar "
        "calibrate before it recorded head shares, and random routers, lack it): calibrate the routers again",
        source);
  kept_units_.resize(routers.layers.size());
  for (int layer = 1; layer < config_.n_layers; ++layer) {
    if (!selects(layer)) continue;
    const LayerRouters& l = routers.layers[static_cast<size_t>(layer)];
    const Tensor& share = units() == config_.n_heads ? l.head_share : l.group_share;
    check(share.numel() == units(), "{}: layer {} has {} head shares for {} units", source, layer, share.numel(),
          units());
    // The k largest shares, ties to the lower index (the sparse ops' rule), in ascending order.
    std::vector<int32_t> order(static_cast<size_t>(units()));
    std::iota(order.begin(), order.end(), 0);
    const float* s = share.data<float>();
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return s[a] > s[b]; });
    order.resize(static_cast<size_t>(kept()));
    std::sort(order.begin(), order.end());
    kept_units_[static_cast<size_t>(layer)] = std::move(order);
  }
}

Tensor StaticSparsity::attention_heads(int layer, const Tensor& h) {
  if (!selects(layer)) return Tensor();
  const std::vector<int32_t>& units = kept_units(layer);
  const int64_t T = h.dim(0), k = kept();
  Tensor idx = Tensor::empty(DType::I32, {T, k});
  for (int64_t t = 0; t < T; ++t) std::copy(units.begin(), units.end(), idx.data<int32_t>() + t * k);
  return localize(backend_.upload(idx, DType::I32));
}

}  // namespace polar
