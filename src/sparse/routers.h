// Polar routers of one model (polar-method.md §4) and their file.
//
// Per layer: an attention router Linear(d → H) with bias that scores the query heads from the attention
// block's normalised input (for GQA models the scores are max-pooled over each KV group at selection
// time), and for ReLU models an MLP router Linear(d → r) · Linear(r → D), no bias, no activation between.
// Layer 0 is always dense and carries no attention router. For ReLU models a per-layer, per-batch-size
// table says how many MLP neurons a decode step keeps.
//
// File: one safetensors file per model (`<name>.routers.safetensors`), fp32 tensors
//   layers.{l}.attn.weight [H, d], layers.{l}.attn.bias [H]   (l = 1 .. L-1)
//   layers.{l}.mlp.a [r, d], layers.{l}.mlp.b [D, r]          (l = 0 .. L-1, ReLU models)
//   layers.{l}.attn.head_share [H], layers.{l}.attn.group_share [Hkv]
//                                                              (l = 1 .. L-1; optional: all or none)
// and the metadata key "polar.routers" holding a JSON object:
//   {"format": 1, "model": FINGERPRINT, "granularity": "head"|"group", "head_density": X,
//    "attention_recall": [per layer, null where unmeasured], "mlp_rank": r,
//    "mlp_k": {"batch_sizes": [...], "k": [[per batch size] per layer], "recall": [[...] per layer]},
//    "selection": {"quantiles": Q, "layers": [null, {"group": STATS, "head": STATS} per layer 1..L-1]},
//    "source": "..."}
// ("mlp_rank" and "mlp_k" only for ReLU models; "selection" optional: files written before issue 19 and
// random routers have none), STATS = {"score": [Q + 1], "z": [Q + 1], "coverage": [units + 1]} (UnitStats).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/model_config.h"

namespace polar {

struct LayerRouters {
  Tensor attn_w;  // [H, d] fp32 host; undefined on layer 0
  Tensor attn_b;  // [H]
  Tensor mlp_a;   // [r, d]; undefined for models without a ReLU MLP
  Tensor mlp_b;   // [D, r]
  // Head importance measured in calibration, for --selector static (undefined on layer 0, and in files made
  // before calibration recorded it, or by random_routers): the share of calibration tokens for which each
  // query head, and each KV group, was among the true top int(head_density · n) of its n heads / groups by
  // attention-output norm (a group's norm: sqrt(Σ of its heads' norms²)), each in [0, 1].
  Tensor head_share;   // [H]
  Tensor group_share;  // [Hkv]
};

// What adaptive selection (issue 19: --selection threshold|stat-topk, --density-schedule calibrated) needs
// of a layer's trained attention router at one granularity, measured in calibration on its validation
// tokens. A unit's score is the router's, max-pooled over a KV group's heads for groups.
struct UnitStats {
  // Quantile i / Q (i = 0..Q) of the units' scores over tokens × units, non-decreasing: the threshold at
  // which a layer keeps a share p of its units on average is score quantile 1 - p.
  std::vector<float> score;
  // The same of each token's scores standardised by its own units' mean and (population) std: statistical
  // top-k's c for a share p is z quantile 1 - p.
  std::vector<float> z;
  // [units + 1]: the mean share of a token's attention-output energy (Σ of its units' squared output norms)
  // that the router's best k units carry, k = 0..units, non-decreasing in [0, 1]: the layer's importance
  // profile, from which the calibrated density schedule gives layers their units.
  std::vector<float> coverage;
};
// Quantiles recorded per UnitStats (Q).
constexpr int64_t kSelectionQuantiles = 100;
struct SelectionStats {
  std::vector<UnitStats> group, head;  // [layer]; empty on layer 0 (always dense)
};

// MLP neurons kept per layer and batch size (polar-method.md §4, "dynamic layer-wise top-k").
struct MlpKTable {
  std::vector<int64_t> batch_sizes;         // strictly ascending, >= 1
  std::vector<std::vector<int64_t>> k;      // [layer][batch size index], 1 <= k <= D
  std::vector<std::vector<double>> recall;  // [layer][batch size index] union recall reached in calibration
                                            // (NaN where unmeasured, e.g. random routers)
  // k for `batch` sequences: the entry of the smallest tabulated batch size >= batch (the largest one
  // beyond the table).
  int64_t k_for(int64_t layer, int64_t batch) const;
};

struct Routers {
  std::string fingerprint;          // model_fingerprint() of the model they belong to
  std::string granularity = "group";  // "head" (per query head) or "group" (per KV group; = head for MHA)
  double head_density = 0.5;        // the density the routers were trained / are recommended for
  std::vector<double> attn_recall;  // [layer] validation recall (NaN where unmeasured; layer 0 always NaN)
  int64_t mlp_rank = 0;             // r; 0 without MLP routers
  std::optional<MlpKTable> mlp_k;   // present exactly when there are MLP routers
  std::optional<SelectionStats> selection;  // adaptive selection's statistics (optional)
  std::string source;               // how they were made: "random, seed 7", a calibration summary, ...
  std::vector<LayerRouters> layers;  // [n_layers]
};

// Whether the routers carry the head importance of every layer 1..L-1 (what --selector static needs).
bool has_head_shares(const Routers& routers);

// Identifies a model for its routers: family and dimensions, plus (for real checkpoints) a checksum of
// some of its weights, so routers trained for another model, or another fine-tune of the same shape,
// are refused. Synthetic checkpoints are identified by their seed.
std::string model_fingerprint(const Checkpoint& ck);

// Routers of the right shapes with uniform random weights (benchmarks and tests). MLP routers (rank
// mlp_rank) only for ReLU models, with a k table over batch sizes 1, 2, 4, ..., 256 at the mean fractions
// of D the paper reports for OPT-6.7B (polar-method.md §4), rounded up to a multiple of 128 and capped at D.
Routers random_routers(const ModelConfig& config, const std::string& fingerprint, uint64_t seed,
                       int64_t mlp_rank = 1024);

// Writes the router file. A polar::Error when the file cannot be written.
void save_routers(const std::string& path, const Routers& routers);

// Reads and validates a router file against the model: the fingerprint, every tensor's presence and shape
// (the head shares of every layer 1..L-1 or of none, each a share in [0, 1]), the metadata (k table shape and ranges, densities in (0, 1], granularity) — anything wrong is a
// polar::Error that names the file and the problem.
Routers load_routers(const std::string& path, const ModelConfig& config, const std::string& fingerprint);

// Reads a router file without a model to check it against (`polar routers --show FILE`): the layer count
// comes from attention_recall, H and d from the first attention router, D from the first MLP router, and
// Hkv from the first group shares (where the file has them), every other check of load_routers applies; the fingerprint is taken as it stands.
Routers read_routers(const std::string& path);

// The "polar.routers" metadata object of `routers` (NaN recalls as null): what the file stores, and what
// `polar routers --show --json` prints.
nlohmann::json routers_metadata(const Routers& routers);

}  // namespace polar
