// polar bench-serve: the serving benchmark (bench/serve_bench.h). A workload of requests is served by the
// continuous-batching scheduler at each --request-rate, dense and, with sparsity, sparse in the same process
// (same requests, same device), and the latency percentiles and throughputs are reported: table on stdout,
// --json, --csv, --plot; progress on stderr.
#include <charconv>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "bench/serve_bench.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "cli/gnuplot.h"
#ifdef POLAR_HAVE_SERVE
#include "serve/http_bench.h"
#endif

namespace polar::cli {

namespace {

struct BenchServeArgs {
  BenchModelOptions source;
  ServeWorkloadOptions workload;
  std::string prompt_len = "128", output_len = "128";
  std::string dataset;
  std::vector<std::string> rates = {"inf"};
  BatchingOptions batching;
  int64_t warmup = 8;
  bool sparse_only = false;
  bool json = false;
  std::string csv, plot, from_csv;
  std::string url;
};

// "N" or "LO-HI" (uniform over [LO, HI]).
LengthRange parse_range(const std::string& flag, const std::string& s) {
  auto number = [&](std::string_view v) {
    int64_t x = 0;
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
    check(ec == std::errc() && end == v.data() + v.size() && x >= 1, "{}: '{}' is not N or LO-HI with 1 <= LO <= HI",
          flag, s);
    return x;
  };
  const size_t dash = s.find('-');
  const LengthRange r = dash == std::string::npos
                            ? LengthRange{number(s), number(s)}
                            : LengthRange{number(std::string_view(s).substr(0, dash)),
                                          number(std::string_view(s).substr(dash + 1))};
  check(r.lo <= r.hi, "{}: '{}' is not N or LO-HI with 1 <= LO <= HI", flag, s);
  return r;
}

constexpr double kAllAtOnce = std::numeric_limits<double>::infinity();

double parse_rate(const std::string& s) {
  if (s == "inf") return kAllAtOnce;
  double r = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), r);
  check(ec == std::errc() && end == s.data() + s.size() && r > 0 && std::isfinite(r),
        "--request-rate: '{}' is not a positive number of requests per second or inf", s);
  return r;
}

std::string rate_name(double rate) { return std::isinf(rate) ? "inf" : fmt::format("{:g}", rate); }

