// Paged KV cache: per layer, K and V as [num_blocks, Hkv, block_size, dh] on the backend's device (head-major
// blocks: one KV head's rows of a block are one contiguous run; see KVLayer in ops/backend.h), and a
// host-side block allocator that gives each sequence the blocks it needs as it grows. Sequences of any
// length share the pool and can join or leave between steps. A tensor-parallel model's cache has one such
// store per rank (each holding the rank's KV heads) under one allocator: block tables are the same on every
// rank.
//
// Prefix caching: a full block whose positions were computed as a prompt can be published under its tokens
// and everything before them. When the sequences holding it leave, it stays cached (counted free, evicted
// least recently released first, a chain's tail before its head) until the allocator needs it, and a new
// sequence whose tokens start the same way attaches the cached blocks instead of recomputing them. Blocks
// are shared read-only: a sequence writes only positions past what it attached, which are in blocks of its
// own. The index is exact: a lookup compares the block's tokens and its parent block (by id and reuse
// generation), the 64-bit chain hash only finds candidates.
#pragma once
#include <cstdint>
#include <list>
#include <map>
#include <span>
#include <unordered_map>
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
  // Blocks a reserve can take: never used or released, and cached ones no sequence holds (evicted on demand).
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size() + evictable_.size()); }
  // Cached blocks (published, held or not).
  int64_t cached_blocks() const { return static_cast<int64_t>(index_.size()); }
  // A block no sequence ever owns: padding rows of a fixed-size (graph) batch write their K/V there.
  int32_t scratch_block() const { return static_cast<int32_t>(num_blocks_); }

  // Makes sure sequence `seq` owns enough blocks for n_tokens positions. Fails (polar::Error) when the pool
  // is exhausted, leaving the sequence's existing blocks untouched.
  void reserve(int64_t seq, int64_t n_tokens);
  // Gives the sequence's blocks back; published ones stay cached until a reserve needs them.
  void release(int64_t seq);
  // Prefix caching. attach_prefix: sequence `seq`, which must hold no blocks yet, takes the cached blocks that
  // hold the longest run of whole blocks of `tokens` (its positions 0, 1, ...); returns the positions
  // attached (a multiple of block_size). publish_prefix: `tokens` are the sequence's first tokens.size()
  // positions, all written: each whole block among them that is not published yet becomes cached. A block
  // identical to one already cached is not published twice (the sequence keeps its copy to itself).
  int64_t attach_prefix(int64_t seq, std::span<const int32_t> tokens);
  void publish_prefix(int64_t seq, std::span<const int32_t> tokens);
  // Forgets every cached prefix (blocks no sequence holds become free; held ones stay with their sequences).
  void drop_cached();
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
  // A block's prefix-cache state. refs: sequences holding it. A published block is in index_ under `key`,
  // the hash of its parent's key and its tokens; `parent` (-1 for a first block) with the generation it had
  // then identifies the block before it exactly; `generation` counts the block's reuses, so a child of a
  // block that was evicted and reused no longer matches.
  struct BlockState {
    int32_t refs = 0;
    bool published = false;
    uint64_t key = 0;
    int32_t parent = -1;
    uint64_t parent_generation = 0, generation = 0;
    std::vector<int32_t> tokens;
    std::list<int32_t>::iterator evictable;  // its place in evictable_, while published with refs 0
  };
  struct Owned {
    std::vector<int32_t> blocks;
    // The published chain so far: blocks [0, chained) are published (by it or another sequence); `last` is the
    // cached block at position chained - 1 (-1 before the first) and `key` its key.
    int64_t chained = 0;
    int32_t last = -1;
    uint64_t key = 0;
    std::vector<int32_t> pinned;  // other sequences' cached blocks its chain runs through (held, not written)
  };
  int32_t take_block();            // a block for a reserve: a free one, else the least recently released cached one
  // Drops a block from the index (it no longer matches anything) and from the evictable list.
  void unpublish(int32_t block);
  // The cached block that continues the chain ending at `last` (key `key`) with `tokens`, or -1.
  int32_t find_cached(uint64_t key, int32_t last, std::span<const int32_t> tokens) const;

  std::vector<int32_t> free_;
  std::vector<BlockState> state_;
  std::list<int32_t> evictable_;  // published blocks no sequence holds, least recently released first
  std::unordered_map<uint64_t, int32_t> index_;
  std::map<int64_t, Owned> owned_;
};

}  // namespace polar
