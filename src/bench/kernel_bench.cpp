#include "bench/kernel_bench.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include <fmt/format.h>

#include "sparse/router_sparsity.h"

namespace polar {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Runs `body` 3 times untimed, then times `reps` runs between two region marks; median ms per call.
// Where the backend captures graphs, each timed run replays a graph of kCallsPerRun back-to-back calls
// (body(0), body(1), ...): launched one by one from the host, a short kernel is timed together with the
// host's launch cost (several microseconds for a cuBLASLt call, as long as a whole decode GEMM), which is
// not what a decode step, itself a graph, pays.
constexpr int kCallsPerRun = 16;

template <typename F> double time_ms(Backend& be, int reps, F&& body) {
  for (int i = 0; i < 3; ++i) body(i);
  be.synchronize();
  std::unique_ptr<Graph> graph;
  if (be.supports_graphs()) {
    be.begin_capture();
    for (int i = 0; i < kCallsPerRun; ++i) body(i);
    graph = be.end_capture();
    graph->replay();
    be.synchronize();
  }
  std::vector<double> ms;
  be.set_profiling(true);
  for (int i = 0; i < reps; ++i) {
    be.region("kernel");
    if (graph)
      graph->replay();
    else
      body(i);
    ms.push_back(be.take_profile()["kernel"] / (graph ? kCallsPerRun : 1));
  }
  be.set_profiling(false);
  return median(ms);
}

Tensor host_i32(const std::vector<int32_t>& v, Shape shape) {
  Tensor t = Tensor::empty(DType::I32, std::move(shape));
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

KernelRow row(std::string kernel, std::string shape, double ms, double bytes, const MemoryRates& rates) {
  KernelRow r{std::move(kernel), std::move(shape), ms, bytes};
  r.gbps = bytes / (ms / 1e3) / 1e9;
  r.of_copy = r.gbps / rates.copy_gbps;
  r.of_read = r.gbps / rates.read_gbps;
  return r;
}

}  // namespace

std::vector<AttentionShape> default_attention_shapes() {
  return {{1, 4096, 32, 32, 128},   {8, 4096, 32, 32, 128},  {16, 3968, 32, 32, 128}, {64, 1920, 32, 32, 128},
          {64, 1920, 72, 72, 128},  {128, 1920, 32, 32, 128}, {256, 1024, 32, 32, 128}, {64, 1920, 32, 8, 128},
          {128, 4096, 32, 8, 128}, {256, 2048, 28, 4, 128}};
}

std::vector<GemmShape> default_gemm_shapes() {
  std::vector<GemmShape> s;
  for (int64_t m : {1, 8, 16, 32, 64, 128, 256})
    // Llama-2-7B's o_proj, fused q/k/v, fused gate/up and down_proj; OPT-6.7B's fc1 and fc2.
    for (auto [n, k] : {std::pair<int64_t, int64_t>{4096, 4096}, {12288, 4096}, {22016, 4096}, {4096, 11008},
                        {16384, 4096}, {4096, 16384}})
      s.push_back({m, n, k});
  return s;
}

std::vector<GatherShape> default_gather_shapes() {
  std::vector<GatherShape> s;
  // The anchors' table (../shared/docs/anchors-h200.md): OPT-6.7B's and OPT-66B's MLP at both densities.
  for (int64_t d : {4096, 9216})
    for (double density : {0.1, 0.5})
      for (bool up : {true, false})
        for (int64_t b : {16, 64, 256}) s.push_back({up, b, d, 4 * d, density});
  return s;
}

std::vector<RouteShape> default_route_shapes() {
  return {{8, 16384, 4096}, {64, 16384, 8192}, {256, 16384, 12288}, {64, 36864, 18432}};
}

std::vector<HeadRouteShape> default_head_route_shapes() {
  return {{64, 32, 1, 32}, {256, 32, 1, 32}, {64, 32, 4, 8}, {256, 32, 4, 8}};
}

std::vector<KernelRow> bench_attention(Backend& be, const std::vector<AttentionShape>& shapes, const MemoryRates& rates,
                                       const KernelBenchOptions& o,
                                       const std::function<void(const std::string&)>& progress) {
  const DType dt = be.activation_dtype();
  const int64_t bs = o.kv_block_size;
  check(bs >= 1, "the KV block size must be positive");
  std::vector<KernelRow> rows;
  std::mt19937_64 rng(o.seed);
  for (const AttentionShape& s : shapes) {
    const int64_t per_seq = (s.ctx + bs - 1) / bs, blocks = s.batch * per_seq;
    // Every sequence has the full context; its blocks are scattered over the pool as a long-running
    // server's would be, or consecutive.
    std::vector<int32_t> perm(blocks);
    std::iota(perm.begin(), perm.end(), 0);
    if (o.kv_blocks_scattered) std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> pos(s.batch, static_cast<int32_t>(s.ctx - 1)), seq(s.batch), starts(s.batch + 1);
    std::iota(seq.begin(), seq.end(), 0);
    std::iota(starts.begin(), starts.end(), 0);
    StepLayout l;
    l.positions = be.upload(host_i32(pos, {s.batch}), DType::I32);
    l.token_seq = be.upload(host_i32(seq, {s.batch}), DType::I32);
    l.slots = l.token_seq;  // unused by attention
    l.block_tables = be.upload(host_i32(perm, {s.batch, per_seq}), DType::I32);
    l.seq_starts = be.upload(host_i32(starts, {s.batch + 1}), DType::I32);
    l.block_size = bs;
    l.max_ctx = s.ctx;
    l.max_chunk = 1;
    // Small caches are rotated over enough copies to exceed the L2 several times over, as the GEMMs'.
    const double elem = static_cast<double>(dtype_size(dt));
    const double kv_bytes = 2.0 * blocks * bs * s.kv_heads * s.head_dim * elem;
    const int copies = static_cast<int>(std::clamp(256e6 / kv_bytes, 1.0, 8.0));
    std::vector<KVLayer> kv;
    for (int c = 0; c < copies; ++c)
      kv.push_back({be.random_uniform(dt, {blocks, s.kv_heads, bs, s.head_dim}, -1, 1, o.seed + 1 + 2 * c),
                    be.random_uniform(dt, {blocks, s.kv_heads, bs, s.head_dim}, -1, 1, o.seed + 2 + 2 * c)});
    Tensor q = be.random_uniform(dt, {s.batch, s.heads, s.head_dim}, -1, 1, o.seed + 3);
    Tensor out = be.alloc(dt, {s.batch, s.heads, s.head_dim});
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    const std::string name = fmt::format("B{} N{} H{}/{} dh{}", s.batch, s.ctx, s.heads, s.kv_heads, s.head_dim);
    for (double density : o.densities) {
      check(density > 0 && density <= 1, "attention density {} is outside (0, 1]", density);
      // Selective: each sequence keeps a random ascending set of k KV heads, as the routers would pick.
      const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(s.kv_heads)));
      Tensor heads;
      if (k < s.kv_heads) {
        std::vector<int32_t> picks;
        for (int64_t b = 0; b < s.batch; ++b) {
          std::vector<int32_t> all(s.kv_heads);
          std::iota(all.begin(), all.end(), 0);
          std::shuffle(all.begin(), all.end(), rng);
          std::sort(all.begin(), all.begin() + k);
          picks.insert(picks.end(), all.begin(), all.begin() + k);
        }
        heads = be.upload(host_i32(picks, {s.batch, k}), DType::I32);
      }
      const Tensor* sel = heads.defined() ? &heads : nullptr;
      const double ms = time_ms(be, o.reps, [&](int i) { be.attention(q, kv[i % copies], l, scale, 0, out, sel); });
      const double bytes = 2.0 * s.batch * s.ctx * k * s.head_dim * elem + 2.0 * q.nbytes();
      rows.push_back(row("attention", sel ? fmt::format("{} d{:g}", name, density) : name, ms, bytes, rates));
      if (progress) progress(fmt::format("attention {}: {:.3f} ms", rows.back().shape, ms));
    }
  }
  return rows;
}

