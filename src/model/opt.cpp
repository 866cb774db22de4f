// OPT: LayerNorm blocks (pre-LN, or post-LN as in OPT-350m), learned positions stored offset by 2,
// ReLU MLP (fc1/fc2), biases everywhere, MHA, optional project_in/out when word_embed_proj_dim != hidden,
// lm_head tied to the token embedding.
#include <cmath>

#include <fmt/format.h>

#include "model/model.h"

namespace polar {

namespace {

// wqkv stacks q_proj, k_proj, v_proj [3·d, d] (Model::load_stacked), bqkv their biases. The MLP is kept
// neuron-major for sparse decoding (polar-method.md §5): w1 = fc1 [ffn, d] as stored, w2t = fc2ᵀ [ffn, d],
// so a selected neuron's weights are one contiguous row of each. Under tensor parallelism (more than one
// rank) both get one zero row after the rank's neurons, and b1 a zero: the rank's zero neuron, whose index
// pads the rank's part of a sparse step's neuron set to a fixed length (localize_indices) and adds nothing.
struct OptLayer {
  Tensor ln1_w, ln1_b, wqkv, bqkv, wo, bo, ln2_w, ln2_b, w1, b1, w2t, b2;
};

class Opt final : public Model {
 public:
  Opt(const Checkpoint& ck, Backend& backend, TpShard shard) : Model(ck.config, backend, shard) {
    const ModelConfig& c = config_;
    const ShardDims& s = dims_;
    // Column-parallel q/k/v and fc1: the rank's rows; row-parallel out_proj and fc2: its columns, their
    // biases on rank 0 only (Model::accumulates).
    const Range heads{s.head0 * c.head_dim, s.heads * c.head_dim}, neurons{s.ffn0, s.ffn};
    const bool first = shard.rank == 0;
    const int64_t zero = shard.size > 1 ? 1 : 0;  // the zero neuron's row
    auto load = [&](const std::string& name, const Shape& shape) { return load_weight(ck, name, shape); };
    auto load_opt = [&](bool present, const std::string& name, const Shape& shape) {
      return load_weight_if(present, ck, name, shape);
    };
    const std::string d = "model.decoder.";
    const int64_t e = c.embed_dim();
    embed_ = load(d + "embed_tokens.weight", {c.vocab_size, e});
    positions_ = load(d + "embed_positions.weight", {c.max_positions + c.position_offset, c.hidden});
    gathered_bytes_ += static_cast<int64_t>(positions_.nbytes());
    if (c.word_embed_proj_dim) {
      project_in_ = load(d + "project_in.weight", {c.hidden, e});
      project_out_ = load(d + "project_out.weight", {e, c.hidden});
    }
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const std::string p = fmt::format("{}layers.{}.", d, l);
      OptLayer L;
      L.ln1_w = load(p + "self_attn_layer_norm.weight", {c.hidden});
      L.ln1_b = load(p + "self_attn_layer_norm.bias", {c.hidden});
      L.wqkv = load_stacked(ck, {{p + "self_attn.q_proj.weight", {c.hidden, c.hidden}, heads},
                                 {p + "self_attn.k_proj.weight", {c.hidden, c.hidden}, heads},
                                 {p + "self_attn.v_proj.weight", {c.hidden, c.hidden}, heads}});
      L.bqkv = load_stacked_if(c.qkv_bias, ck,
                               {{p + "self_attn.q_proj.bias", {c.hidden}, heads},
                                {p + "self_attn.k_proj.bias", {c.hidden}, heads},
                                {p + "self_attn.v_proj.bias", {c.hidden}, heads}});
      L.wo = load_stacked(ck, {{p + "self_attn.out_proj.weight", {c.hidden, c.hidden}, kAll, heads}});
      L.bo = load_opt(c.o_bias && first, p + "self_attn.out_proj.bias", {c.hidden});
      L.ln2_w = load(p + "final_layer_norm.weight", {c.hidden});
      L.ln2_b = load(p + "final_layer_norm.bias", {c.hidden});
      L.w1 = load_stacked(ck, {{p + "fc1.weight", {c.ffn, c.hidden}, neurons}, {"", {zero, c.hidden}}});
      L.b1 = load_stacked_if(c.mlp_bias, ck, {{p + "fc1.bias", {c.ffn}, neurons}, {"", {zero}}});
      L.w2t = load_transposed(ck, p + "fc2.weight", {c.hidden, c.ffn}, neurons, zero);
      L.b2 = load_opt(c.mlp_bias && first, p + "fc2.bias", {c.hidden});
      layers_.push_back(std::move(L));
    }
    if (c.final_norm) {
      final_w_ = load(d + "final_layer_norm.weight", {c.hidden});
      final_b_ = load(d + "final_layer_norm.bias", {c.hidden});
    }
  }

