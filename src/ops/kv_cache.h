// Paged KV cache: per layer, K and V as [num_blocks, Hkv, block_size, dh] on the backend's device (head-major
// blocks: one KV head's rows of a block are one contiguous run; see KVLayer in ops/backend.h), and a
// host-side block allocator that gives each sequence the blocks it needs as it grows. Sequences of any
// length share the pool and can join or leave between steps. A tensor-parallel model's cache has one such
// store per rank (each holding the rank's KV heads) under one allocator: block tables are the same on every
// rank.
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "ops/backend.h"

namespace polar {

class KVCache {
 public:
  KVCache(Backend& backend, int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t num_blocks,
          int64_t block_size, DType dtype)
      : KVCache(std::vector<Backend*>{&backend}, n_layers, n_kv_heads, head_dim, num_blocks, block_size, dtype) {}
  // One store per backend (rank), each of n_kv_heads heads.
  KVCache(const std::vector<Backend*>& backends, int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
          int64_t num_blocks, int64_t block_size, DType dtype);

  std::vector<KVLayer>& layers(int rank = 0) { return layers_.at(static_cast<size_t>(rank)); }
  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  // A block no sequence ever owns: padding rows of a fixed-size (graph) batch write their K/V there.
  int32_t scratch_block() const { return static_cast<int32_t>(num_blocks_); }

  // Makes sure sequence `seq` owns enough blocks for n_tokens positions. Fails (polar::Error) when the pool
  // is exhausted, leaving the sequence's existing blocks untouched.
  void reserve(int64_t seq, int64_t n_tokens);
  void release(int64_t seq);
  // Fills every layer's K and V with uniform values in [-1, 1) (benchmarks time decode over a cache that
  // was never computed; see Engine::extend_uncomputed).
  void fill_random(uint64_t seed);
  const std::vector<int32_t>& blocks(int64_t seq) const;
  // Physical row of position p of sequence seq.
  int32_t slot(int64_t seq, int64_t p) const;

 private:
  std::vector<Backend*> backends_;
  std::vector<std::vector<KVLayer>> layers_;  // [rank][layer]
  int64_t num_blocks_, block_size_;
  std::vector<int32_t> free_;
  std::map<int64_t, std::vector<int32_t>> owned_;
};

}  // namespace polar
