#include "runtime/generate.h"

#include <algorithm>
#include <chrono>
#include <numeric>

namespace polar {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

std::vector<std::vector<int32_t>> generate(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt,
                                           const std::function<void(size_t, int32_t)>& on_token, GenerateStats* stats) {
  const ModelConfig& c = model.config();
  check(!prompts.empty(), "no prompts given");
  check(opt.max_new_tokens >= 0, "max new tokens must be >= 0");
  int64_t kv_tokens = 0;
  for (auto& p : prompts) {
    check(!p.empty(), "empty prompt: nothing to condition on");
    const int64_t total = static_cast<int64_t>(p.size()) + opt.max_new_tokens;
    check(total <= c.max_positions, "prompt of {} tokens plus {} new tokens exceeds the model's context length of {}",
          p.size(), opt.max_new_tokens, c.max_positions);
    kv_tokens += total + 16;  // + one partially used block per sequence
  }
  Engine engine(model, {.kv_tokens = kv_tokens, .sparsity = opt.sparsity});
  GenerateStats st;
  const size_t n = prompts.size();
  std::vector<int64_t> seq(n);
  std::vector<Sampler> samplers;
  for (size_t i = 0; i < n; ++i) {
    seq[i] = engine.add_sequence();
    samplers.emplace_back(opt.sampling, i);
    st.prompt_tokens += static_cast<int64_t>(prompts[i].size());
  }
  std::vector<std::vector<int32_t>> out(n);
  std::vector<int32_t> next(n, -1);
  std::vector<bool> done(n, opt.max_new_tokens == 0);
  // Tokens are drawn on the backend's device from its logits (ops/sampling.h), so only the chosen ids,
  // never the [rows, vocab] logits, come back to the host.
  Backend& be = model.backend();
  auto emit_all = [&](const Tensor& logits, const std::vector<size_t>& owners, const std::vector<size_t>& rows) {
    if (owners.empty()) return;
    const int64_t R = logits.dim(0);
    Tensor uniforms = Tensor::zeros(DType::F32, {R});
    for (size_t j = 0; j < owners.size(); ++j) uniforms.data<float>()[rows[j]] = samplers[owners[j]].next_uniform();
    Tensor ids = be.alloc(DType::I32, {R});
    be.sample(logits, opt.sampling, be.upload(uniforms, DType::F32), ids);
    Tensor host_ids = be.to_host_f32(ids);
    for (size_t j = 0; j < owners.size(); ++j) {
      const size_t i = owners[j];
      const int32_t tok = host_ids.data<int32_t>()[rows[j]];
      out[i].push_back(tok);
      next[i] = tok;
      ++st.generated_tokens;
      if (on_token) on_token(i, tok);
      if ((opt.is_stop && opt.is_stop(tok)) || static_cast<int64_t>(out[i].size()) >= opt.max_new_tokens) done[i] = true;
    }
  };

  // Prefill: pack prompt chunks into steps of at most max_step_tokens tokens.
  auto t0 = std::chrono::steady_clock::now();
  std::vector<size_t> fed(n, 0);
  for (size_t i = 0; i < n;) {
    std::vector<SeqChunk> chunks;
    std::vector<size_t> owners;
    int64_t budget = opt.max_step_tokens;
    while (i < n && budget > 0) {
      const size_t take = std::min<size_t>(prompts[i].size() - fed[i], static_cast<size_t>(budget));
      chunks.push_back({seq[i], std::span<const int32_t>(prompts[i]).subspan(fed[i], take)});
      owners.push_back(i);
      fed[i] += take;
      budget -= static_cast<int64_t>(take);
      if (fed[i] == prompts[i].size()) ++i;
    }
    Tensor logits = engine.forward(chunks, false);
    std::vector<size_t> finished, rows;  // prompts complete in this step, and their logit rows
    for (size_t r = 0; r < owners.size(); ++r)
      if (fed[owners[r]] == prompts[owners[r]].size() && !done[owners[r]]) {
        finished.push_back(owners[r]);
        rows.push_back(r);
      }
    emit_all(logits, finished, rows);
  }
  st.prefill_seconds = seconds_since(t0);

  // Decode: one token per unfinished sequence per step.
  t0 = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<SeqChunk> chunks;
    std::vector<size_t> owners;
    for (size_t i = 0; i < n; ++i)
      if (!done[i]) {
        chunks.push_back({seq[i], std::span<const int32_t>(&next[i], 1)});
        owners.push_back(i);
      }
    if (chunks.empty()) break;
    Tensor logits = engine.forward(chunks, false);
    ++st.decode_steps;
    std::vector<size_t> rows(owners.size());
    std::iota(rows.begin(), rows.end(), size_t{0});
    emit_all(logits, owners, rows);
  }
  st.decode_seconds = seconds_since(t0);
  if (stats) *stats = st;
  return out;
}

}  // namespace polar
