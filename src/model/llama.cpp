// Llama family: Llama-2/3.x, Mistral, Qwen2. RMSNorm pre-norm blocks, RoPE (rotate-half), GQA, SwiGLU MLP;
// q/k/v biases for Qwen2, optional o/MLP biases, tied or untied lm_head.
#include <cmath>

#include <fmt/format.h>

#include "model/model.h"

namespace polar {

namespace {

// wqkv stacks q_proj, k_proj, v_proj [(H + 2·Hkv)·dh, d] and w_gate_up stacks gate_proj, up_proj [2·ffn, d]
// (Model::load_stacked), each with its stacked bias when the checkpoint has one.
struct LlamaLayer {
  Tensor attn_norm, wqkv, bqkv, wo, bo, mlp_norm, w_gate_up, b_gate_up, w_down, b_down;
};

class Llama final : public Model {
 public:
  Llama(const Checkpoint& ck, Backend& backend, TpShard shard) : Model(ck.config, backend, shard) {
    const ModelConfig& c = config_;
    const ShardDims& s = dims_;
    // Column-parallel q/k/v and gate/up: the rank's rows; row-parallel o_proj and down: its columns, their
    // biases on rank 0 only (the ranks' partial products are summed, so a bias is added once).
    const Range q_rows{s.head0 * c.head_dim, s.heads * c.head_dim}, kv_rows{s.kv_head0 * c.head_dim, s.kv_heads * c.head_dim};
    const Range neurons{s.ffn0, s.ffn};
    const bool first = shard.rank == 0;
    auto load = [&](const std::string& name, const Shape& shape) { return load_weight(ck, name, shape); };
    auto load_opt = [&](bool present, const std::string& name, const Shape& shape) {
      return load_weight_if(present, ck, name, shape);
    };
    embed_ = load("model.embed_tokens.weight", {c.vocab_size, c.hidden});
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const std::string p = fmt::format("model.layers.{}.", l);
      LlamaLayer L;
      L.attn_norm = load(p + "input_layernorm.weight", {c.hidden});
      L.wqkv = load_stacked(ck, {{p + "self_attn.q_proj.weight", {c.q_dim(), c.hidden}, q_rows},
                                 {p + "self_attn.k_proj.weight", {c.kv_dim(), c.hidden}, kv_rows},
                                 {p + "self_attn.v_proj.weight", {c.kv_dim(), c.hidden}, kv_rows}});
      L.bqkv = load_stacked_if(c.qkv_bias, ck,
                               {{p + "self_attn.q_proj.bias", {c.q_dim()}, q_rows},
                                {p + "self_attn.k_proj.bias", {c.kv_dim()}, kv_rows},
                                {p + "self_attn.v_proj.bias", {c.kv_dim()}, kv_rows}});
      L.wo = load_stacked(ck, {{p + "self_attn.o_proj.weight", {c.hidden, c.q_dim()}, kAll, q_rows}});
      L.bo = load_opt(c.o_bias && first, p + "self_attn.o_proj.bias", {c.hidden});
      L.mlp_norm = load(p + "post_attention_layernorm.weight", {c.hidden});
      L.w_gate_up = load_stacked(ck, {{p + "mlp.gate_proj.weight", {c.ffn, c.hidden}, neurons},
                                      {p + "mlp.up_proj.weight", {c.ffn, c.hidden}, neurons}});
      L.b_gate_up = load_stacked_if(c.mlp_bias, ck,
                                    {{p + "mlp.gate_proj.bias", {c.ffn}, neurons}, {p + "mlp.up_proj.bias", {c.ffn}, neurons}});
      L.w_down = load_stacked(ck, {{p + "mlp.down_proj.weight", {c.hidden, c.ffn}, kAll, neurons}});
      L.b_down = load_opt(c.mlp_bias && first, p + "mlp.down_proj.bias", {c.hidden});
      layers_.push_back(std::move(L));
    }
    final_norm_ = load("model.norm.weight", {c.hidden});
    if (c.tie_embeddings && !ck.has("lm_head.weight")) {
      lm_head_ = embed_;
    } else {
      lm_head_ = load("lm_head.weight", {c.vocab_size, c.hidden});
      gathered_bytes_ += static_cast<int64_t>(embed_.nbytes());
    }
    std::vector<float> inv = rope_inv_freq(c);
    Tensor host = Tensor::empty(DType::F32, {static_cast<int64_t>(inv.size())});
    std::copy(inv.begin(), inv.end(), host.data<float>());
    inv_freq_ = backend.upload(host, DType::F32);
  }

