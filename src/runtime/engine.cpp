#include "runtime/engine.h"

#include <algorithm>
#include <numeric>
#include <set>

namespace polar {

namespace {

// Batch sizes decode graphs are recorded for: exact up to 8, then steps of 8 to 64, 16 to 256, 64 beyond,
// so padding wastes at most 1/8 of the rows once batches are large (and decode is bound by weight reads,
// which padding does not add to).
int64_t batch_bucket(int64_t b) {
  if (b <= 2) return b;
  if (b <= 4) return 4;
  if (b <= 8) return 8;
  const int64_t step = b <= 64 ? 8 : (b <= 256 ? 16 : 64);
  return (b + step - 1) / step * step;
}

int64_t pow2_at_least(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Every rank's backend, rank 0 first (the KV cache keeps one store on each).
std::vector<Backend*> rank_backends(Model& model) {
  std::vector<Backend*> out;
  for (int r = 0; r < model.ranks(); ++r) out.push_back(&model.rank(r).backend());
  return out;
}

}  // namespace

Engine::Engine(Model& model, EngineOptions options)
    : model_(model),
      options_(options),
      cache_(rank_backends(model), model.config().n_layers, model.dims().kv_heads, model.config().head_dim,
             std::max<int64_t>(1, (options.kv_tokens + options.block_size - 1) / options.block_size), options.block_size,
             model.backend().activation_dtype()),
      threads_(model.ranks()) {
  check(!options.sparsity || options.sparsity->ranks() == model.ranks(),
        "sparse decoding: selections for {} ranks, the model has {}", options.sparsity ? options.sparsity->ranks() : 0,
        model.ranks());
}

void Engine::on_ranks(const std::function<void(int, Model&)>& fn) {
  threads_.run([&](int r) {
    Model& m = model_.rank(r);
    m.backend().bind_thread();  // rank 0's too: the calling thread may have used another device last
    try {
      fn(r, m);
    } catch (...) {
      if (m.shard().comm) m.shard().comm->abort();
      throw;
    }
  });
}

int64_t Engine::add_sequence() {
  lengths_[next_seq_] = 0;
  return next_seq_++;
}

void Engine::remove_sequence(int64_t seq) {
  cache_.release(seq);
  lengths_.erase(seq);
}

int64_t Engine::attach_prefix(int64_t seq, std::span<const int32_t> tokens) {
  check(length(seq) == 0, "sequence {} already has {} tokens; a cached prefix attaches to a new sequence", seq,
        length(seq));
  const int64_t n = cache_.attach_prefix(seq, tokens);
  lengths_[seq] = n;
  return n;
}

void Engine::publish_prefix(int64_t seq, std::span<const int32_t> tokens) {
  check(static_cast<int64_t>(tokens.size()) <= length(seq), "sequence {}: {} tokens published, {} computed", seq,
        tokens.size(), length(seq));
  cache_.publish_prefix(seq, tokens);
}

int64_t Engine::length(int64_t seq) const {
  auto it = lengths_.find(seq);
  check(it != lengths_.end(), "unknown sequence {}", seq);
  return it->second;
}

void Engine::extend_uncomputed(int64_t seq, int64_t n) {
  const int64_t end = length(seq) + n;
  check(n >= 0 && end <= config().max_positions, "sequence of {} tokens exceeds the model's context length of {}", end,
        config().max_positions);
  cache_.reserve(seq, end);
  lengths_[seq] = end;
}

Tensor Engine::step(const std::vector<SeqChunk>& chunks, bool all_logits, Probe* probe) {
  return model_.backend().to_host_f32(forward(chunks, all_logits, probe));
}

Tensor Engine::forward(const std::vector<SeqChunk>& chunks, bool all_logits, Probe* probe) {
  const ModelConfig& c = model_.config();
  Backend& be = model_.backend();
  check(!chunks.empty(), "empty step: no sequences given");
  check(!probe || ranks() == 1, "probes need the whole model on one rank (tensor parallelism splits its heads and "
                                "neurons): use --tp 1");
  int64_t T = 0, R = 0, max_ctx = 0, max_blocks = 0, max_chunk = 0;  // R: logit rows with all_logits
  std::set<int64_t> seen;
  for (const SeqChunk& ch : chunks) {
    const int64_t len = length(ch.seq);
    // Two chunks of one sequence would both be placed at its current length, overwriting each other's K/V.
    check(seen.insert(ch.seq).second, "sequence {} appears more than once in one step", ch.seq);
    check(!ch.tokens.empty(), "sequence {}: no tokens to process (empty prompt?)", ch.seq);
    check(!ch.sparse_from || (*ch.sparse_from >= 0 && *ch.sparse_from <= static_cast<int64_t>(ch.tokens.size())),
          "sequence {}: sparse_from {} outside its {} tokens", ch.seq, ch.sparse_from.value_or(0), ch.tokens.size());
    check(ch.logits_from >= 0 && ch.logits_from < static_cast<int64_t>(ch.tokens.size()),
          "sequence {}: logits_from {} outside its {} tokens", ch.seq, ch.logits_from, ch.tokens.size());
    if (all_logits) R += static_cast<int64_t>(ch.tokens.size()) - ch.logits_from;
    for (int32_t id : ch.tokens)
      check(id >= 0 && id < c.vocab_size, "token id {} is out of range for a vocabulary of {}", id, c.vocab_size);
    const int64_t end = len + static_cast<int64_t>(ch.tokens.size());
    check(end <= c.max_positions, "sequence of {} tokens exceeds the model's context length of {}", end, c.max_positions);
    T += static_cast<int64_t>(ch.tokens.size());
    max_ctx = std::max(max_ctx, end);
    max_chunk = std::max(max_chunk, static_cast<int64_t>(ch.tokens.size()));
  }
  for (const SeqChunk& ch : chunks) {
    cache_.reserve(ch.seq, length(ch.seq) + static_cast<int64_t>(ch.tokens.size()));
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(cache_.blocks(ch.seq).size()));
  }
  const bool scored_sparse = options_.sparsity && std::any_of(chunks.begin(), chunks.end(), [](const SeqChunk& ch) {
                               return ch.sparse_from.has_value();
                             });
  auto is_decode = [](const SeqChunk& ch) { return ch.tokens.size() == 1 && !ch.prefill && !ch.sparse_from; };
  const int64_t decode_chunks = std::count_if(chunks.begin(), chunks.end(), is_decode);
  const int64_t S = static_cast<int64_t>(chunks.size());
  // Decode-only steps replay graphs (without sparsity a one-token prefill chunk is no different).
  if ((decode_chunks == S || (!options_.sparsity && max_chunk == 1)) && !scored_sparse && probe == nullptr && options_.graphs && be.supports_graphs() &&
      !be.profiling())
    return decode_with_graph(chunks);
  // A mixed step (sparse decode tokens beside prefill chunks): the decode chunks go first, so that their
  // tokens are rows [0, decode_chunks) (where the MLP router looks, model.h), the logit rows staying in the
  // caller's chunk order.
  const bool mixed = options_.sparsity && !scored_sparse && decode_chunks > 0 && decode_chunks < S;
  std::vector<int64_t> order(static_cast<size_t>(S));
  std::iota(order.begin(), order.end(), 0);
  if (mixed)
    std::stable_partition(order.begin(), order.end(), [&](int64_t s) { return is_decode(chunks[static_cast<size_t>(s)]); });
  Tensor ids = Tensor::empty(DType::I32, {T}), pos = Tensor::empty(DType::I32, {T});
  Tensor seq = Tensor::empty(DType::I32, {T}), slots = Tensor::empty(DType::I32, {T});
  Tensor tables = Tensor::zeros(DType::I32, {S, max_blocks});
  Tensor starts = Tensor::empty(DType::I32, {S + 1});
  Tensor rows = Tensor::empty(DType::I32, {all_logits ? R : S});
  // Per token, 1 = dense: only read when some chunk sets sparse_from, or in a mixed step.
  const bool flags = scored_sparse || mixed;
  Tensor dense = Tensor::empty(DType::I32, {flags ? T : 0});
  std::vector<int64_t> first_token(static_cast<size_t>(S));  // of each chunk, in the caller's order
  int64_t t = 0;
  for (int64_t s = 0; s < S; ++s) {  // s: the chunk's place in the step
    const SeqChunk& ch = chunks[static_cast<size_t>(order[static_cast<size_t>(s)])];
    const int64_t len = length(ch.seq);
    const std::vector<int32_t>& blocks = cache_.blocks(ch.seq);
    starts.data<int32_t>()[s] = static_cast<int32_t>(t);
    first_token[static_cast<size_t>(order[static_cast<size_t>(s)])] = t;
    std::copy(blocks.begin(), blocks.end(), tables.data<int32_t>() + s * max_blocks);
    const int64_t n = static_cast<int64_t>(ch.tokens.size());
    const int64_t sparse_from = ch.sparse_from.value_or(is_decode(ch) ? 0 : n);
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      ids.data<int32_t>()[t] = ch.tokens[i];
      pos.data<int32_t>()[t] = static_cast<int32_t>(len + i);
      seq.data<int32_t>()[t] = static_cast<int32_t>(s);
      slots.data<int32_t>()[t] = cache_.slot(ch.seq, len + i);
      if (flags) dense.data<int32_t>()[t] = static_cast<int64_t>(i) < sparse_from;
    }
  }
  starts.data<int32_t>()[S] = static_cast<int32_t>(T);
  int64_t r = 0;
  for (int64_t s = 0; s < S; ++s) {  // logit rows in the caller's chunk order
    const SeqChunk& ch = chunks[static_cast<size_t>(s)];
    const int64_t t0 = first_token[static_cast<size_t>(s)], n = static_cast<int64_t>(ch.tokens.size());
    if (!all_logits) rows.data<int32_t>()[r++] = static_cast<int32_t>(t0 + n - 1);
    else
      for (int64_t i = ch.logits_from; i < n; ++i) rows.data<int32_t>()[r++] = static_cast<int32_t>(t0 + i);
  }
  const bool sparse = options_.sparsity && (flags || decode_chunks == S);
  Tensor live = Tensor::empty(DType::I32, {1});  // an eager step has no padding rows; a mixed one's MLP
  live.data<int32_t>()[0] = static_cast<int32_t>(mixed ? decode_chunks : T);  // router reads its decode rows
  Tensor logits;
  on_ranks([&](int r, Model& m) {
    Backend& rb = m.backend();
    StepInput in;
    in.ids = rb.upload(ids, DType::I32);
    in.layout = {rb.upload(pos, DType::I32),    rb.upload(seq, DType::I32),    rb.upload(slots, DType::I32),
                 rb.upload(tables, DType::I32), rb.upload(starts, DType::I32), cache_.block_size(),
                 max_ctx,                       max_chunk,                     Tensor()};
    in.logit_rows = rb.upload(rows, DType::I32);
    if (sparse) {
      in.sparsity = &options_.sparsity->rank(r);
      in.layout.live_tokens = rb.upload(live, DType::I32);
      if (flags) in.dense_tokens = rb.upload(dense, DType::I32);
      if (mixed) in.mixed_decode_tokens = decode_chunks;
    }
    Tensor out = m.forward(in, cache_.layers(r), probe);
    if (r == 0) logits = out;
  });
  for (const SeqChunk& ch : chunks) lengths_[ch.seq] += static_cast<int64_t>(ch.tokens.size());
  return logits;
}

