#include "sparse/router_sparsity.h"

#include <algorithm>

namespace polar {

namespace {

// The routers' selection statistics at a granularity, where they have them.
const std::vector<UnitStats>* unit_stats(const Routers& routers, Granularity granularity) {
  if (!routers.selection) return nullptr;
  return granularity == Granularity::Group ? &routers.selection->group : &routers.selection->head;
}

}  // namespace

RouterSparsity::RouterSparsity(const Model& model, const Routers& routers, double density, Granularity granularity,
                               TpHeads tp_heads, const SelectionOptions& selection, const std::string& source)
    : HeadSelector(model, density, granularity, tp_heads, selection, unit_stats(routers, granularity), source),
      mlp_k_(routers.mlp_k) {
  check(static_cast<int64_t>(routers.layers.size()) == config_.n_layers, "routers for {} layers, the model has {}",
        routers.layers.size(), config_.n_layers);
  const DType dt = backend_.activation_dtype();
  auto up = [&](const Tensor& t) { return t.defined() ? backend_.upload(t, dt) : Tensor(); };
  const int64_t d = config_.hidden, H = config_.n_heads, D = config_.ffn;
  for (size_t i = 0; i < routers.layers.size(); ++i) {
    const LayerRouters& l = routers.layers[i];
    // Routers from a file are validated when read; these checks guard routers built in code.
    check(!l.attn_w.defined() || (l.attn_w.shape() == Shape{H, d} && l.attn_b.shape() == Shape{H}),
          "layer {}: attention router {} does not fit {} heads over {} inputs", i, shape_str(l.attn_w.shape()), H, d);
    check(!l.mlp_a.defined() || (l.mlp_a.dim(1) == d && l.mlp_b.shape() == Shape{D, l.mlp_a.dim(0)}),
          "layer {}: MLP router {} x {} does not fit d {} and {} neurons", i, shape_str(l.mlp_a.shape()),
          shape_str(l.mlp_b.shape()), d, D);
    // Balanced: the scores of the rank's own query heads only (rows [head0, head0 + heads)).
    auto own = [&](const Tensor& t) {
      return balanced() && t.defined() ? t.slice_rows(dims_.head0, dims_.head0 + dims_.heads) : t;
    };
    attn_w_.push_back(up(own(l.attn_w)));
    attn_b_.push_back(up(own(l.attn_b)));
    mlp_a_.push_back(up(l.mlp_a));
    mlp_b_.push_back(up(l.mlp_b));
  }
  Tensor one = Tensor::empty(DType::I32, {1});
  one.data<int32_t>()[0] = 1;
  one_row_ = backend_.upload(one, DType::I32);
}

Tensor RouterSparsity::attention_heads(int layer, const Tensor& h) {
  if (!selects(layer) || !attn_w_[layer].defined()) return Tensor();
  Tensor scores = backend_.alloc(backend_.activation_dtype(), {h.dim(0), attn_w_[layer].dim(0)});
  backend_.linear(h, attn_w_[layer], &attn_b_[layer], scores);
  if (balanced()) return top_own(scores, per_query_head() ? 1 : dims_.heads / dims_.kv_heads, layer);
  return top(scores, config_.n_heads / units(), layer);
}

int64_t RouterSparsity::mlp_neurons_kept(int layer, int64_t batch) const {
  if (!mlp_k_) return config_.ffn;
  const int64_t k = mlp_neurons_rounded(mlp_k_->k_for(layer, batch), config_.ffn);
  return 5 * k > 4 * config_.ffn ? config_.ffn : k;  // dense beyond 0.8 · D
}

int64_t RouterSparsity::router_bytes(int layer, int64_t batch) const {
  int64_t bytes = 0;
  if (selects(layer) && attn_w_[layer].defined())
    bytes += static_cast<int64_t>(attn_w_[layer].nbytes() + attn_b_[layer].nbytes());
  if (mlp_neurons_kept(layer, batch) < config_.ffn && mlp_a_[layer].defined())
    bytes += static_cast<int64_t>(mlp_a_[layer].nbytes() + mlp_b_[layer].nbytes());
  return bytes;
}

Tensor RouterSparsity::mlp_logits(int layer, const Tensor& h) {
  const DType dt = backend_.activation_dtype();
  Tensor low = backend_.alloc(dt, {h.dim(0), mlp_a_[layer].dim(0)});
  backend_.linear(h, mlp_a_[layer], nullptr, low);
  Tensor logits = backend_.alloc(dt, {h.dim(0), config_.ffn});
  backend_.linear(low, mlp_b_[layer], nullptr, logits);
  return logits;
}

Tensor RouterSparsity::mlp_neurons(int layer, const Tensor& h, const StepLayout& layout) {
  const int64_t k = mlp_neurons_kept(layer, h.dim(0));
  if (k == config_.ffn || !mlp_a_[layer].defined()) return Tensor();
  Tensor idx = backend_.alloc(DType::I32, {k});
  backend_.route_neurons(mlp_logits(layer, h), layout.live_tokens, idx);
  const Tensor own = own_neurons(idx.reshape({1, k}));
  return own.reshape({own.numel()});
}

Tensor RouterSparsity::own_neurons(const Tensor& idx) const {
  if (tp_size_ == 1) return idx;
  Tensor own = backend_.alloc(DType::I32, {idx.dim(0), std::min(idx.dim(1), dims_.ffn)});
  backend_.localize_indices(idx, dims_.ffn0, dims_.ffn, own);
  return own;
}

Tensor RouterSparsity::mlp_neurons_per_token(int layer, const Tensor& h, const Tensor* dense_tokens) {
  const int64_t T = h.dim(0), k = mlp_neurons_kept(layer, 1);
  if (k == config_.ffn || !mlp_a_[layer].defined()) return Tensor();
  const Tensor logits = mlp_logits(layer, h);
  const Tensor dense = dense_tokens ? backend_.to_host_f32(*dense_tokens) : Tensor();
  Tensor idx = backend_.alloc(DType::I32, {T, k});
  // One route_neurons per sparse token over its own row with one live row: exactly the op and the choice
  // of a decode step of that token alone, on every backend. T launches per layer is fine for scoring
  // (perplexity, evaluation); decode steps never come here.
  for (int64_t t = 0; t < T; ++t) {
    if (dense.defined() && dense.data<int32_t>()[t]) continue;
    Tensor row = idx.slice_rows(t, t + 1);
    backend_.route_neurons(logits.slice_rows(t, t + 1), one_row_, row);
  }
  return own_neurons(idx);
}

}  // namespace polar
