#include "sparse/selection.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"

namespace polar {

SelectionRule parse_selection_rule(const std::string& name) {
  if (name == "topk") return SelectionRule::TopK;
  if (name == "threshold") return SelectionRule::Threshold;
  if (name == "stat-topk") return SelectionRule::StatTopK;
  fail("unknown selection rule '{}': choose topk, threshold or stat-topk", name);
}

const char* selection_rule_name(SelectionRule rule) {
  switch (rule) {
    case SelectionRule::TopK: return "topk";
    case SelectionRule::Threshold: return "threshold";
    case SelectionRule::StatTopK: return "stat-topk";
  }
  return "?";
}

DensitySchedule parse_density_schedule(const std::string& name) {
  if (name == "uniform") return DensitySchedule::Uniform;
  if (name == "calibrated") return DensitySchedule::Calibrated;
  fail("unknown density schedule '{}': choose uniform or calibrated", name);
}

std::vector<int64_t> layer_units(DensitySchedule schedule, double density, int64_t units, int64_t layers,
                                 const std::vector<std::vector<float>>& coverage) {
  check(density > 0 && density <= 1 && units >= 1 && layers >= 1, "density {} of {} units over {} layers", density,
        units, layers);
  std::vector<int64_t> k(static_cast<size_t>(layers), 0);
  if (schedule == DensitySchedule::Uniform) {
    std::fill(k.begin() + 1, k.end(), std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(units))));
    return k;
  }
  check(static_cast<int64_t>(coverage.size()) == layers, "calibrated schedule: coverage of {} layers for {}",
        coverage.size(), layers);
  for (int64_t l = 1; l < layers; ++l)
    check(static_cast<int64_t>(coverage[size_t(l)].size()) == units + 1,
          "calibrated schedule: layer {} has a coverage curve of {} points for {} units", l, coverage[size_t(l)].size(),
          units);
  const int64_t sparse_layers = layers - 1;
  int64_t budget = std::llround(density * static_cast<double>(units * sparse_layers));
  budget = std::clamp(budget, sparse_layers, units * sparse_layers);
  std::fill(k.begin() + 1, k.end(), 1);
  for (int64_t given = sparse_layers; given < budget; ++given) {
    int64_t best = -1;
    float best_gain = 0;
    for (int64_t l = 1; l < layers; ++l) {
      const int64_t at = k[size_t(l)];
      if (at >= units) continue;
      const float gain = coverage[size_t(l)][size_t(at + 1)] - coverage[size_t(l)][size_t(at)];
      if (best < 0 || gain > best_gain) best = l, best_gain = gain;
    }
    ++k[size_t(best)];
  }
  return k;
}

float quantile_at(const std::vector<float>& q, double p) {
  check(q.size() >= 2, "a quantile table needs at least 2 points, not {}", q.size());
  const double x = std::clamp(p, 0.0, 1.0) * static_cast<double>(q.size() - 1);
  const size_t i = std::min(static_cast<size_t>(x), q.size() - 2);
  const double f = x - static_cast<double>(i);
  return static_cast<float>(q[i] + f * (q[i + 1] - q[i]));
}

std::vector<float> quantile_table(std::vector<float>& values) {
  check(!values.empty(), "quantiles of no values");
  std::sort(values.begin(), values.end());
  std::vector<float> q(static_cast<size_t>(kSelectionQuantiles + 1));
  for (int64_t i = 0; i <= kSelectionQuantiles; ++i)
    q[size_t(i)] = values[static_cast<size_t>(std::llround(double(i) / kSelectionQuantiles * double(values.size() - 1)))];
  return q;
}

void append_standardised(const float* scores, int64_t n, std::vector<float>& out) {
  double sum = 0, ss = 0;
  for (int64_t i = 0; i < n; ++i) sum += scores[i];
  const double mean = sum / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) ss += (scores[i] - mean) * (scores[i] - mean);
  const double sd = std::sqrt(ss / static_cast<double>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(static_cast<float>(sd > 0 ? (scores[i] - mean) / sd : 0.0));
}

namespace {

// z quantiles of `units` units a token, each the max of `group` independent standard normals.
std::vector<float> normal_z_quantiles(int64_t units, int64_t group) {
  // 2^16 values are enough for percentiles to about 0.01 of a standard deviation.
  const int64_t tokens = std::max<int64_t>(1, (int64_t(1) << 16) / units);
  std::mt19937_64 rng(0x5eed);
  std::normal_distribution<float> normal;
  std::vector<float> row(static_cast<size_t>(units)), z;
  z.reserve(static_cast<size_t>(tokens * units));
  for (int64_t t = 0; t < tokens; ++t) {
    for (float& u : row) {
      u = -INFINITY;
      for (int64_t j = 0; j < group; ++j) u = std::max(u, normal(rng));
    }
    append_standardised(row.data(), units, z);
  }
  return quantile_table(z);
}

}  // namespace

SelectionStats synthetic_stat_topk_stats(int64_t layers, int64_t heads, int64_t kv_heads) {
  check(layers >= 1 && kv_heads >= 1 && heads % kv_heads == 0, "{} heads in {} KV groups", heads, kv_heads);
  SelectionStats s;
  s.group.resize(static_cast<size_t>(layers));
  s.head.resize(static_cast<size_t>(layers));
  const std::vector<float> group_z = normal_z_quantiles(kv_heads, heads / kv_heads), head_z = normal_z_quantiles(heads, 1);
  for (size_t l = 1; l < static_cast<size_t>(layers); ++l) {
    s.group[l].z = group_z;
    s.head[l].z = head_z;
  }
  return s;
}

}  // namespace polar
