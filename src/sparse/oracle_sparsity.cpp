#include "sparse/oracle_sparsity.h"

namespace polar {

Tensor OracleSparsity::heads_from_attention(int layer, const Tensor& attn) {
  if (!selects(layer)) return Tensor();
  // A unit's output rows (its query heads' dh values each) are contiguous in attn [T, H, dh].
  const int64_t T = attn.dim(0), width = config_.n_heads / units() * attn.dim(2);
  Tensor norms = backend_.alloc(backend_.activation_dtype(), {T * units()});
  backend_.l2_norms(attn.reshape({T * units(), width}), norms);
  return top(norms.reshape({T, units()}), 1, layer);
}

}  // namespace polar
