// polar calibrate (issue 5): a model's routers trained from its own activations (polar-method.md §4).
// Phases: collection (spill.h) → per-layer training (train.h) and, for ReLU models, the MLP k table
// (k_table.h) → the router file (sparse/routers.h).
//
// Resumable: everything lives in a work directory. state.json (written atomically, by rename) records what
// the collection was made from and whether it completed; each trained layer is kept in layer.{l}.safetensors
// (written before the state lists it). A run restarted with the same model, tokens and options skips a
// complete collection and the layers already trained, and produces the byte-identical router file: every
// layer depends only on its own spilled arrays and the seed. A work directory holding another model's or
// another text's collection is refused; one trained with other training options keeps its collection and
// retrains every layer.
//
// Memory: collection holds the model, one step of up to ~2048 tokens (its KV cache, 2·L·2048·d values, and
// activations) and a write buffer per file;
// training holds one layer's routers five times over (weights, gradients, two AdamW moments, the best
// epoch's copy), one minibatch and one validation chunk of 256 rows; the spilled arrays are memory-mapped
// and read a minibatch at a time.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "calib/k_table.h"
#include "calib/spill.h"
#include "calib/train.h"
#include "sparse/routers.h"

namespace polar::calib {

struct CalibrationOptions {
  std::string work_dir;
  uint64_t seed = 0;
  int64_t mlp_rank = 1024;  // ReLU models only
  TrainOptions train;
  KTableOptions k_table;
  std::string data;  // what the tokens were read from (file names), for the router file's "source"
};

// Progress reports (any may be empty).
struct CalibrationProgress {
  std::function<void(int64_t, int64_t)> collected;  // (tokens done, tokens total) after each collection step
  // (layer, "attention" or "mlp", epoch from 1, validation recall or F1) after each epoch
  std::function<void(int64_t, const char*, int64_t, double)> epoch;
  std::function<void(const std::string&)> note;  // what resuming reused or discarded
};

// One layer's outcome.
struct LayerResult {
  AttentionRouter attn;  // w empty on layer 0 (always dense)
  // top_share of the layer's query heads [H] and KV groups [Hkv] over every collected token at the
  // training head density (the static selector's ranking); empty on layer 0
  std::vector<float> head_share, group_share;
  // adaptive selection's statistics of the trained router on the validation tokens, per KV group and per
  // query head (sparse/routers.h); empty on layer 0
  UnitStats group_stats, head_stats;
  MlpRouter mlp;         // rank 0 without a ReLU MLP
  KRow k;                // empty without a ReLU MLP
};

class Calibration {
 public:
  // Opens (creating it if needed) the work directory for `model` (whose fingerprint is given) calibrated on
  // `sequences`. Fails when the directory holds another calibration's collection or a corrupt state, when a
  // sequence is longer than the model's context, when there are too few tokens for the split or the k
  // table, or when the model has nothing to calibrate (one layer and a gated MLP).
  Calibration(Model& model, std::string fingerprint, std::vector<std::vector<int32_t>> sequences,
              CalibrationOptions options, CalibrationProgress progress = {});

  int64_t tokens() const { return tokens_; }
  double head_density() const { return options_.train.head_density; }
  const SpillDims& dims() const { return dims_; }
  // Disk the collection takes in the work directory.
  int64_t spill_bytes() const { return tokens_ * dims_.bytes_per_token(); }
  // Host memory the training of one layer holds (the larger of its two routers' needs).
  int64_t training_bytes() const;

  bool collected() const { return collected_; }
  // Runs the collection unless a complete one is recorded; fails early when the disk lacks room for it.
  void collect();
  bool trained(int64_t layer) const { return done_.at(static_cast<size_t>(layer)); }
  // Trains layer `layer`'s routers (and its k table row) unless already done; needs the collection.
  void train_layer(int64_t layer);
  const LayerResult& layer(int64_t layer) const;  // a trained layer's outcome
  // The routers of every (trained) layer, as the router file stores them.
  Routers routers() const;
  // Removes the files this calibration wrote to the work directory (and the directory when that leaves it
  // empty).
  void remove_work_files() const;

 private:
  // Takes over what the work directory's state records, as far as it matches this calibration.
  void resume(const nlohmann::json& state);
  std::string path(const std::string& name) const;
  std::string layer_path(int64_t layer) const;
  void write_state() const;
  LayerResult read_layer(int64_t layer) const;
  void write_layer(int64_t layer, const LayerResult& r) const;

  Model& model_;
  std::string fingerprint_;
  std::vector<std::vector<int32_t>> sequences_;
  CalibrationOptions options_;
  CalibrationProgress progress_;
  SpillDims dims_;
  int64_t tokens_ = 0;
  nlohmann::json collection_key_, training_key_;
  bool collected_ = false;
  std::vector<bool> done_;
  std::vector<LayerResult> results_;
};

}  // namespace polar::calib
