#include "sparse/random_sparsity.h"

#include "core/error.h"
#include "core/random.h"

namespace polar {

RandomSparsity::RandomSparsity(const Model& model, double density, uint64_t seed, Granularity granularity)
    : HeadSelector(model, density, granularity), seed_(seed) {}

Tensor RandomSparsity::attention_heads(int layer, const Tensor& h) {
  if (!selects(layer)) return Tensor();
  // Uniform scores per (token, unit), then the usual top-k: k distinct units, uniformly at random.
  const uint64_t stream = mix64(seed_ ^ mix64(static_cast<uint64_t>(layer) ^ mix64(calls_++)));
  return top(backend_.random_uniform(backend_.activation_dtype(), {h.dim(0), units()}, 0.0f, 1.0f, stream), 1, layer);
}

}  // namespace polar