// The columns of the table, the CSV and the JSON rows: name, value, decimals in the table.
struct Field {
  const char* name;
  double (*get)(const ServeResult&);
  int decimals;
};
const Field kFields[] = {
    {"requests", [](const ServeResult& r) { return static_cast<double>(r.requests); }, 0},
    {"duration_s", [](const ServeResult& r) { return r.duration_s; }, 1},
    {"req_per_s", [](const ServeResult& r) { return r.request_throughput; }, 2},
    {"output_tok_per_s", [](const ServeResult& r) { return r.output_tokens_per_s; }, 0},
    {"total_tok_per_s", [](const ServeResult& r) { return r.total_tokens_per_s; }, 0},
    {"ttft_p50_ms", [](const ServeResult& r) { return r.ttft_ms.p50; }, 1},
    {"ttft_p90_ms", [](const ServeResult& r) { return r.ttft_ms.p90; }, 1},
    {"ttft_p99_ms", [](const ServeResult& r) { return r.ttft_ms.p99; }, 1},
    {"tpot_p50_ms", [](const ServeResult& r) { return r.tpot_ms.p50; }, 2},
    {"tpot_p90_ms", [](const ServeResult& r) { return r.tpot_ms.p90; }, 2},
    {"tpot_p99_ms", [](const ServeResult& r) { return r.tpot_ms.p99; }, 2},
    {"itl_p50_ms", [](const ServeResult& r) { return r.itl_ms.p50; }, 2},
    {"itl_p90_ms", [](const ServeResult& r) { return r.itl_ms.p90; }, 2},
    {"itl_p99_ms", [](const ServeResult& r) { return r.itl_ms.p99; }, 2},
    {"e2e_p50_ms", [](const ServeResult& r) { return r.e2e_ms.p50; }, 0},
    {"e2e_p99_ms", [](const ServeResult& r) { return r.e2e_ms.p99; }, 0},
    {"mean_batch", [](const ServeResult& r) { return r.mean_batch; }, 1},
    {"mean_step_ms", [](const ServeResult& r) { return r.mean_step_ms; }, 2},
    {"decode_step_ms", [](const ServeResult& r) { return r.mean_decode_step_ms; }, 2},
    {"mixed_step_ms", [](const ServeResult& r) { return r.mean_mixed_step_ms; }, 2},
    {"sched_pct", [](const ServeResult& r) { return 100 * r.schedule_share; }, 2},
    {"preemptions", [](const ServeResult& r) { return static_cast<double>(r.stats.preemptions); }, 0},
    {"steps", [](const ServeResult& r) { return static_cast<double>(r.stats.steps); }, 0},
    {"decode_only_steps", [](const ServeResult& r) { return static_cast<double>(r.stats.decode_only_steps); }, 0},
    {"mixed_steps", [](const ServeResult& r) { return static_cast<double>(r.stats.mixed_steps); }, 0},
    {"prefill_only_steps", [](const ServeResult& r) { return static_cast<double>(r.stats.prefill_only_steps); }, 0},
    {"graphs_captured", [](const ServeResult& r) { return static_cast<double>(r.graphs_captured); }, 0},
};
constexpr size_t kNumFields = std::size(kFields);
// The table shows these; the CSV and JSON all of kFields.
const char* const kTableFields[] = {"req_per_s",   "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                                    "tpot_p99_ms", "itl_p99_ms",       "mean_batch",  "preemptions", "sched_pct"};

size_t field_index(std::string_view name) {
  for (size_t i = 0; i < kNumFields; ++i)
    if (name == kFields[i].name) return i;
  fail("no field {}", name);
}

// One measured run as the table, CSV and plot see it (also read back from a CSV): kFields' values.
struct Row {
  std::string mode;  // dense or sparse
  double rate = 0;
  std::vector<double> values;
  double operator[](std::string_view field) const { return values[field_index(field)]; }
};

Row row_of(const std::string& mode, const ServeResult& r) {
  Row row{mode, r.rate, {}};
  for (const Field& f : kFields) row.values.push_back(f.get(r));
  return row;
}

void print_table(const std::string& label, const std::vector<Row>& rows) {
  auto width = [](const char* name) { return std::max<size_t>(std::strlen(name), 7); };
  fmt::print("{:<12} {:<6} {:>5}", "shape", "mode", "rate");
  for (const char* name : kTableFields) fmt::print(" {:>{}}", name, width(name));
  fmt::print("\n");
  for (const Row& row : rows) {
    fmt::print("{:<12} {:<6} {:>5}", label, row.mode, rate_name(row.rate));
    for (const char* name : kTableFields)
      fmt::print(" {:>{}.{}f}", row[name], width(name), kFields[field_index(name)].decimals);
    fmt::print("\n");
  }
}

// Sparse against dense at each rate both measured.
struct Comparison {
  double rate;
  double output_throughput_ratio, ttft_p99_ratio, tpot_p50_ratio;  // sparse / dense
};
std::vector<Comparison> compare(const std::vector<Row>& rows) {
  std::vector<Comparison> out;
  for (const Row& s : rows)
    for (const Row& d : rows)
      if (s.mode == "sparse" && d.mode == "dense" && s.rate == d.rate)
        out.push_back({s.rate, s["output_tok_per_s"] / d["output_tok_per_s"], s["ttft_p99_ms"] / d["ttft_p99_ms"],
                       s["tpot_p50_ms"] / d["tpot_p50_ms"]});
  return out;
}

void print_comparisons(const std::vector<Comparison>& comparisons) {
  for (const Comparison& x : comparisons)
    fmt::print("sparse vs dense at rate {}: output tokens/s x{:.3f}, TTFT p99 x{:.3f}, TPOT p50 x{:.3f}\n",
               rate_name(x.rate), x.output_throughput_ratio, x.ttft_p99_ratio, x.tpot_p50_ratio);
}

std::string csv_header() {
  std::string h = "shape,mode,rate";
  for (const Field& f : kFields) h += fmt::format(",{}", f.name);
  return h;
}

void write_csv(const std::string& path, const std::string& label, const std::vector<Row>& rows) {
  std::ofstream f(path);
  check(f.good(), "cannot write {}", path);
  f << csv_header() << '\n';
  for (const Row& row : rows) {
    f << fmt::format("{},{},{}", label, row.mode, rate_name(row.rate));
    for (double v : row.values) f << fmt::format(",{:.6g}", v);
    f << '\n';
  }
  check(f.good(), "cannot write {}", path);
}

// The rows of a CSV that write_csv wrote, and its shape label.
std::pair<std::string, std::vector<Row>> read_csv(const std::string& path) {
  std::ifstream f(path);
  check(f.good(), "cannot read {}", path);
  std::string line;
  check(std::getline(f, line) && line == csv_header(), "{}: not a polar bench-serve CSV (header should be '{}')", path,
        csv_header());
  std::string label;
  std::vector<Row> rows;
  for (int line_no = 2; std::getline(f, line); ++line_no) {
    if (line.empty()) continue;
    std::vector<std::string> cells;
    std::stringstream cells_in(line);
    for (std::string cell; std::getline(cells_in, cell, ',');) cells.push_back(cell);
    check(cells.size() == 3 + kNumFields, "{} line {}: {} fields, expected {}", path, line_no, cells.size(),
          3 + kNumFields);
    check(label.empty() || cells[0] == label, "{} line {}: shape '{}' after '{}' (one shape per file)", path, line_no,
          cells[0], label);
    check(cells[1] == "dense" || cells[1] == "sparse" || cells[1] == "http",
          "{} line {}: mode '{}' is not dense, sparse or http", path, line_no, cells[1]);
    label = cells[0];
    Row row{cells[1], parse_rate(cells[2]), {}};
    for (size_t i = 3; i < cells.size(); ++i) {
      double v = 0;
      const auto [end, ec] = std::from_chars(cells[i].data(), cells[i].data() + cells[i].size(), v);
      check(ec == std::errc() && end == cells[i].data() + cells[i].size(), "{} line {}: '{}' is not a number", path,
            line_no, cells[i]);
      row.values.push_back(v);
    }
    rows.push_back(std::move(row));
  }
  check(!rows.empty(), "{}: no rows", path);
  return {label, rows};
}

// Three panels against the offered request rate, one line per mode: output tokens/s, TTFT p50/p99 and TPOT
// p50/p99. Rates are placed in the order given (inf, all at once, among them), labelled by value.
void write_plot(const std::string& path, const std::string& title, const std::vector<Row>& rows) {
  std::string data, throughput, ttft, tpot;
  for (const char* mode : {"dense", "sparse", "http"}) {
    std::string block;
    for (const Row& row : rows)
      if (row.mode == mode)
        block += fmt::format("{} {} {} {} {} {}\n", rate_name(row.rate), row["output_tok_per_s"], row["ttft_p50_ms"],
                             row["ttft_p99_ms"], row["tpot_p50_ms"], row["tpot_p99_ms"]);
    if (block.empty()) continue;
    data += fmt::format("${} << EOD\n{}EOD\n", mode, block);
    const std::string sep = throughput.empty() ? "" : ", ";
    throughput += fmt::format("{}${} using 0:2:xtic(1) with linespoints title '{}'", sep, mode, mode);
    ttft += fmt::format("{0}${1} using 0:3:xtic(1) with linespoints title '{1} p50', ${1} using 0:4:xtic(1) with "
                        "linespoints dashtype 2 title '{1} p99'",
                        sep, mode);
    tpot += fmt::format("{0}${1} using 0:5:xtic(1) with linespoints title '{1} p50', ${1} using 0:6:xtic(1) with "
                        "linespoints dashtype 2 title '{1} p99'",
                        sep, mode);
  }
  const std::string script = data + fmt::format(R"(set multiplot layout 1,3 title {}
set xlabel 'request rate (requests/s; inf: all at once)'
set grid
set key left top
set offsets 0.2, 0.2, 0, 0
set title 'output throughput'
set ylabel 'output tokens/s'
set yrange [0:*]
plot {}
set title 'time to first token'
set ylabel 'TTFT (ms)'
plot {}
set title 'time per output token'
set ylabel 'TPOT (ms)'
plot {}
unset multiplot
)",
                                                gnuplot_quoted(title), throughput, ttft, tpot);
  run_gnuplot(path, 1800, 520, script);
}

