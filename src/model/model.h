// A loaded model on a backend. Architectures are written once over the ops interface (backend.h): one
// file per family (opt.cpp, llama.cpp), chosen by ModelConfig::family.
#pragma once
#include <memory>
#include <vector>

#include "io/checkpoint.h"
#include "ops/backend.h"
#include "ops/communicator.h"

namespace polar {

// Tensor parallelism (docs/parallel.md): which rank of how many a model is, and how the ranks talk.
struct TpShard {
  int rank = 0;
  int size = 1;
  Communicator* comm = nullptr;  // null: no collectives (a model alone)
};

// A rank's share of the model (Megatron-style): query heads [head0, head0 + heads) and the KV heads they read,
// [kv_head0, kv_head0 + kv_heads); MLP neurons [ffn0, ffn0 + ffn). Each rank holds H / N query heads; with
// Hkv >= N it holds Hkv / N whole KV groups, with Hkv < N one KV head, shared by N / Hkv ranks that each
// hold part of its query heads (the KV head is replicated, so every rank owns at least one).
struct ShardDims {
  int64_t heads, head0, kv_heads, kv_head0, ffn, ffn0;
};
// Rank `rank` of `size`; a size that does not split the heads or the MLP evenly is a polar::Error naming
// the sizes that do.
ShardDims shard_dims(const ModelConfig& c, int rank, int size);
// The tensor-parallel sizes up to `up_to` that split c evenly.
std::vector<int> tp_sizes(const ModelConfig& c, int up_to);

// Observes internal activations during a forward pass (calibration, tests). Tensors are fp32 on the host,
// one row per token of the step, valid only during the call.
class Probe {
 public:
  virtual ~Probe() = default;
  // transformers' output_hidden_states: 0 = embeddings (after positions / projection), i = output of layer
  // i - 1 for i < n_layers, n_layers = final output after the last norm (and OPT's project_out).
  virtual void hidden(int index, const Tensor& x) { (void)index, (void)x; }
  virtual void attn_in(int layer, const Tensor& x) { (void)layer, (void)x; }   // [T, d] input of q_proj
  virtual void head_norms(int layer, const Tensor& n) { (void)layer, (void)n; }  // [T, H] L2 over dh
  virtual void mlp_act(int layer, const Tensor& a) { (void)layer, (void)a; }   // [T, ffn] input of down proj
};

// Contextual sparsity of a decode step (polar-method.md §3), asked for by the model at two fixed points of
// each layer; sparse/ implements it with routers. In a prefill step every token gets its own selection,
// which is what processing those tokens one decode step at a time would have done. Returned index tensors live on the backend and keep
// the same shape for a given batch, so a sparse step can be captured in a graph like a dense one.
//
// Under tensor parallelism every rank has its own Sparsity, bound to its rank's model; selections are then
// in the rank's own numbering (its KV heads, query heads or MLP neurons from 0), padded to a fixed length
// where the rank owns fewer of the chosen units than the list holds (Backend::localize_indices).
class Sparsity {
 public:
  virtual ~Sparsity() = default;
  // Rank 0's object stands for the group and owns the other ranks' (the Engine asks rank(r) for rank r's).
  Sparsity& rank(int r) { return r == 0 ? *this : *peers_.at(static_cast<size_t>(r - 1)); }
  // Called by the model before a step's layers: the rows whose selections the step uses are tokens
  // [0, live_tokens[0]) (I32 [1]; undefined: all) not flagged in dense_tokens (I32 [T]; undefined: none).
  // Device tensors that a captured graph refills, so a selector may hand them to its ops (the density an
  // adaptive selector reaches is tallied over those rows).
  virtual void begin_step(const Tensor& live_tokens, const Tensor& dense_tokens) { (void)live_tokens, (void)dense_tokens; }
  int ranks() const { return 1 + static_cast<int>(peers_.size()); }
  void add_rank(std::unique_ptr<Sparsity> next) { peers_.push_back(std::move(next)); }
  // The KV heads (KV groups for GQA, heads for MHA) each token attends to, in ascending order: [T, k] I32,
  // chosen from h [T, d], the attention block's normalised input; undefined = all (a dense layer), or a
  // choice left to heads_from_attention. With per_query_head(), query heads instead.
  virtual Tensor attention_heads(int layer, const Tensor& h) = 0;
  // Whether the selections name query heads rather than KV heads (per-query-head selection in GQA models,
  // for accuracy comparisons): attention then runs over every KV head, which saves no KV reads, and the
  // unselected query heads' outputs are zeroed.
  virtual bool per_query_head() const { return false; }
  // Selections that need the layer's dense attention output (the oracle): called after attention with attn
  // [T, H, dh] when attention_heads gave none; the heads to keep, as attention_heads returns them, or
  // undefined = all. The unselected heads' outputs are then zeroed.
  virtual Tensor heads_from_attention(int layer, const Tensor& attn) {
    (void)layer, (void)attn;
    return Tensor();
  }
  // The ReLU MLP neurons the whole step keeps, ascending: [k] I32, chosen from the same h (so it can run
  // beside attention); undefined = all. Only rows [0, layout.live_tokens) may influence the choice. Asked
  // in decode batches; scored passes ask mlp_neurons_per_token.
  virtual Tensor mlp_neurons(int layer, const Tensor& h, const StepLayout& layout) = 0;
  // Scored passes (StepInput::scored()): per token, the neurons the decode step processing that token alone
  // (a batch of one) would keep: [T, k] I32, each row ascending; undefined = all, for every token. Rows of
  // tokens flagged in dense_tokens ([T] I32, optional) are left unwritten: those tokens run densely.
  virtual Tensor mlp_neurons_per_token(int layer, const Tensor& h, const Tensor* dense_tokens) {
    (void)layer, (void)h, (void)dense_tokens;
    return Tensor();
  }

