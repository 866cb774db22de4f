// A loaded model on a backend. Architectures are written once over the ops interface (backend.h): one
// file per family (opt.cpp, llama.cpp), chosen by ModelConfig::family.
#pragma once
#include <memory>
#include <vector>

#include "io/checkpoint.h"
#include "ops/backend.h"

namespace polar {

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
class Sparsity {
 public:
  virtual ~Sparsity() = default;
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
  const ModelConfig& config() const { return config_; }
  Backend& backend() const { return backend_; }
  // Logits [R, vocab] for the requested rows; K/V of every token are appended to the cache.
  virtual Tensor forward(const StepInput& in, std::vector<KVLayer>& cache, Probe* probe) = 0;
  // Bytes of weights resident on the device, and the part a decode step must read in full (everything
  // but tables that are only gathered by row: an untied token embedding, OPT's positions).
  int64_t weight_bytes() const { return weight_bytes_; }
  int64_t step_weight_bytes() const { return weight_bytes_ - gathered_bytes_; }

 protected:
  Model(const ModelConfig& config, Backend& backend) : config_(config), backend_(backend) {}
  // Uploads checkpoint tensor `name` (which must have `shape`) in the backend's dtype, counting its bytes.
  Tensor load_weight(const Checkpoint& ck, const std::string& name, const Shape& shape) {
    return load_stacked(ck, {{name, shape}});
  }
  Tensor load_weight_if(bool present, const Checkpoint& ck, const std::string& name, const Shape& shape) {
    return present ? load_weight(ck, name, shape) : Tensor();
  }
  // Checkpoint tensors stacked along dim 0 into one weight (their other dims must agree): projections that
  // read the same input (q/k/v, gate/up) then run as one GEMM, which streams its weights closer to the
  // memory bandwidth than three narrow ones at decode batch sizes.
  struct Part {
    std::string name;
    Shape shape;
  };
  Tensor load_stacked(const Checkpoint& ck, const std::vector<Part>& parts);
  Tensor load_stacked_if(bool present, const Checkpoint& ck, const std::vector<Part>& parts) {
    return present ? load_stacked(ck, parts) : Tensor();
  }
  // Checkpoint tensor `name` [n, k] uploaded transposed, as [k, n] (a down-projection stored neuron-major).
  Tensor load_transposed(const Checkpoint& ck, const std::string& name, const Shape& shape);
  // Reports per-head L2 norms of attn [T, H, dh] to the probe.
  void report_head_norms(Probe* probe, int layer, const Tensor& attn) const;
  // attn [T, H, dh] = attention of q over the layer's cache for the step, under its sparsity: KV-head
  // selections made before (heads, from attention_heads) go to the attention op, which reads only their
  // cache; per-query-head selections and those made from the output (heads_from_attention) zero the
  // unselected heads of a dense attention.
  void attend(int layer, const StepInput& in, const Tensor& heads, const Tensor& q, const KVLayer& cache, float scale,
              int64_t window, Tensor& attn) const;
  ModelConfig config_;
  Backend& backend_;
  int64_t weight_bytes_ = 0;
  int64_t gathered_bytes_ = 0;
};

std::unique_ptr<Model> make_opt(const Checkpoint& ck, Backend& backend);
std::unique_ptr<Model> make_llama(const Checkpoint& ck, Backend& backend);
// Builds the family's model, validating every tensor's shape against the config.
std::unique_ptr<Model> make_model(const Checkpoint& ck, Backend& backend);

}  // namespace polar