std::vector<KernelRow> bench_gemm(Backend& be, const std::vector<GemmShape>& shapes, const MemoryRates& rates,
                                  const KernelBenchOptions& o, const std::function<void(const std::string&)>& progress) {
  const DType dt = be.activation_dtype();
  std::vector<KernelRow> rows;
  for (const GemmShape& s : shapes) {
    // Enough weight copies to exceed a 50 MB L2 several times over, used in turn: each timed run reads its
    // weights from HBM, as a decode step does.
    const double w_bytes = static_cast<double>(s.n * s.k * dtype_size(dt));
    const int copies = static_cast<int>(std::clamp(256e6 / w_bytes, 2.0, 16.0));
    std::vector<Tensor> w;
    for (int c = 0; c < copies; ++c) w.push_back(be.random_uniform(dt, {s.n, s.k}, -0.05f, 0.05f, o.seed + 10 + c));
    Tensor x = be.random_uniform(dt, {s.m, s.k}, -1, 1, o.seed + 5);
    Tensor y = be.alloc(dt, {s.m, s.n});
    const double ms = time_ms(be, o.reps, [&](int i) { be.linear(x, w[i % copies], nullptr, y); });
    const double bytes = w_bytes + static_cast<double>(x.nbytes() + y.nbytes());
    rows.push_back(row("gemm", fmt::format("m{} n{} k{}", s.m, s.n, s.k), ms, bytes, rates));
    if (progress) progress(fmt::format("gemm {}: {:.4f} ms", rows.back().shape, ms));
  }
  return rows;
}

