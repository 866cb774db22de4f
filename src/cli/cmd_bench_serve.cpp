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

#include "bench/decode_bench.h"
#include "bench/serve_bench.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "cli/gnuplot.h"

namespace polar::cli {

namespace {

struct BenchServeArgs {
  BenchModelOptions source;
  ServeWorkloadOptions workload;
  std::string prompt_len = "128", output_len = "128";
  std::string dataset;
  std::vector<std::string> rates = {"inf"};
  int64_t max_seqs = 64;
  int64_t max_batch_tokens = 2048;
  int64_t kv_tokens = 0;
  bool sparse_only = false;
  bool json = false;
  std::string csv, plot;
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

double parse_rate(const std::string& s) {
  if (s == "inf") return std::numeric_limits<double>::infinity();
  double r = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), r);
  check(ec == std::errc() && end == s.data() + s.size() && r > 0 && std::isfinite(r),
        "--request-rate: '{}' is not a positive number of requests per second or inf", s);
  return r;
}

std::string rate_name(double rate) { return std::isinf(rate) ? "inf" : fmt::format("{:g}", rate); }

struct Run {
  std::string mode;  // dense or sparse
  ServeResult result;
};

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
    {"sched_pct", [](const ServeResult& r) { return 100 * r.schedule_share; }, 2},
    {"preemptions", [](const ServeResult& r) { return static_cast<double>(r.stats.preemptions); }, 0},
    {"steps", [](const ServeResult& r) { return static_cast<double>(r.stats.steps); }, 0},
    {"decode_only_steps", [](const ServeResult& r) { return static_cast<double>(r.stats.decode_only_steps); }, 0},
    {"mixed_steps", [](const ServeResult& r) { return static_cast<double>(r.stats.mixed_steps); }, 0},
    {"prefill_only_steps", [](const ServeResult& r) { return static_cast<double>(r.stats.prefill_only_steps); }, 0},
    {"graphs_captured", [](const ServeResult& r) { return static_cast<double>(r.graphs_captured); }, 0},
};
// The table shows these; the CSV and JSON all of kFields.
const char* const kTableFields[] = {"req_per_s",   "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                                    "tpot_p99_ms", "itl_p99_ms",       "mean_batch",  "preemptions", "sched_pct"};

const Field& field(const char* name) {
  for (const Field& f : kFields)
    if (std::string_view(f.name) == name) return f;
  fail("no field {}", name);
}

void print_table(const std::string& label, const std::vector<Run>& runs) {
  fmt::print("{:<12} {:<6} {:>5}", "shape", "mode", "rate");
  for (const char* name : kTableFields) fmt::print(" {:>{}}", name, std::max<size_t>(std::strlen(name), 7));
  fmt::print("\n");
  for (const Run& run : runs) {
    fmt::print("{:<12} {:<6} {:>5}", label, run.mode, rate_name(run.result.rate));
    for (const char* name : kTableFields) {
      const Field& f = field(name);
      fmt::print(" {:>{}.{}f}", f.get(run.result), std::max<size_t>(std::strlen(name), 7), f.decimals);
    }
    fmt::print("\n");
  }
}

// Sparse against dense at each rate both measured.
struct Comparison {
  double rate;
  const ServeResult *dense, *sparse;
};
std::vector<Comparison> compare(const std::vector<Run>& runs) {
  std::vector<Comparison> out;
  for (const Run& s : runs)
    for (const Run& d : runs)
      if (s.mode == "sparse" && d.mode == "dense" && s.result.rate == d.result.rate)
        out.push_back({s.result.rate, &d.result, &s.result});
  return out;
}

void write_csv(const std::string& path, const std::string& label, const std::vector<Run>& runs) {
  std::ofstream f(path);
  check(f.good(), "cannot write {}", path);
  f << "shape,mode,rate";
  for (const Field& c : kFields) f << ',' << c.name;
  f << '\n';
  for (const Run& run : runs) {
    f << fmt::format("{},{},{}", label, run.mode, rate_name(run.result.rate));
    for (const Field& c : kFields) f << fmt::format(",{:.6g}", c.get(run.result));
    f << '\n';
  }
  check(f.good(), "cannot write {}", path);
}

// Three panels against the offered request rate, one line per mode: output tokens/s, TTFT p50/p99 and TPOT
// p50/p99. Rates are placed in the order given (inf, all at once, among them), labelled by value.
void write_plot(const std::string& path, const std::string& title, const std::vector<Run>& runs) {
  std::string data, throughput, ttft, tpot;
  for (const char* mode : {"dense", "sparse"}) {
    std::string block;
    for (const Run& run : runs)
      if (run.mode == mode)
        block += fmt::format("{} {} {} {} {} {}\n", rate_name(run.result.rate), run.result.output_tokens_per_s,
                             run.result.ttft_ms.p50, run.result.ttft_ms.p99, run.result.tpot_ms.p50,
                             run.result.tpot_ms.p99);
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

nlohmann::json run_json(const Run& run) {
  nlohmann::json j = {{"mode", run.mode}, {"rate", rate_name(run.result.rate)}};
  for (const Field& f : kFields) j[f.name] = f.get(run.result);
  auto pct = [](const Percentiles& p) { return nlohmann::json{{"mean", p.mean}, {"p50", p.p50}, {"p90", p.p90}, {"p99", p.p99}}; };
  j["ttft_ms"] = pct(run.result.ttft_ms);
  j["tpot_ms"] = pct(run.result.tpot_ms);
  j["itl_ms"] = pct(run.result.itl_ms);
  j["e2e_ms"] = pct(run.result.e2e_ms);
  j["prompt_tokens"] = run.result.prompt_tokens;
  j["output_tokens"] = run.result.output_tokens;
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
  check(w.prompt.hi + w.output.hi <= c.max_positions,
        "the longest request ({} prompt + {} output tokens) exceeds the model's context length of {}", w.prompt.hi,
        w.output.hi, c.max_positions);
  if (!a.dataset.empty()) {
    fmt::print(stderr, "tokenizing {}...\n", a.dataset);
    w.corpus = dataset_tokens(m, a.dataset);
  }
  Backend& be = *m.backend;
  // The KV cache: every running sequence at its longest, unless that is more than the device has free
  // (then sequences are preempted when the cache fills, as in a server).
  const int64_t per_token = kv_bytes_per_token(c, be.activation_dtype());
  int64_t kv_tokens = a.kv_tokens;
  if (kv_tokens == 0) {
    const int64_t want = a.max_seqs * (w.prompt.hi + w.output.hi + 16);
    const double activations = static_cast<double>(a.max_batch_tokens) * 4.0 *
                               static_cast<double>(4 * c.hidden + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.ffn);
    const double room = 0.9 * static_cast<double>(be.memory_info().first) - activations - 1e9;
    check(room > static_cast<double>(per_token * (w.prompt.hi + w.output.hi)),
          "the device has no room for a KV cache of even one request");
    kv_tokens = std::min<int64_t>(want, static_cast<int64_t>(room / static_cast<double>(per_token)));
  }
  fmt::print(stderr, "{}: {}\nKV cache: {} tokens ({:.3g} GB); {} requests, prompts {}, outputs {}, max-seqs {}\n", label,
             c.describe(), kv_tokens, static_cast<double>(kv_tokens * per_token) / 1e9, w.requests, a.prompt_len,
             a.output_len, a.max_seqs);

  std::vector<Run> runs;
  std::vector<std::pair<std::string, Sparsity*>> modes;
  if (!a.sparse_only) modes.push_back({"dense", nullptr});
  if (m.sparsity) modes.push_back({"sparse", m.sparsity.get()});
  for (const auto& [mode, sparsity] : modes) {
    Scheduler scheduler(*m.model, {.max_seqs = a.max_seqs,
                                   .max_batch_tokens = a.max_batch_tokens,
                                   .kv_tokens = kv_tokens,
                                   .sparsity = sparsity});
    for (double rate : rates) {
      fmt::print(stderr, "{}, request rate {}:\n", mode, rate_name(rate));
      const std::vector<ServeRequestSpec> requests = make_serve_workload(w, c.vocab_size, rate);
      ServeResult r = run_serve_bench(scheduler, requests, [](const std::string& s) { fmt::print(stderr, "{}\n", s); });
      r.rate = rate;
      fmt::print(stderr, "  {:.1f} s, {:.0f} output tokens/s, TTFT p99 {:.1f} ms, TPOT p50 {:.2f} ms\n", r.duration_s,
                 r.output_tokens_per_s, r.ttft_ms.p99, r.tpot_ms.p50);
      runs.push_back({mode, r});
    }
  }

  const std::vector<Comparison> comparisons = compare(runs);
  const std::string device = fmt::format("{}, {}", be.name(), dtype_name(be.activation_dtype()));
  if (a.json) {
    nlohmann::json rows = nlohmann::json::array(), cmp = nlohmann::json::array();
    for (const Run& run : runs) rows.push_back(run_json(run));
    for (const Comparison& x : comparisons)
      cmp.push_back({{"rate", rate_name(x.rate)},
                     {"output_throughput_ratio", x.sparse->output_tokens_per_s / x.dense->output_tokens_per_s},
                     {"ttft_p99_ratio", x.sparse->ttft_ms.p99 / x.dense->ttft_ms.p99},
                     {"tpot_p50_ratio", x.sparse->tpot_ms.p50 / x.dense->tpot_ms.p50}});
    fmt::print("{}\n", nlohmann::json{{"shape", label},
                                      {"config", c.describe()},
                                      {"device", device},
                                      {"density", m.density},
                                      {"workload",
                                       {{"requests", w.requests},
                                        {"prompt_len", a.prompt_len},
                                        {"output_len", a.output_len},
                                        {"dataset", a.dataset},
                                        {"seed", w.seed}}},
                                      {"max_seqs", a.max_seqs},
                                      {"max_batch_tokens", a.max_batch_tokens},
                                      {"kv_tokens", kv_tokens},
                                      {"runs", rows},
                                      {"sparse_vs_dense", cmp}}
                               .dump(1));
  } else {
    print_table(label, runs);
    for (const Comparison& x : comparisons)
      fmt::print("sparse (density {:g}) vs dense at rate {}: output tokens/s x{:.3f}, TTFT p99 x{:.3f}, TPOT p50 x{:.3f}\n",
                 m.density, rate_name(x.rate), x.sparse->output_tokens_per_s / x.dense->output_tokens_per_s,
                 x.sparse->ttft_ms.p99 / x.dense->ttft_ms.p99, x.sparse->tpot_ms.p50 / x.dense->tpot_ms.p50);
  }
  std::fflush(stdout);
  if (!a.csv.empty()) write_csv(a.csv, label, runs);
  if (!a.plot.empty())
    write_plot(a.plot, fmt::format("{} on {}: {} requests, prompts {}, outputs {}", label, device, w.requests,
                                   a.prompt_len, a.output_len),
               runs);
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
            c->add_option("--output-len", a->output_len, "Output tokens: N, or LO-HI for uniform in [LO, HI]")
                ->capture_default_str();
            c->add_option("--dataset", a->dataset,
                          "Cut prompts from this plain text file (real models; default: random token ids)");
            c->add_option("--request-rate", a->rates,
                          "Poisson arrival rates in requests/s, e.g. 1,2,4,inf (inf: all at once)")
                ->delimiter(',')->capture_default_str();
            c->add_option("--max-seqs", a->max_seqs, "Sequences in the running batch at most")->capture_default_str()
                ->check(at_least(1));
            c->add_option("--max-batch-tokens", a->max_batch_tokens,
                          "Tokens per engine step at most (decode tokens + prompt chunks)")
                ->capture_default_str()->check(at_least(1));
            c->add_option("--kv-tokens", a->kv_tokens,
                          "KV cache capacity in tokens (0: max-seqs longest requests, within 90% of free memory)")
                ->capture_default_str()->check(at_least(0));
            c->add_option("--seed", a->workload.seed, "Seed of the workload, the random weights and routers")
                ->capture_default_str();
            c->add_flag("--sparse-only", a->sparse_only, "With sparsity, skip the dense run");
            c->add_option("--csv", a->csv, "Also write the rows to this CSV file");
            c->add_option("--plot", a->plot, "Also plot throughput, TTFT and TPOT against the request rate to this PNG");
            c->add_flag("--json", a->json, "Print JSON instead of a table");
          },
          [a] { return run_bench_serve(*a); }};
}

}  // namespace polar::cli
