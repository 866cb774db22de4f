#include "ops/kv_cache.h"

namespace polar {

KVCache::KVCache(const std::vector<Backend*>& backends, int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                 int64_t num_blocks, int64_t block_size, DType dtype)
    : backends_(backends), layers_(backends.size()), num_blocks_(num_blocks), block_size_(block_size) {
  check(num_blocks > 0 && block_size > 0, "KV cache needs a positive block count and size");
  // One block more than asked for: the scratch block, owned by nobody (see scratch_block()).
  // Each rank's store is allocated with its device current (Backend::bind_thread), rank 0's left current.
  for (size_t r = backends.size(); r-- > 0;) {
    backends[r]->bind_thread();
    for (int64_t l = 0; l < n_layers; ++l)
      layers_[r].push_back({backends[r]->alloc(dtype, {num_blocks + 1, n_kv_heads, block_size, head_dim}),
                            backends[r]->alloc(dtype, {num_blocks + 1, n_kv_heads, block_size, head_dim})});
  }
  // Hand out low block ids first (pop from the back).
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

void KVCache::reserve(int64_t seq, int64_t n_tokens) {
  // Checked before owned_[seq] is touched: a failed reserve of a new sequence leaves no entry behind.
  auto it = owned_.find(seq);
  const int64_t have = it == owned_.end() ? 0 : static_cast<int64_t>(it->second.size());
  const int64_t need = (n_tokens + block_size_ - 1) / block_size_ - have;
  check(need <= free_blocks(), "KV cache exhausted: sequence {} needs {} more blocks of {} tokens, {} free of {}", seq,
        need, block_size_, free_blocks(), num_blocks_);
  std::vector<int32_t>& mine = it == owned_.end() ? owned_[seq] : it->second;
  for (int64_t i = 0; i < need; ++i) {
    mine.push_back(free_.back());
    free_.pop_back();
  }
}

void KVCache::fill_random(uint64_t seed) {
  for (size_t r = backends_.size(); r-- > 0;) {
    backends_[r]->bind_thread();
    for (KVLayer& l : layers_[r]) {
      l.k = backends_[r]->random_uniform(l.k.dtype(), l.k.shape(), -1.0f, 1.0f, seed++);
      l.v = backends_[r]->random_uniform(l.v.dtype(), l.v.shape(), -1.0f, 1.0f, seed++);
    }
  }
}

void KVCache::release(int64_t seq) {
  auto it = owned_.find(seq);
  if (it == owned_.end()) return;
  free_.insert(free_.end(), it->second.rbegin(), it->second.rend());
  owned_.erase(it);
}

const std::vector<int32_t>& KVCache::blocks(int64_t seq) const {
  auto it = owned_.find(seq);
  check(it != owned_.end(), "KV cache: unknown sequence {}", seq);
  return it->second;
}

int32_t KVCache::slot(int64_t seq, int64_t p) const {
  const std::vector<int32_t>& b = blocks(seq);
  check(p / block_size_ < static_cast<int64_t>(b.size()), "KV cache: position {} of sequence {} is not reserved", p, seq);
  return static_cast<int32_t>(b[p / block_size_] * block_size_ + p % block_size_);
}

}  // namespace polar
