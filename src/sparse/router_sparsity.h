// Sparse decoding driven by a model's routers (polar-method.md §3): the Sparsity the model consults at
// each layer of a decode step.
//
// Attention: per token, scores = h · Wrᵀ + br over the query heads, max-pooled per KV group for GQA (or
// per query head with Granularity::Head), and the top k units are kept (head_selector.h). MLP (ReLU models with MLP routers): logits = (h · Aᵀ) · Bᵀ, one neuron
// set per step from Σ over the live rows of ReLU(logits), k from the router file's table for the step's
// batch (a captured batch's padded size, so k never depends on how full the bucket is); dense where
// k > 0.8 · D (polar-method.md §3.7). In a scored pass every sparse token gets its own set, the one a
// decode step of that token alone would keep (k for batch 1).
#pragma once
#include <algorithm>
#include <optional>
#include <vector>

#include "sparse/head_selector.h"
#include "sparse/routers.h"

namespace polar {

// The neurons an MLP keeps when k of D are asked for: k rounded up to a multiple of 8 (a superset), so the
// down projection's activations [batch, k] have 16-byte rows, which the CUDA gather GEMM streams with
// vector copies.
inline int64_t mlp_neurons_rounded(int64_t k, int64_t D) { return std::min(D, (k + 7) / 8 * 8); }

class RouterSparsity final : public HeadSelector {
 public:
  // Uploads the routers to the model's backend. density in (0, 1]. On a tensor-parallel rank the routers
  // are replicated (their input is), except with TpHeads::Balanced, where the rank keeps the attention
  // router's rows of its own query heads; the MLP neuron set is the whole model's (every rank computes the
  // same), of which the rank applies its own neurons.
  // selection: the rule and schedule (selection.h), which need routers.selection unless top-k with a
  // uniform schedule; `source` names the routers in errors (the file).
  RouterSparsity(const Model& model, const Routers& routers, double density,
                 Granularity granularity = Granularity::Group, TpHeads tp_heads = TpHeads::Global,
                 const SelectionOptions& selection = {}, const std::string& source = "");

  Tensor attention_heads(int layer, const Tensor& h) override;
  Tensor mlp_neurons(int layer, const Tensor& h, const StepLayout& layout) override;
  Tensor mlp_neurons_per_token(int layer, const Tensor& h, const Tensor* dense_tokens) override;

  // MLP neurons a step of `batch` rows keeps at `layer`: the k table's entry rounded up to a multiple of 8
  // (ffn when it runs dense).
  int64_t mlp_neurons_kept(int layer, int64_t batch) const;
  // Router weight bytes a step of `batch` rows reads at `layer` (the routers that run there).
  int64_t router_bytes(int layer, int64_t batch) const;

 private:
  // The MLP router's logits [T, D] for h [T, d].
  Tensor mlp_logits(int layer, const Tensor& h);
  // The rank's part of neuron sets idx [R, k] (whole-model ids): [R, min(k, its neurons)], padded with its
  // zero neuron (Model: opt.cpp); idx itself alone.
  Tensor own_neurons(const Tensor& idx) const;

  std::vector<Tensor> attn_w_, attn_b_, mlp_a_, mlp_b_;  // per layer, on the backend
  Tensor one_row_;  // [1] I32 = 1 on the backend: the live rows of a batch of one
  std::optional<MlpKTable> mlp_k_;
};

}  // namespace polar
