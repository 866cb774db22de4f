// polar perplexity: perplexity of a text file under the model, in non-overlapping windows of --ctx tokens.
#include <fmt/core.h>

#include <chrono>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "runtime/perplexity.h"

namespace polar::cli {

namespace {
struct PerplexityArgs {
  ModelOptions model;
  std::string text;
  int64_t ctx = 512;
  int64_t max_tokens = 0;
  int64_t batch = 4;
  bool json = false;
};

int run_perplexity(const PerplexityArgs& a) {
  std::string text = read_text_file(a.text);
  LoadedModel m = load_model(a.model);
  load_sparsity(m, a.model, /*random_allowed=*/false, 0);
  const Tokenizer& tok = m.tokenizer();
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids = tok.encode(text, false);
  fmt::print(stderr, "tokenized {}: {} bytes -> {} tokens\n", a.text, text.size(), ids.size());
  const int32_t bos = tok.add_bos_default() ? tok.bos_id() : -1;
  PerplexityResult r = perplexity(*m.model, ids, a.ctx, bos, a.max_tokens, a.batch, [&](int64_t done, int64_t total) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print(stderr, "\rscored {}/{} tokens ({:.0f} tok/s)", done, total, done / std::max(s, 1e-9));
  }, m.sparsity.get());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print(stderr, "\n");
  report_density_reached(m);
  const std::optional<double> reached = density_reached(m);
  if (a.json) {
    fmt::print("{}\n", nlohmann::json{{"perplexity", r.perplexity()}, {"tokens_scored", r.scored},
                                      {"nll_mean", r.nll_sum / r.scored}, {"ctx", a.ctx}, {"seconds", secs},
                                      {"density", m.density}, {"selector", a.model.selector},
                                      {"granularity", a.model.granularity}, {"selection", a.model.selection},
                                      {"density_schedule", a.model.density_schedule}, {"kmin", a.model.kmin},
                                      {"kmax", a.model.kmax},
                                      {"density_reached", reached ? nlohmann::json(*reached) : nlohmann::json()}}
                           .dump());
  } else {
    fmt::print("perplexity {:.4f} over {} tokens (ctx {})\n", r.perplexity(), r.scored, a.ctx);
  }
  return 0;
}
}  // namespace

Command perplexity_command() {
  auto a = std::make_shared<PerplexityArgs>();
  return {"perplexity",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("perplexity", "Perplexity of a text file");
            a->model.add(*c);
            a->model.add_sparsity(*c, /*selectors=*/true);
            c->add_option("--text", a->text, "Text file to score")->required();
            c->add_option("--ctx", a->ctx, "Window length in tokens")->capture_default_str()->check(between(2, 1 << 20));
            c->add_option("--max-tokens", a->max_tokens, "Score at most this many tokens (0 = all)")->capture_default_str()
                ->check(at_least(0));
            c->add_option("--batch", a->batch, "Windows per forward pass")->capture_default_str()->check(between(1, 4096));
            c->add_flag("--json", a->json, "Print the result as JSON");
          },
          [a] { return run_perplexity(*a); }};
}

}  // namespace polar::cli
