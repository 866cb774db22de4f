// polar bench: prefill and batched decode speed of a model, each next to its hardware floor.
#include <fmt/core.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "bench/decode_bench.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace polar::cli {

namespace {
struct BenchArgs {
  ModelOptions model;
  BenchOptions bench;
  std::string csv;
  bool json = false;
};

int run_bench_cmd(const BenchArgs& a) {
  check(a.model.device == "cpu", "polar bench runs on --device cpu in this version");
  LoadedModel m = load_model(a.model);
  const ModelConfig& c = m.model->config();
  fmt::print(stderr, "measuring host memory bandwidth and GEMM rate...\n");
  HostRoofline roof = measure_host_roofline(a.bench.prompt_len, c.ffn, c.hidden);
  fmt::print(stderr, "read bandwidth {:.1f} GB/s, sgemm {:.1f} GFLOP/s ({}x{}x{})\n", roof.read_gbps, roof.gemm_gflops,
             a.bench.prompt_len, c.ffn, c.hidden);
  auto rows = run_bench(*m.model, a.bench, roof, [](const std::string& s) { fmt::print(stderr, "{}\n", s); });
  if (!a.csv.empty()) {
    std::ofstream f(a.csv);
    check(f.good(), "cannot write {}", a.csv);
    f << "phase,batch,ctx,ms,tokens_per_s,floor_ms,x_floor,achieved\n";
    for (auto& r : rows)
      f << fmt::format("{},{},{},{:.4f},{:.2f},{:.4f},{:.3f},{:.2f}\n", r.phase, r.batch, r.ctx, r.ms, r.tokens_per_s,
                       r.floor_ms, r.x_floor, r.achieved);
  }
  if (a.json) {
    nlohmann::json j = nlohmann::json::array();
    for (auto& r : rows)
      j.push_back({{"phase", r.phase}, {"batch", r.batch}, {"ctx", r.ctx}, {"ms", r.ms}, {"tokens_per_s", r.tokens_per_s},
                   {"floor_ms", r.floor_ms}, {"x_floor", r.x_floor},
                   {r.phase == "decode" ? "gb_per_s" : "gflop_per_s", r.achieved}});
    fmt::print("{}\n", nlohmann::json{{"model", a.model.model}, {"read_gb_per_s", roof.read_gbps},
                                      {"sgemm_gflop_per_s", roof.gemm_gflops}, {"weight_bytes_per_step",
                                      m.model->step_weight_bytes()}, {"rows", j}}.dump(1));
    return 0;
  }
  fmt::print("{:<8} {:>5} {:>5} {:>10} {:>10} {:>10} {:>8} {:>12}\n", "phase", "batch", "ctx", "ms", "tok/s", "floor_ms",
             "x_floor", "achieved");
  for (auto& r : rows)
    fmt::print("{:<8} {:>5} {:>5} {:>10.2f} {:>10.1f} {:>10.2f} {:>8.2f} {:>7.1f} {}\n", r.phase, r.batch, r.ctx, r.ms,
               r.tokens_per_s, r.floor_ms, r.x_floor, r.achieved, r.phase == "decode" ? "GB/s" : "GFLOP/s");
  return 0;
}
}  // namespace

Command bench_command() {
  auto a = std::make_shared<BenchArgs>();
  return {"bench",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("bench", "Measure prefill and batched decode speed against the hardware floor");
            a->model.add(*c);
            c->add_option("--batch", a->bench.batches, "Decode batch sizes, e.g. 1,8")->delimiter(',')->capture_default_str();
            c->add_option("--prompt-len", a->bench.prompt_len, "Prefill length = decode context")->capture_default_str()
                ->check(CLI::PositiveNumber);
            c->add_option("--decode-steps", a->bench.decode_steps, "Timed decode steps per batch size")
                ->capture_default_str()->check(CLI::PositiveNumber);
            c->add_option("--seed", a->bench.seed, "Seed of the random prompts")->capture_default_str();
            c->add_option("--csv", a->csv, "Also write the rows to this CSV file");
            c->add_flag("--json", a->json, "Print JSON instead of a table");
          },
          [a] { return run_bench_cmd(*a); }};
}

}  // namespace polar::cli