 private:
  std::vector<std::unique_ptr<Sparsity>> peers_;  // ranks 1..N-1 (rank 0 only)
};

// One forward step over T tokens from S sequences.
struct StepInput {
  Tensor ids;        // [T] I32 on the backend
  StepLayout layout;
  Tensor logit_rows;  // [R] I32 on the backend: rows of T whose logits are wanted
  Sparsity* sparsity = nullptr;  // set for sparse steps; dense steps leave it null
  // [T] I32, with sparsity: tokens flagged 1 run densely (a prompt before tokens scored as sparse decode
  // steps, or the prefill chunks of a mixed step). Undefined: every token of a sparse step is sparse.
  Tensor dense_tokens;
  // A mixed serving step (decode tokens beside prefill chunks): its first mixed_decode_tokens tokens are
  // decode tokens, processed as a decode-only step over them would (each its own heads, one MLP neuron set
  // chosen over them all); the others, flagged in dense_tokens, run densely. 0: not a mixed step.
  int64_t mixed_decode_tokens = 0;
  // A scored pass (perplexity, evaluation): each sparse token is processed as the decode step that would
  // process it alone, rather than the step's tokens as one decode batch (which shares one MLP neuron set).
  bool scored() const { return mixed_decode_tokens == 0 && (dense_tokens.defined() || layout.max_chunk > 1); }
};

class Model {
 public:
  virtual ~Model() = default;
  const ModelConfig& config() const { return config_; }  // the whole model's, on every rank
  Backend& backend() const { return backend_; }
  const TpShard& shard() const { return shard_; }
  const ShardDims& dims() const { return dims_; }  // this rank's heads and neurons (all of them alone)
  // Under tensor parallelism rank 0's model stands for the group (the Engine drives every rank through it)
  // and owns the others: rank(r) is rank r's model, on its own backend.
  int ranks() const { return shard_.size; }
  Model& rank(int r) { return r == 0 ? *this : *peers_.at(static_cast<size_t>(r - 1)); }
  // Logits [R, vocab] for the requested rows; K/V of every token are appended to the cache.
  virtual Tensor forward(const StepInput& in, std::vector<KVLayer>& cache, Probe* probe) = 0;
  // Bytes of weights resident on the device, and the part a decode step must read in full (everything
  // but tables that are only gathered by row: an untied token embedding, OPT's positions).
  int64_t weight_bytes() const { return weight_bytes_; }
  int64_t step_weight_bytes() const { return weight_bytes_ - gathered_bytes_; }
  // Bytes this rank's KV cache holds per token: every layer's K and V rows of the rank's KV heads, in the
  // activation dtype. Under tensor parallelism every rank holds as many KV heads, a replicated one on each
  // of the ranks that share it, so a group of N ranks holds N times this.
  int64_t kv_bytes_per_token() const {
    return config_.n_layers * 2 * dims_.kv_heads * config_.head_dim *
           static_cast<int64_t>(dtype_size(backend_.activation_dtype()));
  }

