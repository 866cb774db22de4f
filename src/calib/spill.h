// Collection (polar calibrate, step 2): the model runs over the calibration sequences with a Probe, and
// what the routers are trained on is appended, layer by layer, to raw files in the work directory as it is
// produced, so memory stays bounded whatever the model and the token count. Per layer l and token (rows in
// the order of the sequences):
//   attn_in.{l}.f16     [N, d]          fp16  the router input, the attention block's normalised input
//                                             (layers 1..L-1, and layer 0 too for ReLU models)
//   head_norms.{l}.f32  [N, H]          fp32  each query head's attention-output L2 norm (layers 1..L-1)
//   mlp_act.{l}.bits    [N, ceil(D/8)]  bits  bit j % 8 of byte j / 8: MLP activation j > 0 (ReLU models)
// The MLP router is trained on `activation > 0` only, so a bit per neuron is all that is kept.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "model/model.h"

namespace polar::calib {

// Which files a model's collection has, and their row sizes.
struct SpillDims {
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, ffn = 0;
  bool mlp = false;  // a ReLU MLP: MLP routers are trained

  static SpillDims of(const ModelConfig& config);
  bool has_inputs(int64_t layer) const { return layer >= 1 || mlp; }  // some router of the layer reads them
  bool has_norms(int64_t layer) const { return layer >= 1; }        // layer 0 is always dense
  int64_t mask_bytes() const { return (ffn + 7) / 8; }
  // Bytes one token adds to the work directory over all layers.
  int64_t bytes_per_token() const;
};

enum class SpillKind { Inputs, Norms, Active };
std::string spill_path(const std::string& dir, SpillKind kind, int64_t layer);
// The files of a collection that exist in dir, for the caller to remove.
std::vector<std::string> spill_files(const std::string& dir, const SpillDims& dims);
// Whether every file of a collection of `tokens` rows exists in dir with its full size.
bool spill_complete(const std::string& dir, const SpillDims& dims, int64_t tokens);

// Runs the model over `sequences` (several per step, up to about 2048 tokens a step) with a probe that
// writes the files above into dir (created if missing; existing files are overwritten).
// progress(tokens_done, tokens_total) after each step. A router input beyond fp16's range, a file that
// cannot be written (disk full) or bad token ids are polar::Errors.
void collect(Model& model, const std::vector<std::vector<int32_t>>& sequences, const std::string& dir,
             const std::function<void(int64_t, int64_t)>& progress = {});

// One layer's collected arrays, memory-mapped (read a minibatch at a time: nothing is loaded whole).
class LayerSpill {
 public:
  // Maps the layer's files; one missing or of the wrong size for `tokens` rows is a polar::Error.
  LayerSpill(const std::string& dir, const SpillDims& dims, int64_t layer, int64_t tokens);
  int64_t tokens() const { return tokens_; }
  const SpillDims& dims() const { return dims_; }
  // Router inputs of `rows`, as fp32 [rows.size(), d].
  void inputs(std::span<const int64_t> rows, float* out) const;
  // Head norms [H] of one row.
  const float* norms(int64_t row) const;
  // MLP labels of `rows` (1 where the neuron is active, else 0), [rows.size(), D].
  void labels(std::span<const int64_t> rows, float* out) const;
  // The activity bitmask [ceil(D/8)] of one row.
  const uint8_t* active(int64_t row) const;

 private:
  SpillDims dims_;
  int64_t tokens_;
  std::shared_ptr<MappedFile> inputs_, norms_, active_;  // null where the layer has no such file
};

}  // namespace polar::calib