Tensor Engine::decode_inputs(int64_t batch, int64_t max_blocks, const std::vector<SeqChunk>& chunks) const {
  const int64_t B = batch, M = max_blocks, S = static_cast<int64_t>(chunks.size());
  Tensor host = Tensor::zeros(DType::I32, {6 * B + 2 + B * M});
  int32_t* ids = host.data<int32_t>();
  int32_t *pos = ids + B, *seq = pos + B, *slots = seq + B, *rows = slots + B, *starts = rows + B;
  int32_t* tables = starts + B + 1;
  const int32_t scratch = cache_.scratch_block();
  for (int64_t r = 0; r < B; ++r) {
    seq[r] = rows[r] = starts[r] = static_cast<int32_t>(r);
    if (r < S) {
      const SeqChunk& ch = chunks[r];
      const int64_t len = length(ch.seq);
      const std::vector<int32_t>& blocks = cache_.blocks(ch.seq);
      ids[r] = ch.tokens[0];
      pos[r] = static_cast<int32_t>(len);
      slots[r] = cache_.slot(ch.seq, len);
      std::copy(blocks.begin(), blocks.end(), tables + r * M);
    } else {  // padding: token 0 at position 0 of the scratch block
      slots[r] = static_cast<int32_t>(scratch * cache_.block_size());
      std::fill(tables + r * M, tables + (r + 1) * M, scratch);
    }
  }
  starts[B] = static_cast<int32_t>(B);
  tables[B * M] = static_cast<int32_t>(S);  // live_tokens
  return host;
}

