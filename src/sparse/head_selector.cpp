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

TpHeads parse_tp_heads(const std::string& name) {
  if (name == "global") return TpHeads::Global;
  if (name == "balanced") return TpHeads::Balanced;
  fail("unknown --tp-heads '{}': choose global (the selection of one rank alone) or balanced (k / N per rank)", name);
}

HeadSelector::HeadSelector(const Model& model, double density, Granularity granularity, TpHeads tp_heads)
    : backend_(model.backend()),
      config_(model.config()),
      dims_(model.dims()),
      tp_size_(model.shard().size),
      density_(density),
      granularity_(granularity),
      tp_heads_(tp_size_ > 1 ? tp_heads : TpHeads::Global) {
  check(density > 0 && density <= 1, "density {} is outside (0, 1]", density);
  const bool groups = granularity == Granularity::Group;
  units_ = groups ? config_.n_kv_heads : config_.n_heads;
  kept_ = std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(units_)));
  first_unit_ = groups ? dims_.kv_head0 : dims_.head0;
  own_units_ = groups ? dims_.kv_heads : dims_.heads;
}

std::string HeadSelector::describe() const {
  const char* unit = config_.n_kv_heads == config_.n_heads ? "heads" : per_query_head() ? "query heads" : "KV groups";
  return fmt::format("{} of {} {}", kept_, units_, unit);
}

Tensor HeadSelector::top(const Tensor& scores, int64_t pool) const {
  Tensor idx = backend_.alloc(DType::I32, {scores.dim(0), kept_});
  backend_.route_heads(scores, pool, idx);
  return localize(idx);
}

Tensor HeadSelector::localize(const Tensor& idx) const {
  if (tp_size_ == 1) return idx;
  Tensor own = backend_.alloc(DType::I32, {idx.dim(0), std::min(kept_, own_units_)});
  backend_.localize_indices(idx, first_unit_, own_units_, own);
  return own;
}

Tensor HeadSelector::top_own(const Tensor& scores, int64_t pool) const {
  const int64_t k = std::min(own_units_, (kept_ + tp_size_ - 1) / tp_size_);
  Tensor idx = backend_.alloc(DType::I32, {scores.dim(0), k});
  backend_.route_heads(scores, pool, idx);
  return idx;
}

}  // namespace polar