  Tensor forward(const StepInput& in, std::vector<KVLayer>& cache, Probe* probe) override {
    const ModelConfig& c = config_;
    const ShardDims& s = dims_;  // q/k/v, attention and the MLP's neurons: this rank's share
    Backend& be = backend_;
    const DType dt = be.activation_dtype();
    const int64_t T = in.ids.numel();
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    auto ptr = [](const Tensor& t) { return t.defined() ? &t : nullptr; };

    Tensor x = be.alloc(dt, {T, c.hidden});
    Tensor h = be.alloc(dt, {T, c.hidden});
    Tensor qkv = be.alloc(dt, {T, s.heads + 2 * s.kv_heads, c.head_dim});
    Tensor q = be.alloc(dt, {T, s.heads, c.head_dim});
    Tensor attn = be.alloc(dt, {T, s.heads, c.head_dim});
    Tensor gate_up = be.alloc(dt, {T, 2 * s.ffn});
    Tensor act = be.alloc(dt, {T, s.ffn});
    // The output projections (o_proj, down) write delta; the residual add x += delta happens in the norm
    // that reads x next (add_rms_norm: no accumulating GEMM epilogue, no launch of its own). Under tensor
    // parallelism each rank's delta is its partial product (the bias on rank 0 only) until reduce() sums
    // them, so every rank adds the same delta to its replica of x.
    Tensor delta = be.alloc(dt, {T, c.hidden});
    bool pending = false;  // delta holds a projection not yet added to x
    const float eps = static_cast<float>(c.norm_eps);
    auto norm_x = [&](const Tensor& w, Tensor& out) {
      if (pending)
        be.add_rms_norm(x, delta, w, eps, out);
      else
        be.rms_norm(x, w, eps, out);
      pending = false;
    };

    be.embedding(embed_, in.ids, x);
    if (probe) probe->hidden(0, be.to_host_f32(x));
    if (in.sparsity) in.sparsity->begin_step(in.layout.live_tokens, in.dense_tokens);
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const LlamaLayer& L = layers_[l];
      be.region("other");
      norm_x(L.attn_norm, h);
      if (probe) probe->attn_in(static_cast<int>(l), be.to_host_f32(h));
      // The attention router as side work (backend.h): its launches can overlap the QKV projection.
      Tensor heads;
      int heads_ready = 0;
      if (in.sparsity) {
        be.region("routers");
        be.begin_side_work();
        heads = in.sparsity->attention_heads(static_cast<int>(l), h);
        heads_ready = be.end_side_work();
      }
      be.region("qkv_o");
      be.linear(h, L.wqkv, ptr(L.bqkv), qkv);
      be.region("attention");
      be.rope_kv_append(qkv, cache[l], in.layout, inv_freq_, q);
      be.wait_side_work(heads_ready);
      attend(static_cast<int>(l), in, heads, q, cache[l], scale, c.sliding_window, attn);
      if (probe) report_head_norms(probe, static_cast<int>(l), attn);
      be.region("qkv_o");
      project_attention(in, heads, attn, L.wo, ptr(L.bo), delta);
      reduce(delta);
      pending = true;
      be.region("other");
      norm_x(L.mlp_norm, h);
      be.region("mlp");
      be.linear(h, L.w_gate_up, ptr(L.b_gate_up), gate_up);
      be.silu_mul(gate_up, act);
      if (probe) probe->mlp_act(static_cast<int>(l), be.to_host_f32(act));
      be.linear(act, L.w_down, ptr(L.b_down), delta);
      reduce(delta);
      pending = true;
      if (probe && l + 1 < c.n_layers) {
        if (pending) be.add(x, delta, x);
        pending = false;
        probe->hidden(static_cast<int>(l + 1), be.to_host_f32(x));
      }
    }
    be.region("other");
    norm_x(final_norm_, x);
    if (probe) probe->hidden(static_cast<int>(c.n_layers), be.to_host_f32(x));
    const int64_t R = in.logit_rows.numel();
    Tensor rows = be.alloc(dt, {R, c.hidden});
    be.embedding(x, in.logit_rows, rows);
    Tensor logits = be.alloc(dt, {R, c.vocab_size});
    be.linear(rows, lm_head_, nullptr, logits);
    return logits;
  }

 private:
  Tensor embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<LlamaLayer> layers_;
};

}  // namespace

std::unique_ptr<Model> make_llama(const Checkpoint& ck, Backend& backend, TpShard shard) {
  return std::make_unique<Llama>(ck, backend, shard);
}

}  // namespace polar