nlohmann::json run_json(const std::string& mode, const ServeResult& r) {
  nlohmann::json j = {{"mode", mode}, {"rate", rate_name(r.rate)}};
  for (const Field& f : kFields) j[f.name] = f.get(r);
  auto pct = [](const Percentiles& p) { return nlohmann::json{{"mean", p.mean}, {"p50", p.p50}, {"p90", p.p90}, {"p99", p.p99}}; };
  j["ttft_ms"] = pct(r.ttft_ms);
  j["tpot_ms"] = pct(r.tpot_ms);
  j["itl_ms"] = pct(r.itl_ms);
  j["e2e_ms"] = pct(r.e2e_ms);
  j["prompt_tokens"] = r.prompt_tokens;
  j["output_tokens"] = r.output_tokens;
  // Prefix caching (in-process runs): prompt tokens looked up and found cached, not computed.
  j["prefix_query_tokens"] = r.stats.prefix_query_tokens;
  j["prefix_hit_tokens"] = r.stats.prefix_hit_tokens;
  return j;
}

// The prompt corpus of --dataset: a plain text file, tokenized whole.
std::vector<int32_t> dataset_tokens(const LoadedModel& m, const std::string& path) {
  const Tokenizer& tok = m.tokenizer();
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot open --dataset {}", path);
  std::stringstream text;
  text << in.rdbuf();
  return tok.encode(text.str(), /*add_bos=*/false);
}

