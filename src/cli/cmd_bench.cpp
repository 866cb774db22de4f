// polar bench: batched decode speed over a sweep of batch sizes and contexts, each point next to its byte
// floor, on a checkpoint (--model) or on a synthetic model of a real shape with random weights (--shape,
// --config); optionally the prefill of one prompt against the GEMM rate. Table or JSON on stdout, CSV and
// a gnuplot PNG on request, progress on stderr. --from-csv re-reads a CSV it wrote (to plot results from
// a machine without gnuplot).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "bench/decode_bench.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "cli/gnuplot.h"

namespace polar::cli {

namespace {

namespace fs = std::filesystem;

constexpr int64_t kPrefillReps = 3;

struct BenchArgs {
  BenchModelOptions source;
  DecodeSweepOptions sweep;
  int64_t prompt_len = 0;
  std::string csv;
  std::string plot;
  std::string from_csv;
  std::string baseline;
  bool json = false;
};

// The result columns after shape, batch and ctx: CSV header and JSON key, and decimals in the table.
struct Column {
  const char* name;
  double DecodePoint::*field;
  int decimals;
};
constexpr Column kColumns[] = {
    {"density", &DecodePoint::density, 2},        {"step_ms", &DecodePoint::step_ms, 3},
    {"tokens_per_s", &DecodePoint::tokens_per_s, 1}, {"floor_ms", &DecodePoint::floor_ms, 3},
    {"x_floor", &DecodePoint::x_floor, 2},        {"gb_per_s", &DecodePoint::gb_per_s, 1},
    {"attention_ms", &DecodePoint::attention_ms, 3}, {"qkv_o_ms", &DecodePoint::qkv_o_ms, 3},
    {"mlp_ms", &DecodePoint::mlp_ms, 3},          {"other_ms", &DecodePoint::other_ms, 3},
    {"profiled_ms", &DecodePoint::profiled_ms, 3},
    // Added after the columns above, so CSVs written before them still read (read_csv).
    {"read_floor_ms", &DecodePoint::read_floor_ms, 3}, {"x_read", &DecodePoint::x_read, 2},
};
// Columns of CSVs written before the read-rate floor (the first ones of kColumns).
constexpr size_t kColumnsBeforeReadFloor = std::size(kColumns) - 2;
int column_width(const Column& c) { return std::max(static_cast<int>(std::strlen(c.name)), 9); }

void write_csv(const std::string& path, const std::string& label, const std::vector<DecodePoint>& points) {
  std::ofstream f(path);
  check(f.good(), "cannot write {}", path);
  f << "shape,batch,ctx";
  for (const Column& c : kColumns) f << ',' << c.name;
  f << '\n';
  for (const DecodePoint& p : points) {
    f << fmt::format("{},{},{}", label, p.batch, p.ctx);
    for (const Column& c : kColumns) f << fmt::format(",{:.6g}", p.*c.field);
    f << '\n';
  }
  check(f.good(), "cannot write {}", path);
}

// The rows of a CSV written by write_csv; every row must carry the same shape label.
std::pair<std::string, std::vector<DecodePoint>> read_csv(const std::string& path) {
  std::ifstream f(path);
  check(f.good(), "cannot read {}", path);
  std::string expected = "shape,batch,ctx", before_read_floor;
  for (size_t i = 0; i < std::size(kColumns); ++i) {
    if (i == kColumnsBeforeReadFloor) before_read_floor = expected;
    expected += fmt::format(",{}", kColumns[i].name);
  }
  std::string line;
  check(std::getline(f, line) && (line == expected || line == before_read_floor),
        "{}: not a polar bench CSV (header should be '{}')", path, expected);
  const size_t columns = line == expected ? std::size(kColumns) : kColumnsBeforeReadFloor;
  std::string label;
  std::vector<DecodePoint> points;
  for (int line_no = 2; std::getline(f, line); ++line_no) {
    if (line.empty()) continue;
    std::vector<std::string> cells;
    for (size_t start = 0;;) {
      const size_t comma = line.find(',', start);
      cells.push_back(line.substr(start, comma - start));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    check(cells.size() == 3 + columns, "{} line {}: {} fields, expected {}", path, line_no, cells.size(), 3 + columns);
    check(label.empty() || cells[0] == label, "{} line {}: shape '{}' after '{}' (one shape per file)", path, line_no,
          cells[0], label);
    label = cells[0];
    auto number = [&](size_t i) {
      char* end = nullptr;
      const double v = std::strtod(cells[i].c_str(), &end);
      check(!cells[i].empty() && *end == '\0' && std::isfinite(v), "{} line {}: '{}' is not a number", path, line_no,
            cells[i]);
      return v;
    };
    DecodePoint p;
    p.batch = static_cast<int64_t>(number(1));
    p.ctx = static_cast<int64_t>(number(2));
    for (size_t i = 0; i < columns; ++i) p.*kColumns[i].field = number(3 + i);
    points.push_back(p);
  }
  check(!points.empty(), "{}: no rows", path);
  return {label, points};
}

// The right-hand panel of a batch-size plot: title, y label, y range and the gnuplot plot clause.
struct Panel {
  const char* title;
  const char* ylabel;
  const char* yrange;
  std::string plot;
};

// Writes `data` (gnuplot data blocks) and two panels side by side against batch size (log scale): decode
// throughput in tokens/s on the left (`throughput`, a plot clause), `right` beside it.
void write_batch_plot(const std::string& path, const std::string& title, const std::string& data,
                      const std::string& throughput, const Panel& right) {
  const std::string script = data + fmt::format(R"(set multiplot layout 1,2 title {}
set logscale x 2
set xlabel 'batch size'
set grid
set key left top
set title 'decode throughput'
set ylabel 'tokens/s'
plot {}
set title '{}'
set ylabel '{}'
set yrange {}
plot {}
unset multiplot
)",
                                                gnuplot_quoted(title), throughput, right.title, right.ylabel,
                                                right.yrange, right.plot);
  run_gnuplot(path, 1400, 520, script);
}

// Two panels against batch size (log scale), one line per context: tokens/s, and the attention share of
// the profiled step.
void write_plot(const std::string& path, const std::string& title, const std::vector<DecodePoint>& points) {
  check(!points.empty(), "nothing to plot in {}: every point was skipped", path);
  std::map<int64_t, std::vector<const DecodePoint*>> by_ctx;
  for (const DecodePoint& p : points) by_ctx[p.ctx].push_back(&p);
  std::string data, throughput, attention;
  for (const auto& [ctx, row] : by_ctx) {
    data += fmt::format("$ctx{} << EOD\n", ctx);
    for (const DecodePoint* p : row)
      data += fmt::format("{} {} {}\n", p->batch, p->tokens_per_s, 100 * p->attention_ms / p->profiled_ms);
    data += "EOD\n";
    const std::string sep = throughput.empty() ? "" : ", ";
    throughput += fmt::format("{}$ctx{} using 1:2 with linespoints title 'ctx {}'", sep, ctx, ctx);
    attention += fmt::format("{}$ctx{} using 1:3 with linespoints title 'ctx {}'", sep, ctx, ctx);
  }
  write_batch_plot(path, title, data, throughput,
                   {"attention share of the profiled step", "attention (% of step time)", "[0:100]", attention});
}

// A sparse sweep beside the dense sweep of the same shape: the points both measured, by (batch, ctx).
struct Comparison {
  const DecodePoint* dense;
  const DecodePoint* sparse;
  double speedup() const { return sparse->tokens_per_s / dense->tokens_per_s; }
  // What a sparse step at its byte floor would give: dense step time over the sparse floor.
  double ideal() const { return dense->step_ms / sparse->floor_ms; }
};

std::vector<Comparison> compare(const std::vector<DecodePoint>& dense, const std::vector<DecodePoint>& sparse) {
  std::vector<Comparison> out;
  for (const DecodePoint& s : sparse)
    for (const DecodePoint& d : dense)
      if (d.batch == s.batch && d.ctx == s.ctx) out.push_back({&d, &s});
  return out;
}

void print_comparison(const std::string& label, const std::vector<Comparison>& rows) {
  fmt::print("{:<12} {:>5} {:>6} {:>7} {:>11} {:>12} {:>7} {:>6} {:>7} {:>7}\n", "shape", "batch", "ctx", "density",
             "dense tok/s", "sparse tok/s", "speedup", "ideal", "x_floor", "x_read");
  for (const Comparison& c : rows)
    fmt::print("{:<12} {:>5} {:>6} {:>7.3g} {:>11.1f} {:>12.1f} {:>7.2f} {:>6.2f} {:>7.2f} {:>7.2f}\n", label,
               c.sparse->batch, c.sparse->ctx, c.sparse->density, c.dense->tokens_per_s, c.sparse->tokens_per_s,
               c.speedup(), c.ideal(), c.sparse->x_floor, c.sparse->x_read);
}

// Two panels against batch size (log scale), one set of lines per context: tokens/s dense and sparse, and
// the measured speedup beside the ideal one.
void write_speedup_plot(const std::string& path, const std::string& title, const std::vector<Comparison>& rows) {
  check(!rows.empty(), "nothing to plot in {}: the two CSVs share no (batch, ctx) point", path);
  std::map<int64_t, std::vector<const Comparison*>> by_ctx;
  for (const Comparison& c : rows) by_ctx[c.sparse->ctx].push_back(&c);
  std::string data, throughput, speedup;
  for (const auto& [ctx, row] : by_ctx) {
    data += fmt::format("$ctx{} << EOD\n", ctx);
    for (const Comparison* c : row)
      data += fmt::format("{} {} {} {} {}\n", c->sparse->batch, c->dense->tokens_per_s, c->sparse->tokens_per_s,
                            c->speedup(), c->ideal());
    data += "EOD\n";
    const std::string sep = throughput.empty() ? "" : ", ";
    throughput += fmt::format("{}$ctx{} using 1:2 with linespoints title 'dense, ctx {}', $ctx{} using 1:3 with "
                              "linespoints title 'sparse (d {:g}), ctx {}'",
                              sep, ctx, ctx, ctx, row.front()->sparse->density, ctx);
    speedup += fmt::format("{}$ctx{} using 1:4 with linespoints title 'measured, ctx {}', $ctx{} using 1:5 with "
                           "lines dashtype 2 title 'ideal (dense step / sparse floor), ctx {}'",
                           sep, ctx, ctx, ctx, ctx);
  }
  write_batch_plot(path, title, data, throughput,
                   {"speedup of sparse over dense decoding", "speedup (x)", "[0:*]",
                    speedup + ", 1 with lines lc rgb 'gray' notitle"});
}

nlohmann::json to_json(const std::string& label, const DecodeSweep& sweep) {
  nlohmann::json rows = nlohmann::json::array(), skipped = nlohmann::json::array();
  for (const DecodePoint& p : sweep.points) {
    nlohmann::json r = {{"shape", label}, {"batch", p.batch}, {"ctx", p.ctx}};
    for (const Column& c : kColumns) r[c.name] = p.*c.field;
    rows.push_back(r);
  }
  for (const SkippedPoint& s : sweep.skipped) skipped.push_back({{"batch", s.batch}, {"ctx", s.ctx}, {"reason", s.reason}});
  return {{"rows", rows}, {"skipped", skipped}};
}

void print_table(const std::string& label, const std::vector<DecodePoint>& points) {
  const int w = std::max(static_cast<int>(label.size()), 5);
  fmt::print("{:<{}} {:>5} {:>6}", "shape", w, "batch", "ctx");
  for (const Column& c : kColumns) fmt::print(" {:>{}}", c.name, column_width(c));
  fmt::print("\n");
  for (const DecodePoint& p : points) {
    fmt::print("{:<{}} {:>5} {:>6}", label, w, p.batch, p.ctx);
    for (const Column& c : kColumns) fmt::print(" {:>{}.{}f}", p.*c.field, column_width(c), c.decimals);
    fmt::print("\n");
  }
}

int run_bench_cmd(const BenchArgs& a) {
  if (!a.baseline.empty()) {
    const auto [label, sparse] = read_csv(a.from_csv);
    const auto [dense_label, dense] = read_csv(a.baseline);
    check(label == dense_label, "{} measures {} but the baseline {} measures {}", a.from_csv, label, a.baseline,
          dense_label);
    const std::vector<Comparison> rows = compare(dense, sparse);
    check(!rows.empty(), "{} and {} share no (batch, ctx) point", a.from_csv, a.baseline);
    if (rows.size() < sparse.size())
      fmt::print(stderr, "{} of {} points have no dense point to compare with\n", sparse.size() - rows.size(), sparse.size());
    print_comparison(label, rows);
    std::fflush(stdout);
    if (!a.plot.empty()) write_speedup_plot(a.plot, fmt::format("{}: sparse vs dense decoding", label), rows);
    return 0;
  }
  if (!a.from_csv.empty()) {
    const auto [label, points] = read_csv(a.from_csv);
    print_table(label, points);
    std::fflush(stdout);
    if (!a.plot.empty()) write_plot(a.plot, fmt::format("{} ({})", label, fs::path(a.from_csv).filename().string()), points);
    return 0;
  }
  const std::string label = a.source.label();
  LoadedModel m = a.source.load(a.sweep.seed);
  load_sparsity(m, a.source.model, /*random_allowed=*/true, a.sweep.seed);
  DecodeSweepOptions sweep_options = a.sweep;
  // A repeated --batch or --ctx adds to the list (1,2 then 2,4): each point is measured once.
  for (std::vector<int64_t>* list : {&sweep_options.batches, &sweep_options.contexts}) {
    std::vector<int64_t> seen;
    for (int64_t v : *list)
      if (std::find(seen.begin(), seen.end(), v) == seen.end()) seen.push_back(v);
    *list = std::move(seen);
  }
  sweep_options.sparsity = m.routers;
  sweep_options.density = m.density;
  Backend& be = *m.backend;
  const ModelConfig& c = m.model->config();
  fmt::print(stderr, "{}: {}\n{:.4g} GB of weights, {:.4g} GB read by every decode step\n", label, c.describe(),
             m.model->weight_bytes() / 1e9, m.model->step_weight_bytes() / 1e9);
  fmt::print(stderr, "measuring memory bandwidth...\n");
  const MemoryRates rates = MemoryRates::measure(be);
  fmt::print(stderr, "copy rate {:.1f} GB/s (read + write), streaming read rate {:.1f} GB/s\n", rates.copy_gbps,
             rates.read_gbps);

  std::optional<PrefillResult> prefill;
  double gemm_gflops = 0;
  if (a.prompt_len > 0) {
    gemm_gflops = measure_gemm_gflops(be, a.prompt_len, c.ffn, c.hidden);
    fmt::print(stderr, "GEMM rate {:.1f} GFLOP/s at {}x{}x{}\n", gemm_gflops, a.prompt_len, c.ffn, c.hidden);
    prefill = run_prefill(*m.model, a.prompt_len, kPrefillReps, gemm_gflops, a.sweep.seed);
  }
  const DecodeSweep sweep =
      run_decode_sweep(*m.model, sweep_options, rates, [](const std::string& s) { fmt::print(stderr, "{}\n", s); });

  report_density_reached(m, "sparse steps (warm-up included)");
  const std::optional<double> reached = density_reached(m);
  // Results first, files after: a failing plot must not lose the numbers.
  const std::string device = fmt::format("{}, {}", be.name(), dtype_name(be.activation_dtype()));
  if (a.json) {
    nlohmann::json j = to_json(label, sweep);
    if (reached) j["density_reached"] = *reached;
    j.update({{"shape", label}, {"config", c.describe()}, {"device", device}, {"memory_gb_per_s", rates.copy_gbps},
              {"read_gb_per_s", rates.read_gbps},
              {"weight_bytes", m.model->weight_bytes()}, {"step_weight_bytes", m.model->step_weight_bytes()},
              {"warmup_steps", kWarmupSteps}, {"timed_steps", a.sweep.steps}});
    if (prefill)
      j["prefill"] = {{"prompt_len", prefill->prompt_len}, {"ms", prefill->ms}, {"tokens_per_s", prefill->tokens_per_s},
                      {"floor_ms", prefill->floor_ms}, {"x_floor", prefill->x_floor},
                      {"gflop_per_s", prefill->gflop_per_s}, {"gemm_gflop_per_s", gemm_gflops}};
    fmt::print("{}\n", j.dump(1));
  } else {
    if (prefill)
      fmt::print("prefill of {} tokens: {:.3f} ms, {:.1f} tokens/s, floor {:.3f} ms, x_floor {:.2f}, {:.1f} GFLOP/s\n",
                 prefill->prompt_len, prefill->ms, prefill->tokens_per_s, prefill->floor_ms, prefill->x_floor,
                 prefill->gflop_per_s);
    print_table(label, sweep.points);
  }
  std::fflush(stdout);
  if (!a.csv.empty()) write_csv(a.csv, label, sweep.points);
  if (!a.plot.empty()) write_plot(a.plot, fmt::format("{} on {}", label, device), sweep.points);
  return 0;
}

}  // namespace

Command bench_command() {
  auto a = std::make_shared<BenchArgs>();
  return {"bench",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("bench", "Time batched decode over batch sizes and contexts against the byte floor");
            c->footer(
                "Each point runs --batch sequences whose KV cache holds random values, starting at ctx - (3 warm-up + 1 "
                "profiled + --steps) positions, so the last timed step attends over ctx positions.\n"
                "step_ms: median host wall time of a timed step (forward, argmax on the device, the ids on the host).\n"
                "floor_ms: (weight bytes read in full + KV bytes read) / measured memory bandwidth (CUDA: "
                "device-to-device copy, read + write); x_floor = step_ms / floor_ms; gb_per_s: those bytes / step_ms.\n"
                "read_floor_ms: the same bytes / the measured streaming read rate (a read-only kernel), the step's "
                "physical limit; x_read = step_ms / read_floor_ms.\n"
                "attention_ms, qkv_o_ms, mlp_ms, other_ms: device time per region of the profiled step, run op by op "
                "without graphs; they add up to profiled_ms, not to step_ms.\n"
                "Points beyond the model's context or the free device memory are skipped with a note on stderr.\n");
            a->source.add(*c);
            c->add_option("--batch", a->sweep.batches, "Batch sizes, e.g. 1,8,32")->delimiter(',')->capture_default_str();
            c->add_option("--ctx", a->sweep.contexts, "Context lengths, e.g. 512,1024")->delimiter(',')->capture_default_str();
            c->add_option("--steps,--decode-steps", a->sweep.steps, "Timed decode steps per point")
                ->capture_default_str()
                ->check(above(0));
            c->add_option("--prompt-len", a->prompt_len, "Also time the prefill of one prompt this long (0: no prefill)")
                ->capture_default_str()
                ->check(at_least(0));
            c->add_option("--seed", a->sweep.seed, "Seed of the random weights, tokens and KV cache")->capture_default_str();
            c->add_option("--csv", a->csv, "Also write the rows to this CSV file");
            c->add_option("--plot", a->plot, "Also plot tokens/s and the attention share against batch size to this PNG");
            c->add_flag("--json", a->json, "Print JSON instead of a table");
            CLI::Option* from_csv =
                c->add_option("--from-csv", a->from_csv,
                              "Print (and with --plot, plot) the rows of a CSV that --csv wrote, instead of measuring");
            for (const char* source : {"--model", "--shape", "--config"}) from_csv->excludes(c->get_option(source));
            c->add_option("--baseline", a->baseline,
                          "With --from-csv (a sparse sweep): the dense sweep's CSV to compare with; prints the "
                          "speedup and the ideal speedup per point, and --plot draws them")
                ->needs(from_csv);
          },
          [a] { return run_bench_cmd(*a); }};
}

}  // namespace polar::cli