std::vector<KernelRow> bench_gather(Backend& be, const std::vector<GatherShape>& shapes, const MemoryRates& rates,
                                    const KernelBenchOptions& o,
                                    const std::function<void(const std::string&)>& progress) {
  const DType dt = be.activation_dtype();
  const double elem = static_cast<double>(dtype_size(dt));
  std::mt19937_64 rng(o.seed);
  std::vector<KernelRow> rows;
  for (const GatherShape& s : shapes) {
    check(s.density > 0 && s.density <= 1, "gather density {} is outside (0, 1]", s.density);
    const int64_t k = mlp_neurons_rounded(
        std::max<int64_t>(1, static_cast<int64_t>(s.density * static_cast<double>(s.D))), s.D);
    const double w_bytes = static_cast<double>(s.D * s.d) * elem;
    const int copies = static_cast<int>(std::clamp(256e6 / (w_bytes * s.density), 2.0, 16.0));
    std::vector<Tensor> w;
    for (int c = 0; c < copies; ++c) w.push_back(be.random_uniform(dt, {s.D, s.d}, -0.05f, 0.05f, o.seed + 20 + c));
    Tensor bias = be.random_uniform(dt, {s.D}, -0.05f, 0.05f, o.seed + 6);
    // A random ascending set of k neurons, as route_neurons would return.
    std::vector<int32_t> all(s.D);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::sort(all.begin(), all.begin() + k);
    Tensor idx = be.upload(host_i32(std::vector<int32_t>(all.begin(), all.begin() + k), {k}), DType::I32);
    const std::string name = fmt::format("B{} d{} D{}", s.batch, s.d, s.D);
    for (bool sparse : {true, false}) {
      const int64_t n = sparse ? k : s.D;
      const Tensor* sel = sparse ? &idx : nullptr;
      Tensor in = be.random_uniform(dt, {s.batch, s.up ? s.d : n}, -1, 1, o.seed + 7);
      Tensor out = be.alloc(dt, {s.batch, s.up ? n : s.d});
      const double ms = time_ms(be, o.reps, [&](int i) {
        if (s.up)
          be.gather_up_relu(in, w[i % copies], &bias, sel, out);
        else
          be.gather_down(in, w[i % copies], sel, nullptr, out, false);
      });
      const double bytes = static_cast<double>(n * s.d) * elem + static_cast<double>(in.nbytes() + out.nbytes()) +
                           (sparse ? 4.0 * k : 0.0);
      rows.push_back(row(s.up ? "gather_up" : "gather_down",
                         sparse ? fmt::format("{} d{:g}", name, s.density) : name + " dense", ms, bytes, rates));
      if (progress) progress(fmt::format("{} {}: {:.4f} ms", rows.back().kernel, rows.back().shape, ms));
    }
  }
  return rows;
}

std::vector<KernelRow> bench_route(Backend& be, const std::vector<RouteShape>& shapes, const MemoryRates& rates,
                                   const KernelBenchOptions& o,
                                   const std::function<void(const std::string&)>& progress) {
  const DType dt = be.activation_dtype();
  std::vector<KernelRow> rows;
  for (const RouteShape& s : shapes) {
    check(s.k >= 1 && s.k <= s.D, "route: {} of {} neurons", s.k, s.D);
    Tensor logits = be.random_uniform(dt, {s.rows, s.D}, -4, 1, o.seed + 8);
    Tensor live = be.upload(host_i32({static_cast<int32_t>(s.rows)}, {1}), DType::I32);
    Tensor idx = be.alloc(DType::I32, {s.k});
    const double ms = time_ms(be, o.reps, [&](int) { be.route_neurons(logits, live, idx); });
    const double bytes = static_cast<double>(logits.nbytes() + idx.nbytes());
    rows.push_back(row("route", fmt::format("R{} D{} k{}", s.rows, s.D, s.k), ms, bytes, rates));
    if (progress) progress(fmt::format("route {}: {:.4f} ms", rows.back().shape, ms));
  }
  return rows;
}

std::vector<KernelRow> bench_route_heads(Backend& be, const std::vector<HeadRouteShape>& shapes,
                                         const MemoryRates& rates, const KernelBenchOptions& o,
                                         const std::function<void(const std::string&)>& progress) {
  std::vector<KernelRow> rows;
  for (const HeadRouteShape& s : shapes) {
    check(s.group >= 1 && s.heads % s.group == 0 && s.k >= 1 && s.k <= s.heads / s.group,
          "route_heads: {} of {} heads in groups of {}", s.k, s.heads, s.group);
    // Scores symmetric around 0, so threshold 0 and c = 0 each keep about half the units.
    Tensor scores = be.random_uniform(be.activation_dtype(), {s.rows, s.heads}, -1, 1, o.seed + 9);
    Tensor idx = be.alloc(DType::I32, {s.rows, s.k});
    const double bytes = static_cast<double>(scores.nbytes() + idx.nbytes());
    for (const char* rule : {"topk", "threshold", "stat-topk"}) {
      const std::string r = rule;
      const HeadCutoff cutoff{.kmin = 1, .value = 0.0f, .row_stat = r == "stat-topk"};
      const HeadCutoff* cut = r == "topk" ? nullptr : &cutoff;
      const double ms = time_ms(be, o.reps, [&](int) { be.route_heads(scores, s.group, idx, cut); });
      rows.push_back(row("route_heads", fmt::format("R{} H{} g{} k{} {}", s.rows, s.heads, s.group, s.k, rule), ms,
                         bytes, rates));
      if (progress) progress(fmt::format("route_heads {}: {:.4f} ms", rows.back().shape, ms));
    }
  }
  return rows;
}

}  // namespace polar