// The results of the runs: table or JSON on stdout, CSV and plot on request.
void report(const BenchServeArgs& a, const ServeWorkloadOptions& w, const std::string& label, const std::string& config,
            const std::string& device, double density, int64_t kv_tokens,
            const std::vector<std::pair<std::string, ServeResult>>& runs) {
  std::vector<Row> rows;
  for (const auto& [mode, r] : runs) rows.push_back(row_of(mode, r));
  const std::vector<Comparison> comparisons = compare(rows);
  if (a.json) {
    nlohmann::json js = nlohmann::json::array(), cmp = nlohmann::json::array();
    for (const auto& [mode, r] : runs) js.push_back(run_json(mode, r));
    for (const Comparison& x : comparisons)
      cmp.push_back({{"rate", rate_name(x.rate)},
                     {"output_throughput_ratio", x.output_throughput_ratio},
                     {"ttft_p99_ratio", x.ttft_p99_ratio},
                     {"tpot_p50_ratio", x.tpot_p50_ratio}});
    fmt::print("{}\n", nlohmann::json{{"shape", label},
                                      {"config", config},
                                      {"device", device},
                                      {"density", density},
                                      {"workload",
                                       {{"requests", w.requests},
                                        {"prompt_len", a.prompt_len},
                                        {"prefix_len", w.shared_prefix},
                                        {"output_len", a.output_len},
                                        {"dataset", a.dataset},
                                        {"seed", w.seed}}},
                                      {"max_seqs", a.batching.max_seqs},
                                      {"max_batch_tokens", a.batching.max_batch_tokens},
                                      {"kv_tokens", kv_tokens},
                                      {"prefix_caching", a.batching.prefix_caching},
                                      {"warmup_requests", std::min(a.warmup, w.requests)},
                                      {"runs", js},
                                      {"sparse_vs_dense", cmp}}
                               .dump(1));
  } else {
    print_table(label, rows);
    print_comparisons(comparisons);
  }
  std::fflush(stdout);
  if (!a.csv.empty()) write_csv(a.csv, label, rows);
  if (!a.plot.empty())
    write_plot(a.plot, fmt::format("{} on {}: {} requests, prompts {}{}, outputs {}", label, device, w.requests,
                                   a.prompt_len, w.shared_prefix ? fmt::format(" after a shared {}", w.shared_prefix) : "",
                                   a.output_len),
               rows);
}


// The untimed warm-up before a mode's (or a server's) timed runs: the first `warmup` requests of the
// workload, all at once, 16 output tokens each.
std::vector<ServeRequestSpec> warmup_workload(const ServeWorkloadOptions& w, int64_t warmup, int64_t vocab_size) {
  ServeWorkloadOptions warm = w;
  warm.requests = std::min(warmup, w.requests);
  warm.output = {std::min<int64_t>(16, w.output.lo), std::min<int64_t>(16, w.output.lo)};
  return make_serve_workload(warm, vocab_size, kAllAtOnce);
}

