#include "bench/decode_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include <fmt/format.h>

#include "runtime/engine.h"

namespace polar {

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int64_t vocab, int64_t n) {
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> v(n);
  for (auto& t : v) t = token(rng);
  return v;
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The bytes a decode step of B sequences at context read_ctx must read: the weights once and every
// sequence's KV cache. A sparse step reads only its selected MLP rows (fc1 and fc2ᵀ rows of the kept
// neurons, in layers whose MLP runs sparse), adds the routers it runs, and reads KV only for the heads
// each sequence keeps (all of them at layer 0; under a threshold rule, the schedule's aim, which tokens
// meet on average), and of the output projection only the columns of KV groups some sequence kept
// (linear_selected_inputs): with selections independent between sequences, a group kept by a share s of
// them is missed by all B with probability (1 - s)^B, half of o_proj at batch 1 and density 0.5, under 1%
// from batch 8 on.
double step_bytes(const Model& model, const RouterSparsity* sparsity, int64_t B, double read_ctx) {
  const ModelConfig& c = model.config();
  const double elem = static_cast<double>(dtype_size(model.backend().activation_dtype()));
  const double kv_layer = static_cast<double>(B) * read_ctx * 2.0 * static_cast<double>(c.kv_dim()) * elem;
  double bytes = static_cast<double>(model.step_weight_bytes()) + kv_layer * static_cast<double>(c.n_layers);
  if (!sparsity) return bytes;
  const double o_proj = static_cast<double>(c.hidden) * static_cast<double>(c.q_dim()) * elem;
  for (int l = 0; l < c.n_layers; ++l) {
    const int64_t kept = sparsity->mlp_neurons_kept(l, B);
    bytes -= static_cast<double>(c.ffn - kept) * 2.0 * static_cast<double>(c.hidden) * elem;
    bytes += static_cast<double>(sparsity->router_bytes(l, B));
    if (l == 0) continue;
    const double kept_share = sparsity->kv_heads_read(l) / static_cast<double>(c.n_kv_heads);
    bytes -= kv_layer * (1.0 - kept_share);
    if (!sparsity->per_query_head())
      bytes -= o_proj * std::pow(1.0 - kept_share, static_cast<double>(B));
  }
  return bytes;
}

DecodePoint time_point(Model& model, int64_t batch, int64_t ctx, const DecodeSweepOptions& o,
                       const MemoryRates& rates) {
  Backend& be = model.backend();
  const ModelConfig& c = model.config();
  const int64_t B = batch, steps_run = kWarmupSteps + 1 + o.steps;
  Engine engine(model, {.kv_tokens = B * round_up(ctx, EngineOptions{}.block_size), .sparsity = o.sparsity});
  engine.cache().fill_random(o.seed);
  std::vector<int64_t> seqs(B);
  for (int64_t& s : seqs) {
    s = engine.add_sequence();
    engine.extend_uncomputed(s, ctx - steps_run);
  }
  std::mt19937_64 rng(o.seed);
  std::vector<int32_t> next = random_tokens(rng, c.vocab_size, B);
  Tensor ids = be.alloc(DType::I32, {B});
  // One step as a user sees it: the forward pass, argmax on the device, the chosen ids back on the host.
  auto step = [&] {
    std::vector<SeqChunk> chunks;
    for (int64_t b = 0; b < B; ++b) chunks.push_back({seqs[b], std::span<const int32_t>(&next[b], 1)});
    const auto t0 = Clock::now();
    be.argmax(engine.forward(chunks, false), ids);
    Tensor host = be.to_host_f32(ids);
    const double ms = ms_since(t0);
    std::copy_n(host.data<int32_t>(), B, next.begin());
    return ms;
  };

  for (int64_t i = 0; i < kWarmupSteps; ++i) step();
  DecodePoint p{.batch = B, .ctx = ctx};
  be.set_profiling(true);
  be.region("other");  // building and uploading the step's inputs
  p.profiled_ms = step();
  for (const auto& [region, ms] : be.take_profile()) {
    if (region == "attention") p.attention_ms += ms;
    else if (region == "qkv_o") p.qkv_o_ms += ms;
    else if (region == "mlp") p.mlp_ms += ms;
    else p.other_ms += ms;
  }
  be.set_profiling(false);
  std::vector<double> times;
  for (int64_t i = 0; i < o.steps; ++i) times.push_back(step());

  // Timed step i (of n) attends over ctx - n + 1 + i positions (at most the sliding window).
  const double mean_ctx = static_cast<double>(ctx) - (o.steps - 1) / 2.0;
  const double read_ctx = c.sliding_window ? std::min<double>(mean_ctx, static_cast<double>(c.sliding_window)) : mean_ctx;
  const double bytes = step_bytes(model, o.sparsity, B, read_ctx);
  p.density = o.sparsity ? o.density : 1.0;
  p.step_ms = median(times);
  p.tokens_per_s = static_cast<double>(B) / (p.step_ms / 1e3);
  p.floor_ms = bytes / (rates.copy_gbps * 1e9) * 1e3;
  p.x_floor = p.step_ms / p.floor_ms;
  p.gb_per_s = bytes / (p.step_ms / 1e3) / 1e9;
  p.read_floor_ms = bytes / (rates.read_gbps * 1e9) * 1e3;
  p.x_read = p.step_ms / p.read_floor_ms;
  return p;
}

}  // namespace

