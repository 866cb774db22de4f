#include "runtime/engine.h"

#include <algorithm>
#include <set>

namespace polar {

Engine::Engine(Model& model, EngineOptions options)
    : model_(model),
      cache_(model.backend(), model.config().n_layers, model.config().n_kv_heads, model.config().head_dim,
             std::max<int64_t>(1, (options.kv_tokens + options.block_size - 1) / options.block_size), options.block_size,
             model.backend().activation_dtype()) {}

int64_t Engine::add_sequence() {
  lengths_[next_seq_] = 0;
  return next_seq_++;
}

void Engine::remove_sequence(int64_t seq) {
  cache_.release(seq);
  lengths_.erase(seq);
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
  int64_t T = 0, max_ctx = 0, max_blocks = 0, max_chunk = 0;
  std::set<int64_t> seen;
  for (const SeqChunk& ch : chunks) {
    const int64_t len = length(ch.seq);
    // Two chunks of one sequence would both be placed at its current length, overwriting each other's K/V.
    check(seen.insert(ch.seq).second, "sequence {} appears more than once in one step", ch.seq);
    check(!ch.tokens.empty(), "sequence {}: no tokens to process (empty prompt?)", ch.seq);
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
  const int64_t S = static_cast<int64_t>(chunks.size());
  Tensor ids = Tensor::empty(DType::I32, {T}), pos = Tensor::empty(DType::I32, {T});
  Tensor seq = Tensor::empty(DType::I32, {T}), slots = Tensor::empty(DType::I32, {T});
  Tensor tables = Tensor::zeros(DType::I32, {S, max_blocks});
  Tensor starts = Tensor::empty(DType::I32, {S + 1});
  Tensor rows = Tensor::empty(DType::I32, {all_logits ? T : S});
  int64_t t = 0;
  for (int64_t s = 0; s < S; ++s) {
    const SeqChunk& ch = chunks[s];
    const int64_t len = length(ch.seq);
    const std::vector<int32_t>& blocks = cache_.blocks(ch.seq);
    starts.data<int32_t>()[s] = static_cast<int32_t>(t);
    std::copy(blocks.begin(), blocks.end(), tables.data<int32_t>() + s * max_blocks);
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      ids.data<int32_t>()[t] = ch.tokens[i];
      pos.data<int32_t>()[t] = static_cast<int32_t>(len + i);
      seq.data<int32_t>()[t] = static_cast<int32_t>(s);
      slots.data<int32_t>()[t] = cache_.slot(ch.seq, len + i);
      if (all_logits) rows.data<int32_t>()[t] = static_cast<int32_t>(t);
    }
    if (!all_logits) rows.data<int32_t>()[s] = static_cast<int32_t>(t - 1);
  }
  starts.data<int32_t>()[S] = static_cast<int32_t>(T);
  StepInput in;
  in.ids = be.upload(ids, DType::I32);
  in.layout = {be.upload(pos, DType::I32),    be.upload(seq, DType::I32),    be.upload(slots, DType::I32),
               be.upload(tables, DType::I32), be.upload(starts, DType::I32), cache_.block_size(),
               max_ctx,                       max_chunk};
  in.logit_rows = be.upload(rows, DType::I32);
  Tensor logits = model_.forward(in, cache_.layers(), probe);
  for (const SeqChunk& ch : chunks) lengths_[ch.seq] += static_cast<int64_t>(ch.tokens.size());
  return logits;
}

}  // namespace polar
