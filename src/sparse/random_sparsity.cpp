#include "sparse/random_sparsity.h"

#include <algorithm>

#include "core/error.h"
#include "core/random.h"

namespace polar {

RandomSparsity::RandomSparsity(const Model& model, double density, uint64_t seed)
    : backend_(model.backend()), n_kv_heads_(model.config().n_kv_heads), seed_(seed) {
  check(density > 0 && density <= 1, "density {} is outside (0, 1]", density);
  kv_heads_kept_ = std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(n_kv_heads_)));
}

Tensor RandomSparsity::attention_heads(int layer, const Tensor& h) {
  if (layer == 0 || kv_heads_kept_ >= n_kv_heads_) return Tensor();
  // Uniform scores per (token, KV head), then the usual top-k: k distinct heads, uniformly at random.
  const int64_t T = h.dim(0);
  const uint64_t stream = mix64(seed_ ^ mix64(static_cast<uint64_t>(layer) ^ mix64(calls_++)));
  Tensor scores = backend_.random_uniform(backend_.activation_dtype(), {T, n_kv_heads_}, 0.0f, 1.0f, stream);
  Tensor idx = backend_.alloc(DType::I32, {T, kv_heads_kept_});
  backend_.route_heads(scores, 1, idx);
  return idx;
}

}  // namespace polar
