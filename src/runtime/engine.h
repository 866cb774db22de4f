// Engine: runs a Model over a paged KV cache for many sequences at once. A step feeds each listed sequence
// its next chunk of tokens (a whole prompt at prefill, one token at decode, any mix in between) in one
// forward pass. Sequences join (add_sequence) and leave (remove_sequence) between steps.
//
// A tensor-parallel model (Model::ranks() > 1) runs the same way: every step's inputs go to each rank's
// device, the ranks' forward passes run concurrently on one thread each (their collectives synchronise
// them), each rank reads and writes its own KV heads under one block allocator, and the logits are rank 0's
// (every rank computes them in full: the lm_head is replicated).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "model/model.h"
#include "ops/kv_cache.h"
#include "runtime/rank_threads.h"

namespace polar {

struct EngineOptions {
  int64_t kv_tokens = 0;    // KV cache capacity in tokens over all sequences (rounded up to blocks)
  int64_t block_size = 16;  // tokens per KV block
  // Decode steps (one token per sequence) replay a graph captured per (batch bucket, context bucket) on
  // backends that support graphs; steps with a probe or while profiling always run op by op.
  bool graphs = true;
  // Sparse decoding: decode tokens (one-token chunks not marked prefill) consult it, in decode-only steps
  // and beside prefill chunks in mixed steps; prefill runs dense. Null = dense. Not owned. With a
  // tensor-parallel model, rank 0's, holding every rank's (Sparsity::rank).
  Sparsity* sparsity = nullptr;
};

struct SeqChunk {
  int64_t seq;
  std::span<const int32_t> tokens;
  // With EngineOptions::sparsity: tokens [sparse_from, end) of the chunk are processed as sparse decode
  // steps of each token alone would process them (each with its own head selection and MLP neuron set),
  // the earlier ones densely, all in one pass — how perplexity and evaluation score text with serving's
  // semantics. Unset: a decode step's single token is sparse, a longer chunk (a prompt) dense.
  std::optional<int64_t> sparse_from = std::nullopt;
  // With all_logits: the logit rows of this chunk start at its token logits_from (scoring needs only the
  // rows that predict a continuation; the rest would be computed and copied to the host for nothing).
  int64_t logits_from = 0;
  // A piece of a prompt: runs densely in a sparse engine even when it is a single token (an unmarked
  // one-token chunk is a decode token, and sparse). Longer chunks are prefill whatever this says.
  bool prefill = false;
};

class Engine {
 public:
  Engine(Model& model, EngineOptions options);

  const ModelConfig& config() const { return model_.config(); }
  int64_t add_sequence();
  void remove_sequence(int64_t seq);
  int64_t length(int64_t seq) const;  // tokens already in the cache
  // Prefix caching (KVCache): a new sequence starts with the cached K/V of the longest run of whole blocks of
  // `tokens`, and its length is that many tokens (returned); publish_prefix offers the whole blocks of its
  // first tokens.size() positions, which it has computed, to later sequences. Callers publish only positions
  // whose K/V any computation of the same tokens would give: prompts, which run dense, not the tokens of a
  // sparse decode step.
  int64_t attach_prefix(int64_t seq, std::span<const int32_t> tokens);
  void publish_prefix(int64_t seq, std::span<const int32_t> tokens);

  // One forward pass. Returns fp32 host logits: with all_logits, one row per fed token from each chunk's
  // logits_from on, in chunk order; otherwise one row per chunk (its last token). Token ids outside the
  // vocabulary, empty chunks, unknown sequences and sequences that would exceed the model's context or the
  // cache are polar::Errors, raised before anything is computed.
  Tensor step(const std::vector<SeqChunk>& chunks, bool all_logits, Probe* probe = nullptr);
  // Graphs captured so far (one per batch bucket and context bucket met).
  size_t graph_count() const { return graphs_.size(); }
  // The same step, leaving the logits on the backend's device in its activation dtype (valid until the
  // next step: a decode graph reuses its output buffer).
  Tensor forward(const std::vector<SeqChunk>& chunks, bool all_logits, Probe* probe = nullptr);
  int ranks() const { return threads_.ranks(); }
  // Benchmarks: grows sequence `seq` by n positions whose K/V are whatever the cache holds (random after
  // KVCache::fill_random), without computing them, so decode can be timed at any context quickly.
  void extend_uncomputed(int64_t seq, int64_t n);
  KVCache& cache() { return cache_; }

 private:
  // A decode step recorded for `batch` rows (the real sequences, then padding rows that write to the
  // cache's scratch block) and block tables `max_blocks` wide. Its inputs live in one I32 buffer that is
  // refilled before each replay: ids | positions | token_seq | slots | logit_rows [batch each],
  // seq_starts [batch + 1], block_tables [batch, max_blocks], live_tokens [1].
  // One per rank, each on its rank's device, recorded by all ranks at once (their collectives inside).
  struct DecodeGraph {
    Tensor inputs;  // I32 on the device
    StepInput in;   // views into inputs
    Tensor logits;  // [batch, vocab], written by the graph
    std::unique_ptr<Graph> graph;
  };
  Tensor decode_with_graph(const std::vector<SeqChunk>& chunks);
  // The inputs of a decode step over `chunks` padded to `batch` rows and tables `max_blocks` wide, as a
  // host I32 tensor.
  Tensor decode_inputs(int64_t batch, int64_t max_blocks, const std::vector<SeqChunk>& chunks) const;
  // Runs fn(r, rank r's model) on every rank at once (RankThreads), each thread on its rank's device. A
  // rank that fails aborts its communicator so that the others do not wait for it forever.
  void on_ranks(const std::function<void(int, Model&)>& fn);

  Model& model_;
  EngineOptions options_;
  KVCache cache_;
  RankThreads threads_;
  std::map<int64_t, int64_t> lengths_;
  int64_t next_seq_ = 0;
  std::map<std::pair<int64_t, int64_t>, std::vector<DecodeGraph>> graphs_;  // [rank] per bucket
};

}  // namespace polar