int64_t kv_bytes_per_token(const ModelConfig& c, DType dtype) {
  return c.n_layers * 2 * c.kv_dim() * static_cast<int64_t>(dtype_size(dtype));
}

int64_t decode_point_bytes(const ModelConfig& c, DType dtype, int64_t batch, int64_t ctx) {
  const int64_t block = EngineOptions{}.block_size;
  const double kv = static_cast<double>(batch * round_up(ctx, block) + block) * kv_bytes_per_token(c, dtype);  // + scratch
  const double activations = static_cast<double>(batch) * static_cast<double>(dtype_size(dtype)) *
                             static_cast<double>(2 * c.vocab_size + 4 * c.hidden + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.ffn);
  return static_cast<int64_t>(1.1 * (kv + activations));
}

std::string decode_skip_reason(const ModelConfig& c, DType dtype, int64_t batch, int64_t ctx, int64_t free_bytes) {
  if (ctx > c.max_positions) return fmt::format("context {} exceeds the model's {} positions", ctx, c.max_positions);
  const int64_t need = decode_point_bytes(c, dtype, batch, ctx);
  if (need > free_bytes)
    return fmt::format("needs {:.2f} GB of KV cache and activations, {:.2f} GB free", need / 1e9, free_bytes / 1e9);
  return "";
}

DecodeSweep run_decode_sweep(Model& model, const DecodeSweepOptions& o, const MemoryRates& rates,
                             const std::function<void(const std::string&)>& log) {
  const int64_t steps_run = kWarmupSteps + 1 + o.steps;
  check(o.steps >= 1, "the number of timed steps must be positive");
  for (int64_t B : o.batches) check(B >= 1, "batch sizes must be positive, got {}", B);
  for (int64_t ctx : o.contexts)
    check(ctx >= steps_run, "context {} is shorter than the {} decode steps a point runs ({} warm-up, 1 profiled, {} timed)",
          ctx, steps_run, kWarmupSteps, o.steps);
  Backend& be = model.backend();
  DecodeSweep sweep;
  for (int64_t ctx : o.contexts) {
    for (int64_t B : o.batches) {
      const std::string why = decode_skip_reason(model.config(), be.activation_dtype(), B, ctx, be.memory_info().first);
      if (!why.empty()) {
        sweep.skipped.push_back({B, ctx, why});
        if (log) log(fmt::format("skipping batch {} ctx {}: {}", B, ctx, why));
        continue;
      }
      const DecodePoint p = time_point(model, B, ctx, o, rates);
      sweep.points.push_back(p);
      if (log)
        log(fmt::format("batch {} ctx {}: {:.3f} ms/step, {:.1f} tokens/s, {:.2f}x the read floor, attention {:.0f}% of "
                        "the profiled step", B, ctx, p.step_ms, p.tokens_per_s, p.x_read,
                        100 * p.attention_ms / p.profiled_ms));
    }
  }
  return sweep;
}

double measure_gemm_gflops(Backend& be, int64_t m, int64_t n, int64_t k) {
  const DType dt = be.activation_dtype();
  Tensor x = be.random_uniform(dt, {m, k}, -1.0f, 1.0f, 1), w = be.random_uniform(dt, {n, k}, -1.0f, 1.0f, 2);
  Tensor y = be.alloc(dt, {m, n});
  double best = 0;
  for (int rep = 0; rep < 6; ++rep) {  // rep 0 warms up
    be.synchronize();
    const auto t0 = Clock::now();
    be.linear(x, w, nullptr, y);
    be.synchronize();
    const double s = ms_since(t0) / 1e3;
    if (rep > 0) best = std::max(best, 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) / s / 1e9);
  }
  return best;
}

PrefillResult run_prefill(Model& model, int64_t prompt_len, int64_t reps, double gemm_gflops, uint64_t seed) {
  const ModelConfig& c = model.config();
  check(prompt_len >= 1 && prompt_len <= c.max_positions, "prompt length {} is outside the model's 1..{} positions",
        prompt_len, c.max_positions);
  std::mt19937_64 rng(seed);
  const std::vector<int32_t> prompt = random_tokens(rng, c.vocab_size, prompt_len);
  std::vector<double> times;
  for (int64_t rep = 0; rep < reps + 1; ++rep) {
    Engine engine(model, {.kv_tokens = prompt_len});
    const auto t0 = Clock::now();
    engine.step({{engine.add_sequence(), prompt}}, false);
    if (rep > 0) times.push_back(ms_since(t0));  // rep 0 warms up
  }
  // FLOPs: 2 per weight read per token (the GEMMs) + attention's two T x T x dh products per head.
  const double T = static_cast<double>(prompt_len);
  const double elem = static_cast<double>(dtype_size(model.backend().activation_dtype()));
  const double flops = 2.0 * (static_cast<double>(model.step_weight_bytes()) / elem) * T +
                       2.0 * static_cast<double>(c.n_layers * c.q_dim()) * T * T;
  PrefillResult r{.prompt_len = prompt_len, .ms = median(times)};
  r.tokens_per_s = T / (r.ms / 1e3);
  r.floor_ms = flops / (gemm_gflops * 1e9) * 1e3;
  r.x_floor = r.ms / r.floor_ms;
  r.gflop_per_s = flops / (r.ms / 1e3) / 1e9;
  return r;
}

}  // namespace polar
