// polar bench-kernels: decode attention and decode GEMMs alone, against their byte floors.
#include <fmt/core.h>

#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "bench/kernel_bench.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace polar::cli {

namespace {

struct KernelArgs {
  std::string device = "cuda";
  std::string dtype = "f16";
  std::string sparse_mlp = "fastest";
  std::vector<std::string> attention, gemm, gather, route, route_heads;
  KernelBenchOptions bench;
  std::string kv_blocks = "scattered";
  std::string csv;
  bool json = false;
};

// "64x1920x32x8x128" -> {64, 1920, 32, 8, 128}; the count of fields must be `n`.
std::vector<int64_t> parse_dims(const std::string& s, size_t n, const char* what) {
  std::vector<int64_t> v;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t end = std::min(s.find('x', pos), s.size());
    const std::string part = s.substr(pos, end - pos);
    check(!part.empty() && part.find_first_not_of("0123456789") == std::string::npos && part.size() < 10,
          "bad {} shape '{}': expected {} positive integers joined by 'x'", what, s, n);
    v.push_back(std::stoll(part));
    check(v.back() > 0, "bad {} shape '{}': dimensions must be positive", what, s);
    pos = end + 1;
  }
  check(v.size() == n, "bad {} shape '{}': expected {} positive integers joined by 'x'", what, s, n);
  return v;
}

// "up:16x9216x36864:0.5" -> up, batch 16, d 9216, D 36864, density 0.5.
GatherShape parse_gather(const std::string& s) {
  const size_t a = s.find(':'), b = s.rfind(':');
  check(a != std::string::npos && b > a, "bad gather shape '{}': expected up|down:BxdxD:DENSITY", s);
  const std::string kind = s.substr(0, a);
  check(kind == "up" || kind == "down", "bad gather shape '{}': the kind must be up or down", s);
  const auto d = parse_dims(s.substr(a + 1, b - a - 1), 3, "gather");
  const std::string text = s.substr(b + 1);
  char* end = nullptr;
  const double density = std::strtod(text.c_str(), &end);
  check(!text.empty() && *end == '\0', "bad gather shape '{}': the density '{}' is not a number", s, text);
  check(density > 0 && density <= 1, "bad gather shape '{}': the density must be in (0, 1]", s);
  return {kind == "up", d[0], d[1], d[2], density};
}

int run(const KernelArgs& a) {
  auto be = make_backend(a.device, a.dtype == "bf16" ? DType::BF16 : DType::F16, sparse_mlp_path(a.sparse_mlp));
  std::vector<AttentionShape> att;
  std::vector<GemmShape> gemm;
  for (const auto& s : a.attention) {
    auto d = parse_dims(s, 5, "attention");
    check(d[2] % d[3] == 0, "bad attention shape '{}': heads must be a multiple of KV heads", s);
    att.push_back({d[0], d[1], d[2], d[3], d[4]});
  }
  for (const auto& s : a.gemm) {
    auto d = parse_dims(s, 3, "gemm");
    gemm.push_back({d[0], d[1], d[2]});
  }
  std::vector<GatherShape> gather;
  for (const auto& s : a.gather) gather.push_back(parse_gather(s));
  std::vector<RouteShape> route;
  for (const auto& s : a.route) {
    auto d = parse_dims(s, 3, "route");
    check(d[2] <= d[1], "bad route shape '{}': k must be at most D", s);
    route.push_back({d[0], d[1], d[2]});
  }
  std::vector<HeadRouteShape> head_route;
  for (const auto& s : a.route_heads) {
    auto d = parse_dims(s, 4, "route-heads");
    check(d[2] >= 1 && d[1] % d[2] == 0 && d[3] >= 1 && d[3] <= d[1] / d[2],
          "bad route-heads shape '{}': GROUP must divide H and K be at most H / GROUP", s);
    head_route.push_back({d[0], d[1], d[2], d[3]});
  }
  if (a.attention.empty() && a.gemm.empty() && a.gather.empty() && a.route.empty() && a.route_heads.empty()) {
    att = default_attention_shapes();
    gemm = default_gemm_shapes();
    gather = default_gather_shapes();
    route = default_route_shapes();
    head_route = default_head_route_shapes();
  }
  KernelBenchOptions bench = a.bench;
  bench.kv_blocks_scattered = a.kv_blocks == "scattered";
  fmt::print(stderr, "measuring memory bandwidth on {}...\n", be->name());
  const MemoryRates rates = MemoryRates::measure(*be);
  fmt::print(stderr, "copy rate {:.0f} GB/s (read + write), streaming read rate {:.0f} GB/s\n", rates.copy_gbps,
             rates.read_gbps);
  auto progress = [](const std::string& s) { fmt::print(stderr, "{}\n", s); };
  std::vector<KernelRow> rows = bench_attention(*be, att, rates, bench, progress);
  for (auto& r : bench_gemm(*be, gemm, rates, bench, progress)) rows.push_back(r);
  for (auto& r : bench_gather(*be, gather, rates, bench, progress)) rows.push_back(r);
  for (auto& r : bench_route(*be, route, rates, bench, progress)) rows.push_back(r);
  for (auto& r : bench_route_heads(*be, head_route, rates, bench, progress)) rows.push_back(r);
  if (!a.csv.empty()) {
    std::ofstream f(a.csv);
    check(f.good(), "cannot write {}", a.csv);
    f << "kernel,shape,ms,bytes,gb_per_s,of_copy,of_read\n";
    for (auto& r : rows)
      f << fmt::format("{},{},{:.5f},{:.0f},{:.1f},{:.3f},{:.3f}\n", r.kernel, r.shape, r.ms, r.bytes, r.gbps, r.of_copy,
                       r.of_read);
    check(f.good(), "writing {} failed", a.csv);
  }
  if (a.json) {
    nlohmann::json j = nlohmann::json::array();
    for (auto& r : rows)
      j.push_back({{"kernel", r.kernel}, {"shape", r.shape}, {"ms", r.ms}, {"bytes", r.bytes}, {"gb_per_s", r.gbps},
                   {"of_copy", r.of_copy}, {"of_read", r.of_read}});
    fmt::print("{}\n", nlohmann::json{{"device", be->name()},
                                      {"copy_gb_per_s", rates.copy_gbps},
                                      {"read_gb_per_s", rates.read_gbps},
                                      {"rows", j}}
                           .dump(1));
    return 0;
  }
  fmt::print("{:<11} {:<28} {:>10} {:>10} {:>9} {:>9}\n", "kernel", "shape", "ms", "GB/s", "of read", "of copy");
  for (auto& r : rows)
    fmt::print("{:<11} {:<28} {:>10.4f} {:>10.0f} {:>8.0f}% {:>8.0f}%\n", r.kernel, r.shape, r.ms, r.gbps,
               100 * r.of_read, 100 * r.of_copy);
  return 0;
}

}  // namespace