  Tensor forward(const StepInput& in, std::vector<KVLayer>& cache, Probe* probe) override {
    const ModelConfig& c = config_;
    const ShardDims& s = dims_;  // q/k/v, attention and the MLP's neurons: this rank's share
    Backend& be = backend_;
    const DType dt = be.activation_dtype();
    const int64_t T = in.ids.numel(), e = c.embed_dim();
    const float eps = static_cast<float>(c.norm_eps);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    auto ptr = [](const Tensor& t) { return t.defined() ? &t : nullptr; };

    Tensor x = be.alloc(dt, {T, c.hidden});
    Tensor h = be.alloc(dt, {T, c.hidden});
    Tensor qkv = be.alloc(dt, {T, 3 * s.heads, c.head_dim});
    Tensor q = be.alloc(dt, {T, s.heads, c.head_dim});
    Tensor attn = be.alloc(dt, {T, s.heads, c.head_dim});
    Tensor ffn_act = be.alloc(dt, {T, s.ffn});  // sparse steps use its first T·k elements

    if (c.word_embed_proj_dim) {
      Tensor tok = be.alloc(dt, {T, e});
      be.embedding(embed_, in.ids, tok);
      be.linear(tok, project_in_, nullptr, x);
    } else {
      be.embedding(embed_, in.ids, x);
    }
    be.embedding(positions_, in.layout.positions, h, c.position_offset);
    be.add(x, h, x);
    if (probe) probe->hidden(0, be.to_host_f32(x));
    if (in.sparsity) in.sparsity->begin_step(in.layout.live_tokens, in.dense_tokens);
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const OptLayer& L = layers_[l];
      // Attention block. Post-LN: the norm follows the residual add instead of preceding q/k/v.
      be.region("other");
      const Tensor* attn_in = &x;
      if (c.pre_norm) {
        be.layer_norm(x, L.ln1_w, L.ln1_b, eps, h);
        attn_in = &h;
      }
      if (probe) probe->attn_in(static_cast<int>(l), be.to_host_f32(*attn_in));
      // Both routers read the attention block's input, so the MLP's neurons are chosen here too: one set for
      // a decode batch, or in a scored pass one per token ([T, k]). As side work (backend.h) the heads are
      // waited for at the attention and the neurons at the output projection, the first op to overwrite
      // attn_in (x itself in post-LN models), so the router launches can overlap the QKV projection and
      // the attention.
      Tensor heads, neurons, token_neurons, decode_neurons;
      int heads_ready = 0, neurons_ready = 0;
      if (in.sparsity) {
        be.region("routers");
        be.begin_side_work();
        heads = in.sparsity->attention_heads(static_cast<int>(l), *attn_in);
        heads_ready = be.end_side_work();
        be.begin_side_work();
        if (in.scored())
          token_neurons = in.sparsity->mlp_neurons_per_token(static_cast<int>(l), *attn_in, ptr(in.dense_tokens));
        else if (in.mixed_decode_tokens)  // the decode tokens' set: their rows, at their batch's k
          decode_neurons = in.sparsity->mlp_neurons(static_cast<int>(l), attn_in->slice_rows(0, in.mixed_decode_tokens),
                                                    in.layout);
        else
          neurons = in.sparsity->mlp_neurons(static_cast<int>(l), *attn_in, in.layout);
        neurons_ready = be.end_side_work();
      }
      be.region("qkv_o");
      be.linear(*attn_in, L.wqkv, ptr(L.bqkv), qkv);
      be.region("attention");
      be.rope_kv_append(qkv, cache[l], in.layout, Tensor(), q);  // learned positions: no rotation
      be.wait_side_work(heads_ready);
      attend(static_cast<int>(l), in, heads, q, cache[l], scale, 0, attn);
      if (probe) report_head_norms(probe, static_cast<int>(l), attn);
      be.region("qkv_o");
      be.wait_side_work(neurons_ready);
      project_attention(in, heads, attn, L.wo, ptr(L.bo), x, accumulates());
      reduce(x);
      be.region("other");
      if (!c.pre_norm) be.layer_norm(x, L.ln1_w, L.ln1_b, eps, x);
      // MLP block.
      const Tensor* mlp_in = &x;
      if (c.pre_norm) {
        be.layer_norm(x, L.ln2_w, L.ln2_b, eps, h);
        mlp_in = &h;
      }
      be.region("mlp");
      // A gathered (sparse) pass may name the zero neuron; a dense one runs over the rank's own neurons.
      const Tensor* idx = neurons.defined() ? &neurons : nullptr;
      Tensor act = idx ? ffn_act.view(0, {T, neurons.numel()}) : ffn_act;
      const Tensor w1 = idx ? L.w1 : L.w1.slice_rows(0, s.ffn), w2t = idx ? L.w2t : L.w2t.slice_rows(0, s.ffn);
      const Tensor b1 = idx || !L.b1.defined() ? L.b1 : L.b1.slice_rows(0, s.ffn);
      be.gather_up_relu(*mlp_in, w1, ptr(b1), idx, act);
      if (token_neurons.defined() || decode_neurons.defined()) {
        // Per-token sets, or in a mixed step the decode tokens' one set: the dense activations with each
        // sparse token's unselected neurons zeroed, which the down projection then ignores — the gather
        // GEMMs over those neurons, in one pass. A mixed step's prefill rows read every weight anyway, so one
        // dense pass plus the mask is cheaper than a second, gathered pass for the decode rows.
        Tensor neuron_rows = act.reshape({T, s.ffn, 1});
        be.keep_heads(neuron_rows, token_neurons.defined() ? token_neurons : decode_neurons.reshape({1, decode_neurons.numel()}),
                      1, ptr(in.dense_tokens));
      }
      if (probe) probe->mlp_act(static_cast<int>(l), be.to_host_f32(act));
      be.gather_down(act, w2t, idx, ptr(L.b2), x, accumulates());
      reduce(x);
      be.region("other");
      if (!c.pre_norm) be.layer_norm(x, L.ln2_w, L.ln2_b, eps, x);
      if (probe && l + 1 < c.n_layers) probe->hidden(static_cast<int>(l + 1), be.to_host_f32(x));
    }
    be.region("other");
    if (c.final_norm) be.layer_norm(x, final_w_, final_b_, eps, x);
    Tensor out = x;
    if (c.word_embed_proj_dim) {
      out = be.alloc(dt, {T, e});
      be.linear(x, project_out_, nullptr, out);
    }
    if (probe) probe->hidden(static_cast<int>(c.n_layers), be.to_host_f32(out));
    const int64_t R = in.logit_rows.numel();
    Tensor rows = be.alloc(dt, {R, e});
    be.embedding(out, in.logit_rows, rows);
    Tensor logits = be.alloc(dt, {R, c.vocab_size});
    be.linear(rows, embed_, nullptr, logits);
    return logits;
  }

 private:
  Tensor embed_, positions_, project_in_, project_out_, final_w_, final_b_;
  std::vector<OptLayer> layers_;
};

}  // namespace

std::unique_ptr<Model> make_opt(const Checkpoint& ck, Backend& backend, TpShard shard) {
  return std::make_unique<Opt>(ck, backend, shard);
}

}  // namespace polar