int run_bench_serve(BenchServeArgs& a) {
  ServeWorkloadOptions w = a.workload;
  w.prompt = parse_range("--prompt-len", a.prompt_len);
  w.output = parse_range("--output-len", a.output_len);
  std::vector<double> rates;
  for (const std::string& r : a.rates) rates.push_back(parse_rate(r));
  const std::string label = a.source.label();
  LoadedModel m = a.source.load(w.seed);
  load_sparsity(m, a.source.model, /*random_allowed=*/true, w.seed);
  check(!a.sparse_only || m.sparsity, "--sparse-only needs sparsity (--routers or --density below 1)");
  const ModelConfig& c = m.model->config();
  check(w.shared_prefix + w.prompt.hi + w.output.hi <= c.max_positions,
        "the longest request ({} prompt + {} output tokens) exceeds the model's context length of {}",
        w.shared_prefix + w.prompt.hi, w.output.hi, c.max_positions);
  if (!a.dataset.empty()) {
    fmt::print(stderr, "tokenizing {}...\n", a.dataset);
    w.corpus = dataset_tokens(m, a.dataset);
  }
  Backend& be = *m.backend;
  const int64_t kv_tokens = a.batching.kv_tokens_for(m, w.shared_prefix + w.prompt.hi + w.output.hi);
  fmt::print(stderr, "{}: {}\nKV cache: {} tokens ({}); {} requests, prompts {}{}, outputs {}, max-seqs {}{}\n",
             label, c.describe(), kv_tokens, kv_cache_size(*m.model, kv_tokens), w.requests, a.prompt_len,
             w.shared_prefix ? fmt::format(" after a shared {}", w.shared_prefix) : "", a.output_len,
             a.batching.max_seqs, a.batching.prefix_caching ? "" : ", no prefix caching");

  std::vector<std::pair<std::string, ServeResult>> runs;
  std::vector<std::pair<std::string, Sparsity*>> modes;
  if (!a.sparse_only) modes.push_back({"dense", nullptr});
  if (m.sparsity) modes.push_back({"sparse", m.sparsity.get()});
  auto progress = [](const std::string& s) { fmt::print(stderr, "{}\n", s); };
  for (const auto& [mode, sparsity] : modes) {
    Scheduler scheduler(*m.model, {.max_seqs = a.batching.max_seqs,
                                   .max_batch_tokens = a.batching.max_batch_tokens,
                                   .kv_tokens = kv_tokens,
                                   .sparsity = sparsity,
                                   .prefix_caching = a.batching.prefix_caching});
    // First use of the device pays for GEMM plans, the allocator, the sparse MLP's path choice and the first
    // decode graphs: a few requests of the workload, short, take it before anything is timed.
    if (a.warmup > 0) {
      fmt::print(stderr, "{}: warming up with {} requests\n", mode, std::min(a.warmup, w.requests));
      run_serve_bench(scheduler, warmup_workload(w, a.warmup, c.vocab_size));
    }
    for (double rate : rates) {
      fmt::print(stderr, "{}, request rate {}:\n", mode, rate_name(rate));
      ServeResult r = run_serve_bench(scheduler, make_serve_workload(w, c.vocab_size, rate), progress);
      r.rate = rate;
      fmt::print(stderr, "  {:.1f} s, {:.0f} output tokens/s, TTFT p99 {:.1f} ms, TPOT p50 {:.2f} ms{}\n", r.duration_s,
                 r.output_tokens_per_s, r.ttft_ms.p99, r.tpot_ms.p50,
                 r.stats.prefix_hit_tokens
                     ? fmt::format(", {:.0f}% of prompt tokens from the prefix cache",
                                   100.0 * static_cast<double>(r.stats.prefix_hit_tokens) /
                                       static_cast<double>(std::max<int64_t>(1, r.prompt_tokens)))
                     : "");
      runs.push_back({mode, r});
    }
  }

  report_density_reached(m, "sparse runs (warm-up included)");
  report(a, w, label, c.describe(), fmt::format("{}, {}", be.name(), dtype_name(be.activation_dtype())), m.density,
         kv_tokens, runs);
  return 0;
}

// --url: the workload sent to a running server over HTTP (serve/http_bench.h); the model flags only shape it.
int run_bench_serve_url(const BenchServeArgs& a) {
#ifdef POLAR_HAVE_SERVE
  check(a.dataset.empty(), "--dataset is not supported with --url (prompts are random token ids)");
  ServeWorkloadOptions w = a.workload;
  w.prompt = parse_range("--prompt-len", a.prompt_len);
  w.output = parse_range("--output-len", a.output_len);
  std::vector<double> rates;
  for (const std::string& r : a.rates) rates.push_back(parse_rate(r));
  const ModelConfig c = a.source.model_config();
  // The server pays its first-use costs (GEMM plans, allocator, decode graphs) on these, not on a timed run.
  if (a.warmup > 0) {
    fmt::print(stderr, "{}: warming up with {} requests\n", a.url, std::min(a.warmup, w.requests));
    serve::run_http_bench(a.url, warmup_workload(w, a.warmup, c.vocab_size));
  }
  std::vector<std::pair<std::string, ServeResult>> runs;
  for (double rate : rates) {
    fmt::print(stderr, "{}, request rate {}:\n", a.url, rate_name(rate));
    ServeResult r = serve::run_http_bench(a.url, make_serve_workload(w, c.vocab_size, rate),
                                          [](const std::string& s) { fmt::print(stderr, "{}\n", s); });
    r.rate = rate;
    fmt::print(stderr, "  {:.1f} s, {:.0f} output tokens/s, TTFT p99 {:.1f} ms, TPOT p50 {:.2f} ms\n", r.duration_s,
               r.output_tokens_per_s, r.ttft_ms.p99, r.tpot_ms.p50);
    runs.push_back({"http", r});
  }
  report(a, w, a.source.label(), c.describe(), "http " + a.url, 0, 0, runs);
  return 0;
#else
  fail("--url needs polar built with cpp-httplib (Debian: libcpp-httplib-dev)");
#endif
}