Tensor Engine::decode_with_graph(const std::vector<SeqChunk>& chunks) {
  const int64_t S = static_cast<int64_t>(chunks.size()), bs = cache_.block_size();
  int64_t max_blocks = 1;
  for (const SeqChunk& ch : chunks)
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(cache_.blocks(ch.seq).size()));
  const int64_t model_blocks = (config().max_positions + bs - 1) / bs;
  const int64_t B = batch_bucket(S), M = std::min(pow2_at_least(max_blocks), std::max(model_blocks, max_blocks));
  auto [it, fresh] = graphs_.try_emplace({B, M});
  std::vector<DecodeGraph>& graphs = it->second;
  const Tensor inputs = decode_inputs(B, M, chunks);
  Tensor logits;
  if (fresh) {
    graphs.resize(static_cast<size_t>(ranks()));
    try {
      on_ranks([&](int r, Model& m) {
        Backend& be = m.backend();
        DecodeGraph& g = graphs[static_cast<size_t>(r)];
        g.inputs = be.alloc(DType::I32, {6 * B + 2 + B * M});
        g.in.ids = g.inputs.view(0, {B});
        g.in.layout = {g.inputs.view(B, {B}),         g.inputs.view(2 * B, {B}),         g.inputs.view(3 * B, {B}),
                       g.inputs.view(6 * B + 1, {B, M}), g.inputs.view(5 * B, {B + 1}), bs,
                       M * bs,                         1,                               g.inputs.view(6 * B + 1 + B * M, {1})};
        g.in.logit_rows = g.inputs.view(4 * B, {B});
        g.in.sparsity = options_.sparsity ? &options_.sparsity->rank(r) : nullptr;
        be.copy_to_device(inputs, g.inputs);
        // This step runs op by op (it also warms up GEMM plans and the allocator); the graph is recorded after.
        Tensor out = m.forward(g.in, cache_.layers(r), nullptr);
        if (r == 0) logits = out;
        be.begin_capture();
        try {
          g.logits = m.forward(g.in, cache_.layers(r), nullptr);
        } catch (...) {
          be.end_capture();
          throw;
        }
        g.graph = be.end_capture();
      });
    } catch (...) {
      graphs_.erase(it);
      throw;
    }
  } else {
    on_ranks([&](int r, Model& m) {
      DecodeGraph& g = graphs[static_cast<size_t>(r)];
      m.backend().copy_to_device(inputs, g.inputs);
      g.graph->replay();
    });
    logits = graphs[0].logits;
  }
  for (const SeqChunk& ch : chunks) lengths_[ch.seq] += 1;
  return logits.slice_rows(0, S);
}

}  // namespace polar