Command bench_kernels_command() {
  auto a = std::make_shared<KernelArgs>();
  return {"bench-kernels",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("bench-kernels",
                                         "Time decode attention, GEMMs, sparse MLP gather GEMMs and neuron routing alone against their byte floors");
            c->add_option("--device", a->device, "cpu or cuda[:N]")->capture_default_str();
            c->add_option("--dtype", a->dtype, "f16 or bf16 (CUDA)")->capture_default_str()->check(CLI::IsMember({"f16", "bf16"}));
            add_sparse_mlp_option(*c, a->sparse_mlp);
            c->add_option("--attention", a->attention, "Attention shapes BxNxHxHkvxDH (default: a built-in table)")
                ->delimiter(',');
            c->add_option("--density", a->bench.densities,
                          "Attention head densities, e.g. 1,0.5,0.3 (below 1: the selective kernel over random "
                          "KV heads per sequence)")
                ->delimiter(',')
                ->capture_default_str();
            c->add_option("--kv-block-size", a->bench.kv_block_size, "Attention rows: tokens per KV cache block")
                ->capture_default_str()
                ->check(CLI::Range(1, 4096));
            c->add_option("--kv-blocks", a->kv_blocks,
                          "Attention rows: each sequence's cache blocks scattered over the pool (a long-running "
                          "server's cache) or contiguous (a fresh one's; nearest a [B, Hkv, N, dh] cache)")
                ->capture_default_str()
                ->check(CLI::IsMember({"scattered", "contiguous"}));
            c->add_option("--gemm", a->gemm, "GEMM shapes MxNxK, y[M,N] = x[M,K]·w[N,K]ᵀ (default: a built-in table)")
                ->delimiter(',');
            c->add_option("--gather", a->gather,
                          "Sparse MLP gather GEMMs up|down:BxdxD:DENSITY, e.g. up:16x9216x36864:0.5, each beside "
                          "its dense layer (default: a built-in table)")
                ->delimiter(',');
            c->add_option("--route", a->route, "route_neurons shapes RxDxK: the K best of D neurons over R rows")
                ->delimiter(',');
            c->add_option("--route-heads", a->route_heads,
                          "route_heads shapes RxHxGROUPxK, each timed for top-k, a threshold and statistical top-k "
                          "(issue 19's selection rules) in lists of width K (default: a built-in table)")
                ->delimiter(',');
            c->add_option("--reps", a->bench.reps, "Timed repetitions per shape")->capture_default_str()
                ->check(above(0));
            c->add_option("--csv", a->csv, "Also write the rows to this CSV file");
            c->add_flag("--json", a->json, "Print JSON instead of a table");
          },
          [a] { return run(*a); }};
}

}  // namespace polar::cli
