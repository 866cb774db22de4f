#include "sparse/head_selector.h"

#include <algorithm>

#include <fmt/format.h>

namespace polar {

Granularity parse_granularity(const std::string& name) {
  if (name == "group") return Granularity::Group;
  if (name == "head") return Granularity::Head;
  fail("unknown granularity '{}': choose group (KV groups) or head (query heads)", name);
}

const char* granularity_name(Granularity g) { return g == Granularity::Group ? "group" : "head"; }

HeadSelector::HeadSelector(const Model& model, double density, Granularity granularity)
    : backend_(model.backend()), config_(model.config()), density_(density), granularity_(granularity) {
  check(density > 0 && density <= 1, "density {} is outside (0, 1]", density);
  units_ = granularity == Granularity::Group ? config_.n_kv_heads : config_.n_heads;
  kept_ = std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(units_)));
}

std::string HeadSelector::describe() const {
  const char* unit = config_.n_kv_heads == config_.n_heads ? "heads" : per_query_head() ? "query heads" : "KV groups";
  return fmt::format("{} of {} {}", kept_, units_, unit);
}

Tensor HeadSelector::top(const Tensor& scores, int64_t pool) const {
  Tensor idx = backend_.alloc(DType::I32, {scores.dim(0), kept_});
  backend_.route_heads(scores, pool, idx);
  return idx;
}

}  // namespace polar
