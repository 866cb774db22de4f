#include "bench/decode_bench.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <random>

#include <fmt/format.h>

#include "runtime/engine.h"
#include "runtime/sampler.h"

namespace polar {

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

HostRoofline measure_host_roofline(int64_t m, int64_t n, int64_t k) {
  HostRoofline r;
  {
    // 1 GiB of floats, summed in parallel; best of 5 passes after a first touch. Each 4096-float chunk is
    // summed in float with SIMD lanes (exact for ones) so the loop is bound by memory, not by a serial add.
    const int64_t count = int64_t(1) << 28, chunk = 4096;
    std::vector<float> buf(count, 1.0f);
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = Clock::now();
      double sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
      for (int64_t c0 = 0; c0 < count; c0 += chunk) {
        float part = 0;
        const float* p = buf.data() + c0;
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < chunk; ++i) part += p[i];
        sum += part;
      }
      double s = ms_since(t0) / 1e3;
      if (sum != double(count)) fail("bandwidth probe: bad sum");
      r.read_gbps = std::max(r.read_gbps, count * 4.0 / s / 1e9);
    }
  }
  {
    std::vector<float> a(m * k, 0.5f), b(n * k, 0.25f), c(m * n);
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = Clock::now();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), 1.0f, a.data(), int(k), b.data(),
                  int(k), 0.0f, c.data(), int(n));
      double s = ms_since(t0) / 1e3;
      if (rep > 0) r.gemm_gflops = std::max(r.gemm_gflops, 2.0 * m * n * k / s / 1e9);
    }
  }
  return r;
}

std::vector<BenchRow> run_bench(Model& model, const BenchOptions& o, const HostRoofline& roof,
                                const std::function<void(const std::string&)>& progress) {
  const ModelConfig& c = model.config();
  check(o.prompt_len >= 1 && o.prompt_len + o.decode_steps + 2 <= c.max_positions,
        "prompt length {} plus {} decode steps exceeds the model's context length of {}", o.prompt_len, o.decode_steps,
        c.max_positions);
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab_size - 1));
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> v(n);
    for (auto& t : v) t = token(rng);
    return v;
  };
  const int64_t elem = static_cast<int64_t>(dtype_size(model.backend().activation_dtype()));
  const int64_t kv_bytes_per_token = c.n_layers * 2 * c.kv_dim() * elem;
  std::vector<BenchRow> rows;

  {  // Prefill of one prompt. FLOPs: 2 per weight per token (GEMMs) + attention's two T x T x dh products.
    std::vector<int32_t> prompt = random_tokens(o.prompt_len);
    std::vector<double> times;
    for (int64_t rep = 0; rep < o.prefill_reps + 1; ++rep) {
      Engine engine(model, {.kv_tokens = o.prompt_len + 16});
      auto t0 = Clock::now();
      engine.step({{engine.add_sequence(), prompt}}, false);
      model.backend().synchronize();
      if (rep > 0) times.push_back(ms_since(t0));  // rep 0 warms up
    }
    const double T = static_cast<double>(o.prompt_len);
    const double flops = 2.0 * (model.step_weight_bytes() / elem) * T + 2.0 * c.n_layers * c.q_dim() * T * T;
    BenchRow r{"prefill", 1, o.prompt_len, median(times)};
    r.tokens_per_s = T / (r.ms / 1e3);
    r.floor_ms = flops / (roof.gemm_gflops * 1e9) * 1e3;
    r.x_floor = r.ms / r.floor_ms;
    r.achieved = flops / (r.ms / 1e3) / 1e9;
    rows.push_back(r);
    if (progress) progress(fmt::format("prefill {} tokens: {:.1f} ms", o.prompt_len, r.ms));
  }

  for (int64_t B : o.batches) {
    check(B >= 1, "batch sizes must be positive");
    Engine engine(model, {.kv_tokens = B * (o.prompt_len + o.decode_steps + 2 + 16)});
    std::vector<int64_t> seqs;
    std::vector<std::vector<int32_t>> prompts;
    std::vector<SeqChunk> chunks;
    for (int64_t b = 0; b < B; ++b) {
      seqs.push_back(engine.add_sequence());
      prompts.push_back(random_tokens(o.prompt_len));
    }
    for (int64_t b = 0; b < B; ++b) chunks.push_back({seqs[b], prompts[b]});
    Tensor logits = engine.step(chunks, false);
    std::vector<int32_t> next(B);
    std::vector<double> times;
    for (int64_t step = 0; step < o.decode_steps + 2; ++step) {
      std::vector<SeqChunk> dec;
      for (int64_t b = 0; b < B; ++b) {
        next[b] = argmax(logits.data<float>() + b * c.vocab_size, c.vocab_size);
        dec.push_back({seqs[b], std::span<const int32_t>(&next[b], 1)});
      }
      auto t0 = Clock::now();
      logits = engine.step(dec, false);
      model.backend().synchronize();
      if (step >= 2) times.push_back(ms_since(t0));
    }
    const int64_t ctx = o.prompt_len + 2 + o.decode_steps / 2;  // context at the median step
    const double bytes = static_cast<double>(model.step_weight_bytes()) + double(B) * ctx * kv_bytes_per_token;
    BenchRow r{"decode", B, ctx, median(times)};
    r.tokens_per_s = B / (r.ms / 1e3);
    r.floor_ms = bytes / (roof.read_gbps * 1e9) * 1e3;
    r.x_floor = r.ms / r.floor_ms;
    r.achieved = bytes / (r.ms / 1e3) / 1e9;
    rows.push_back(r);
    if (progress) progress(fmt::format("decode batch {}: {:.1f} ms/step", B, r.ms));
  }
  return rows;
}

}  // namespace polar
