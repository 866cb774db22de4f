// Adaptive head selection (issue 19): how many units (KV groups or query heads) a token keeps at a layer.
//
// Rules (--selection): topk keeps exactly k per token (Polar Sparsity's rule); threshold keeps the units
// whose router score clears the layer's calibrated threshold; stat-topk keeps those above mean + c · std of
// the token's own unit scores (Spark Transformer's statistical top-k: no sort, one pass over the scores),
// with c calibrated per layer. Both threshold rules keep between kmin and kmax units (--kmin, --kmax), in a
// list of fixed width kmax padded with the unit count (backend.h: HeadCutoff), so CUDA graphs keep their
// shapes.
//
// Schedules (--density-schedule): uniform gives every layer 1..L-1 the same density (k = max(1,
// int(density · n)) of n units, today's behaviour); calibrated spreads the same mean over the layers by
// importance: each layer's coverage curve (routers.h: UnitStats) says how much of its attention-output
// energy its router's best k units carry, and units go, one at a time, to the layer where one more unit
// adds the most coverage.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "sparse/routers.h"

namespace polar {

enum class SelectionRule { TopK, Threshold, StatTopK };
// "topk", "threshold" or "stat-topk"; anything else is a polar::Error naming the choices.
SelectionRule parse_selection_rule(const std::string& name);
const char* selection_rule_name(SelectionRule rule);

enum class DensitySchedule { Uniform, Calibrated };
DensitySchedule parse_density_schedule(const std::string& name);

struct SelectionOptions {
  SelectionRule rule = SelectionRule::TopK;
  DensitySchedule schedule = DensitySchedule::Uniform;
  int64_t kmin = 1;  // threshold rules: the fewest units a token keeps (>= 1)
  int64_t kmax = 0;  // threshold rules: the most, the list's width; 0 = every unit
  bool adaptive() const { return rule != SelectionRule::TopK; }
};

// Units each layer keeps at mean density `density` (in (0, 1]) of `units` per layer: [layers], 0 at layer
// 0 (dense). Uniform: max(1, int(density · units)) everywhere. Calibrated (coverage[l] = UnitStats::coverage
// of layer l >= 1, [units + 1]): round(density · units · (layers - 1)) units in all (at least one a layer),
// each layer starting from one and the rest given one at a time to the layer whose coverage rises most
// with it (the lower layer on ties).
std::vector<int64_t> layer_units(DensitySchedule schedule, double density, int64_t units, int64_t layers,
                                 const std::vector<std::vector<float>>& coverage = {});

// Quantiles i / kSelectionQuantiles (i = 0..Q) of `values` (non-empty; sorted in place): the nearest
// rank, as UnitStats records them.
std::vector<float> quantile_table(std::vector<float>& values);
// Appends to `out` the n scores of one token standardised by their own mean and population std (all 0
// when they are equal): what statistical top-k compares with c.
void append_standardised(const float* scores, int64_t n, std::vector<float>& out);

// The value at share p in [0, 1] of a quantile table q[0..Q] (q[i] = quantile i / Q), linearly
// interpolated; p = 0 is the table's minimum.
float quantile_at(const std::vector<float>& q, double p);

// Statistics for statistical top-k on random routers (benchmarks), whose scores of a token's heads are
// roughly independent normals of one scale: per layer 1..L-1, the z quantiles of units that are the max of
// H / units such heads, for KV groups (Hkv units) and query heads (H units); no score quantiles or coverage
// (the threshold rule and the calibrated schedule have nothing to go by). Synthetic, from a fixed seed.
SelectionStats synthetic_stat_topk_stats(int64_t layers, int64_t heads, int64_t kv_heads);

}  // namespace polar
