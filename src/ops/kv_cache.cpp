#include "ops/kv_cache.h"

#include <algorithm>

namespace polar {

namespace {

// The chain hash of a block: its parent's key and its tokens, through splitmix64's finaliser.
uint64_t mix(uint64_t h) {
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}
uint64_t chain_key(uint64_t parent_key, std::span<const int32_t> tokens) {
  uint64_t h = mix(parent_key + 0x9e3779b97f4a7c15ull);
  for (int32_t t : tokens) h = mix(h ^ static_cast<uint32_t>(t));
  return h;
}
constexpr uint64_t kRootKey = 0x706f6c6172ull;  // the key before a sequence's first block

}  // namespace

KVCache::KVCache(const std::vector<Backend*>& backends, int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                 int64_t num_blocks, int64_t block_size, DType dtype)
    : backends_(backends),
      layers_(backends.size()),
      num_blocks_(num_blocks),
      block_size_(block_size),
      state_(static_cast<size_t>(num_blocks)) {
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
  const int64_t have = it == owned_.end() ? 0 : static_cast<int64_t>(it->second.blocks.size());
  const int64_t need = (n_tokens + block_size_ - 1) / block_size_ - have;
  check(need <= free_blocks(), "KV cache exhausted: sequence {} needs {} more blocks of {} tokens, {} free of {}", seq,
        need, block_size_, free_blocks(), num_blocks_);
  std::vector<int32_t>& mine = it == owned_.end() ? owned_[seq].blocks : it->second.blocks;
  for (int64_t i = 0; i < need; ++i) mine.push_back(take_block());
}

int32_t KVCache::take_block() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {  // reserve checked free_blocks(): a cached block nobody holds is there
    b = evictable_.front();
    unpublish(b);
  }
  state_[static_cast<size_t>(b)].refs = 1;
  return b;
}

void KVCache::unpublish(int32_t block) {
  BlockState& st = state_[static_cast<size_t>(block)];
  if (!st.published) return;
  if (st.refs == 0) evictable_.erase(st.evictable);  // the caller puts it where it goes next
  auto it = index_.find(st.key);
  if (it != index_.end() && it->second == block) index_.erase(it);
  st.published = false;
  st.tokens.clear();
  ++st.generation;
}

int32_t KVCache::find_cached(uint64_t key, int32_t last, std::span<const int32_t> tokens) const {
  auto it = index_.find(key);
  if (it == index_.end()) return -1;
  const BlockState& st = state_[static_cast<size_t>(it->second)];
  const bool same_parent =
      st.parent == last && (last < 0 || st.parent_generation == state_[static_cast<size_t>(last)].generation);
  return same_parent && std::ranges::equal(st.tokens, tokens) ? it->second : -1;
}

int64_t KVCache::attach_prefix(int64_t seq, std::span<const int32_t> tokens) {
  check(!owned_.contains(seq) || owned_.at(seq).blocks.empty(),
        "KV cache: sequence {} already holds blocks; a prefix attaches to a new sequence", seq);
  Owned& o = owned_[seq];
  o.key = kRootKey;
  for (size_t at = 0; at + static_cast<size_t>(block_size_) <= tokens.size(); at += static_cast<size_t>(block_size_)) {
    const std::span<const int32_t> toks = tokens.subspan(at, static_cast<size_t>(block_size_));
    const uint64_t key = chain_key(o.key, toks);
    const int32_t b = find_cached(key, o.last, toks);
    if (b < 0) break;
    BlockState& st = state_[static_cast<size_t>(b)];
    if (st.refs++ == 0) evictable_.erase(st.evictable);
    o.blocks.push_back(b);
    o.key = key;
    o.last = b;
    ++o.chained;
  }
  return o.chained * block_size_;
}

void KVCache::publish_prefix(int64_t seq, std::span<const int32_t> tokens) {
  auto it = owned_.find(seq);
  check(it != owned_.end(), "KV cache: unknown sequence {}", seq);
  Owned& o = it->second;
  if (o.chained == 0) o.key = kRootKey;
  const int64_t whole = std::min<int64_t>(static_cast<int64_t>(tokens.size()) / block_size_,
                                          static_cast<int64_t>(o.blocks.size()));
  for (; o.chained < whole; ++o.chained) {
    const std::span<const int32_t> toks =
        tokens.subspan(static_cast<size_t>(o.chained * block_size_), static_cast<size_t>(block_size_));
    const uint64_t key = chain_key(o.key, toks);
    int32_t b = find_cached(key, o.last, toks);
    if (b >= 0 && b != o.blocks[static_cast<size_t>(o.chained)]) {
      // Another sequence's block has these tokens: the chain goes on through it (so that what this sequence
      // publishes next is found behind it), and the sequence holds it until it leaves, so that the block
      // cannot be evicted and reused under the chain's feet. Its own copy stays private.
      BlockState& st = state_[static_cast<size_t>(b)];
      if (st.refs++ == 0) evictable_.erase(st.evictable);
      o.pinned.push_back(b);
    } else if (b < 0) {  // new to the cache (a stale entry or a hash collision under the key gives way)
      auto other = index_.find(key);
      if (other != index_.end()) {
        const int32_t old = other->second;
        unpublish(old);
        if (state_[static_cast<size_t>(old)].refs == 0) free_.push_back(old);
      }
      b = o.blocks[static_cast<size_t>(o.chained)];
      BlockState& st = state_[static_cast<size_t>(b)];
      st.published = true;
      st.key = key;
      st.parent = o.last;
      st.parent_generation = o.last < 0 ? 0 : state_[static_cast<size_t>(o.last)].generation;
      st.tokens.assign(toks.begin(), toks.end());
      index_[key] = b;
    }
    o.key = key;
    o.last = b;
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
  // Last block first: a released chain's tail is evicted before its head, and free blocks are handed out
  // in the order the sequence had them.
  // The blocks it pinned (earlier in its chain than its own) after them.
  auto drop = [this](const std::vector<int32_t>& blocks) {
    for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
      BlockState& st = state_[static_cast<size_t>(*b)];
      if (--st.refs > 0) continue;
      if (st.published) {
        st.evictable = evictable_.insert(evictable_.end(), *b);
      } else {
        free_.push_back(*b);
      }
    }
  };
  drop(it->second.blocks);
  drop(it->second.pinned);
  owned_.erase(it);
}

void KVCache::drop_cached() {
  for (int32_t b = 0; b < static_cast<int32_t>(num_blocks_); ++b) {
    if (!state_[static_cast<size_t>(b)].published) continue;
    const bool held = state_[static_cast<size_t>(b)].refs > 0;
    unpublish(b);
    if (!held) free_.push_back(b);
  }
}

const std::vector<int32_t>& KVCache::blocks(int64_t seq) const {
  auto it = owned_.find(seq);
  check(it != owned_.end(), "KV cache: unknown sequence {}", seq);
  return it->second.blocks;
}

int32_t KVCache::slot(int64_t seq, int64_t p) const {
  const std::vector<int32_t>& b = blocks(seq);
  check(p / block_size_ < static_cast<int64_t>(b.size()), "KV cache: position {} of sequence {} is not reserved", p, seq);
  return static_cast<int32_t>(b[p / block_size_] * block_size_ + p % block_size_);
}

}  // namespace polar