// --from-csv: the table, the comparison and (with --plot) the plot of a CSV that --csv wrote.
int show_csv(const BenchServeArgs& a) {
  const auto [label, rows] = read_csv(a.from_csv);
  print_table(label, rows);
  print_comparisons(compare(rows));
  std::fflush(stdout);
  if (!a.plot.empty()) write_plot(a.plot, fmt::format("{} ({})", label, a.from_csv), rows);
  return 0;
}

}  // namespace

Command bench_serve_command() {
  auto a = std::make_shared<BenchServeArgs>();
  return {"bench-serve",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("bench-serve", "Serving benchmark: a workload of requests through the "
                                                        "continuous-batching scheduler, dense vs sparse");
            c->footer(
                "Requests ignore EOS, so each produces exactly its output length. With sparsity (--routers, or --density "
                "below 1 for random routers) the workload runs dense first, then sparse, in the same process.\n"
                "TTFT: arrival to first token; TPOT: per output token after the first (per request); ITL: every gap "
                "between tokens; sched_pct: the scheduler's own host time as a share of the steps.\n");
            a->source.add(*c);
            c->add_option("--requests", a->workload.requests, "Requests in the workload")->capture_default_str()
                ->check(at_least(1));
            c->add_option("--prompt-len", a->prompt_len, "Prompt tokens: N, or LO-HI for uniform in [LO, HI]")
                ->capture_default_str();
            c->add_option("--prefix-len", a->workload.shared_prefix,
                          "Tokens every prompt starts with, before its --prompt-len own (a shared system prompt: "
                          "what prefix caching serves)")
                ->capture_default_str()->check(at_least(0));
            c->add_option("--output-len", a->output_len, "Output tokens: N, or LO-HI for uniform in [LO, HI]")
                ->capture_default_str();
            c->add_option("--dataset", a->dataset,
                          "Cut prompts from this plain text file (real models; default: random token ids)");
            c->add_option("--request-rate", a->rates,
                          "Poisson arrival rates in requests/s, e.g. 1,2,4,inf (inf: all at once)")
                ->delimiter(',')->capture_default_str();
            a->batching.add(*c, "max-seqs longest requests, within 90% of free memory");
            c->add_option("--seed", a->workload.seed, "Seed of the workload, the random weights and routers")
                ->capture_default_str();
            c->add_option("--warmup", a->warmup,
                          "Requests of the workload (16 output tokens each) served untimed before each mode's runs (with --url, before the first rate)")
                ->capture_default_str()->check(at_least(0));
            c->add_flag("--sparse-only", a->sparse_only, "With sparsity, skip the dense run");
            c->add_option("--url", a->url,
                          "Send the workload to a running polar serve at http://HOST:PORT instead (the model flags "
                          "only shape the prompts)");
            c->add_option("--csv", a->csv, "Also write the rows to this CSV file");
            c->add_option("--plot", a->plot, "Also plot throughput, TTFT and TPOT against the request rate to this PNG");
            c->add_flag("--json", a->json, "Print JSON instead of a table");
            CLI::Option* from_csv = c->add_option(
                "--from-csv", a->from_csv,
                "Print (and with --plot, plot) the rows of a CSV that --csv wrote, instead of measuring");
            for (const char* source : {"--model", "--shape", "--config"}) from_csv->excludes(c->get_option(source));
          },
          [a] {
            if (!a->from_csv.empty()) return show_csv(*a);
            return a->url.empty() ? run_bench_serve(*a) : run_bench_serve_url(*a);
          }};
}

}  // namespace polar::cli
