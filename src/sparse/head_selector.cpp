#include "sparse/head_selector.h"

#include <algorithm>
#include <cmath>

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

HeadSelector::HeadSelector(const Model& model, double density, Granularity granularity, TpHeads tp_heads,
                           const SelectionOptions& selection, const std::vector<UnitStats>* stats,
                           const std::string& source)
    : backend_(model.backend()),
      config_(model.config()),
      dims_(model.dims()),
      tp_size_(model.shard().size),
      density_(density),
      granularity_(granularity),
      tp_heads_(tp_size_ > 1 ? tp_heads : TpHeads::Global),
      selection_(selection) {
  check(density > 0 && density <= 1, "density {} is outside (0, 1]", density);
  const bool groups = granularity == Granularity::Group;
  units_ = groups ? config_.n_kv_heads : config_.n_heads;
  kept_ = std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(units_)));
  first_unit_ = groups ? dims_.kv_head0 : dims_.head0;
  own_units_ = groups ? dims_.kv_heads : dims_.heads;

  const bool calibrated = selection.schedule == DensitySchedule::Calibrated;
  check(selection.adaptive() || (selection.kmin == 1 && selection.kmax == 0),
        "--kmin and --kmax bound the threshold rules (--selection threshold or stat-topk); top-k keeps exactly k");
  if (!selection.adaptive() && !calibrated) {
    layer_kept_ = layer_units(DensitySchedule::Uniform, density, units_, config_.n_layers);
    return;
  }
  check(tp_heads_ == TpHeads::Global, "--tp-heads balanced takes top-k with a uniform schedule: each rank keeps "
                                      "ceil(k / N) of its own units");
  check(stats != nullptr && static_cast<int64_t>(stats->size()) == config_.n_layers,
        "{} records no selection statistics, which --selection {} --density-schedule {} needs (router files "
        "written before polar calibrate recorded them, and random routers, lack them): calibrate the routers again",
        source.empty() ? "the routers" : source, selection_rule_name(selection.rule),
        calibrated ? "calibrated" : "uniform");
  std::vector<std::vector<float>> coverage(stats->size());
  for (size_t l = 1; l < stats->size(); ++l) coverage[l] = (*stats)[l].coverage;
  layer_kept_ = layer_units(selection.schedule, density, units_, config_.n_layers, coverage);
  if (!selection.adaptive()) return;
  kmin_ = selection.kmin;
  kmax_ = selection.kmax ? selection.kmax : units_;
  check(kmin_ >= 1 && kmin_ <= kmax_ && kmax_ <= units_, "--kmin {} and --kmax {} must satisfy 1 <= kmin <= kmax <= {} ({})",
        selection.kmin, kmax_, units_, describe_units());
  cutoff_.assign(stats->size(), 0.0f);
  aim_.assign(stats->size(), 0.0);
  for (size_t l = 1; l < stats->size(); ++l) {
    // The share of its units a layer aims at: the density itself under a uniform schedule (a threshold need
    // not keep a whole number of units per token, so 0.5 of 3 groups is 1.5 on average, not top-k's 1), the
    // schedule's k / n under a calibrated one. It keeps a share p on average where p of the calibration's
    // scores (or z-scores) lie at or above the cutoff: quantile 1 - p. A layer aiming at every unit keeps all.
    aim_[l] = calibrated ? static_cast<double>(layer_kept_[l]) / static_cast<double>(units_) : density;
    const std::vector<float>& q = selection.rule == SelectionRule::Threshold ? (*stats)[l].score : (*stats)[l].z;
    cutoff_[l] = aim_[l] >= 1.0 ? -INFINITY : quantile_at(q, 1.0 - aim_[l]);
  }
  tally_ = backend_.upload(Tensor::zeros(DType::I32, {config_.n_layers, 2}), DType::I32);
}

std::string HeadSelector::describe_units() const {
  return config_.n_kv_heads == config_.n_heads ? "heads" : per_query_head() ? "query heads" : "KV groups";
}