 protected:
  Model(const ModelConfig& config, Backend& backend, TpShard shard)
      : config_(config), backend_(backend), shard_(shard), dims_(shard_dims(config, shard.rank, shard.size)) {}
  friend std::unique_ptr<Model> make_model(const Checkpoint&, const std::vector<Backend*>&,
                                           const std::vector<Communicator*>&);
  // Uploads checkpoint tensor `name` (which must have `shape`) in the backend's dtype, counting its bytes.
  Tensor load_weight(const Checkpoint& ck, const std::string& name, const Shape& shape) {
    return load_stacked(ck, {{name, shape}});
  }
  Tensor load_weight_if(bool present, const Checkpoint& ck, const std::string& name, const Shape& shape) {
    return present ? load_weight(ck, name, shape) : Tensor();
  }
  // Checkpoint tensors stacked along dim 0 into one weight (their other dims must agree): projections that
  // read the same input (q/k/v, gate/up) then run as one GEMM, which streams its weights closer to the
  // memory bandwidth than three narrow ones at decode batch sizes. Under tensor parallelism each part is
  // the rank's slice of its tensor, rows (column-parallel) or columns (row-parallel), cut from the host
  // copy, so no device ever holds more than its shard.
  struct Range {
    int64_t begin, count;  // count -1: to the end
  };
  static constexpr Range kAll{0, -1};
  struct Part {
    std::string name;  // empty: zero rows of `shape` (the zero MLP neuron of a tensor-parallel rank)
    Shape shape;       // the checkpoint tensor's
    Range rows = kAll, cols = kAll;  // the slice uploaded (cols: of a 2-D tensor)
  };
  Tensor load_stacked(const Checkpoint& ck, const std::vector<Part>& parts);
  Tensor load_stacked_if(bool present, const Checkpoint& ck, const std::vector<Part>& parts) {
    return present ? load_stacked(ck, parts) : Tensor();
  }
  // Checkpoint tensor `name` [n, k], its columns `cols`, uploaded transposed, as [cols, n] (a down-projection
  // stored neuron-major), with zero_rows rows of zeros after them.
  Tensor load_transposed(const Checkpoint& ck, const std::string& name, const Shape& shape, Range cols = kAll,
                         int64_t zero_rows = 0);
  // Row-parallel projections (o_proj, down) write rank 0's partial product over the residual x (with the
  // bias: added once) and the other ranks' alone; reduce() then sums them, leaving x + Σ_r partial_r on
  // every rank. Alone, the projection accumulates and reduce() does nothing. (OPT; Llama's projections write a
  // buffer of their own, summed by reduce() and added to x by the next norm, add_rms_norm.)
  bool accumulates() const { return shard_.rank == 0; }
  void reduce(Tensor& x) const {
    if (shard_.comm) shard_.comm->all_reduce_sum(x);
  }
  // Reports per-head L2 norms of attn [T, H, dh] to the probe.
  void report_head_norms(Probe* probe, int layer, const Tensor& attn) const;
  // attn [T, H, dh] = attention of q over the layer's cache for the step, under its sparsity: KV-head
  // selections made before (heads, from attention_heads) go to the attention op, which reads only their
  // cache; per-query-head selections and those made from the output (heads_from_attention) zero the
  // unselected heads of a dense attention.
  void attend(int layer, const StepInput& in, const Tensor& heads, const Tensor& q, const KVLayer& cache, float scale,
              int64_t window, Tensor& attn) const;
  // y (+)= attn [T, H, dh] · woᵀ (+ bo), the output projection of what attend() left in attn. After selective
  // attention (its unselected KV groups' rows are zero) the backend may read only the selected groups'
  // columns of wo (linear_selected_inputs).
  void project_attention(const StepInput& in, const Tensor& heads, const Tensor& attn, const Tensor& wo,
                         const Tensor* bo, Tensor& y, bool accumulate = false) const;
  ModelConfig config_;
  Backend& backend_;
  TpShard shard_;
  ShardDims dims_;
  int64_t weight_bytes_ = 0;
  int64_t gathered_bytes_ = 0;

 private:
  std::vector<std::unique_ptr<Model>> peers_;  // ranks 1..N-1 (rank 0 only)
};

std::unique_ptr<Model> make_opt(const Checkpoint& ck, Backend& backend, TpShard shard);
std::unique_ptr<Model> make_llama(const Checkpoint& ck, Backend& backend, TpShard shard);
// Builds the family's model, validating every tensor's shape against the config.
std::unique_ptr<Model> make_model(const Checkpoint& ck, Backend& backend);
// The model split over backends.size() ranks, rank r on backends[r] talking through comms[r] (one of
// make_communicators' group; empty with one backend: no collectives). Returns rank 0, which owns the others
// (Model::rank); the backends and communicators must outlive it.
std::unique_ptr<Model> make_model(const Checkpoint& ck, const std::vector<Backend*>& backends,
                                  const std::vector<Communicator*>& comms);

}  // namespace polar