std::string HeadSelector::describe() const {
  const std::string unit = describe_units();
  const bool calibrated = selection_.schedule == DensitySchedule::Calibrated;
  if (!selection_.adaptive() && !calibrated) return fmt::format("{} of {} {}", kept_, units_, unit);
  const auto [lo, hi] = std::minmax_element(layer_kept_.begin() + 1, layer_kept_.end());
  const std::string schedule =
      calibrated ? fmt::format("calibrated schedule: {}..{} of {} by layer", *lo, *hi, units_) : "uniform schedule";
  if (!selection_.adaptive())
    return fmt::format("{} of {} {} by layer (mean density {:.3g}, {})", *lo == *hi ? fmt::format("{}", *lo)
                       : fmt::format("{}..{}", *lo, *hi), units_, unit, mean_layer_density(), schedule);
  return fmt::format("{}: {}..{} of {} {} per token, aiming at a mean density of {:.3g} ({})",
                     selection_rule_name(selection_.rule), kmin_, kmax_, units_, unit, mean_layer_density(), schedule);
}

double HeadSelector::aim(int layer) const {
  return selection_.adaptive() ? aim_.at(static_cast<size_t>(layer))
                               : static_cast<double>(layer_kept(layer)) / static_cast<double>(units_);
}

double HeadSelector::mean_layer_density() const {
  double sum = 0;
  for (int l = 1; l < config_.n_layers; ++l) sum += aim(l);
  return config_.n_layers > 1 ? sum / static_cast<double>(config_.n_layers - 1) : 1.0;
}

std::optional<double> HeadSelector::density_reached() {
  if (!selection_.adaptive()) return mean_layer_density();
  if (!tallied_) return std::nullopt;
  const Tensor t = backend_.to_host_f32(tally_);
  const int32_t* p = t.data<int32_t>();
  double sum = 0;
  int64_t layers = 0;
  for (int64_t l = 1; l < config_.n_layers; ++l) {
    if (p[2 * l + 1] == 0) continue;
    sum += static_cast<double>(p[2 * l]) / (static_cast<double>(p[2 * l + 1]) * static_cast<double>(units_));
    ++layers;
  }
  if (layers == 0) return std::nullopt;
  return sum / static_cast<double>(layers);
}

void HeadSelector::begin_step(const Tensor& live_tokens, const Tensor& dense_tokens) {
  live_tokens_ = live_tokens;
  dense_tokens_ = dense_tokens;
}

Tensor HeadSelector::top(const Tensor& scores, int64_t pool, int layer) {
  Tensor idx = backend_.alloc(DType::I32, {scores.dim(0), width(layer)});
  if (!selection_.adaptive()) {
    backend_.route_heads(scores, pool, idx);
    return localize(idx);
  }
  Tensor tally = tally_.slice_rows(layer, layer + 1);
  HeadCutoff cutoff{.kmin = kmin_,
                    .value = cutoff_.at(static_cast<size_t>(layer)),
                    .row_stat = selection_.rule == SelectionRule::StatTopK,
                    .tally = &tally,
                    .live_rows = live_tokens_.defined() ? &live_tokens_ : nullptr,
                    .dense_rows = dense_tokens_.defined() ? &dense_tokens_ : nullptr};
  backend_.route_heads(scores, pool, idx, &cutoff);
  tallied_ = true;
  return localize(idx);
}

Tensor HeadSelector::localize(const Tensor& idx) const {
  if (tp_size_ == 1) return idx;
  Tensor own = backend_.alloc(DType::I32, {idx.dim(0), std::min(idx.dim(1), own_units_)});
  backend_.localize_indices(idx, first_unit_, own_units_, own);
  return own;
}

Tensor HeadSelector::top_own(const Tensor& scores, int64_t pool, int layer) const {
  const int64_t k = std::min(own_units_, (layer_kept(layer) + tp_size_ - 1) / tp_size_);
  Tensor idx = backend_.alloc(DType::I32, {scores.dim(0), k});
  backend_.route_heads(scores, pool, idx);
  return idx;
}

}  // namespace polar
