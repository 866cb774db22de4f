// polar logits: run exactly the given token ids (no BOS added) and save the logits of every position. With
// --routers/--density (or another --selector), every position after the first is computed as a sparse
// decode step would compute it (its own head selection and, with MLP routers, neuron set), in one pass, as
// polar perplexity scores text.
#include <fmt/core.h>

#include <map>
#include <optional>

#include "cli/commands.h"
#include "cli/common.h"
#include "io/safetensors.h"
#include "runtime/engine.h"

namespace polar::cli {

namespace {
struct LogitsArgs {
  ModelOptions model;
  std::string tokens;
  std::string out;
};

int run_logits(const LogitsArgs& a) {
  std::vector<int32_t> ids = parse_token_list(a.tokens);
  LoadedModel m = load_model(a.model);
  load_sparsity(m, a.model, /*random_allowed=*/false, 0);
  Sparsity* sparsity = m.sparsity.get();
  Engine engine(*m.model, {.kv_tokens = static_cast<int64_t>(ids.size()) + 16, .sparsity = sparsity});
  Tensor logits = engine.step({{engine.add_sequence(), ids, sparsity ? std::optional<int64_t>(1) : std::nullopt}},
                              /*all_logits=*/true);
  std::map<std::string, std::string> meta = {{"tokens", a.tokens}, {"model", a.model.model}};
  if (sparsity) {
    meta["density"] = fmt::format("{}", m.density);
    meta["selector"] = a.model.selector;
    meta["granularity"] = a.model.granularity;
    meta["selection"] = a.model.selection;
    meta["density_schedule"] = a.model.density_schedule;
    if (!a.model.routers.empty()) meta["routers"] = a.model.routers;
    if (const std::optional<double> reached = density_reached(m)) meta["density_reached"] = fmt::format("{}", *reached);
    report_density_reached(m);
  }
  safetensors::write(a.out, {{"logits", logits}}, meta);
  fmt::print(stderr, "wrote logits [{}, {}] to {}\n", logits.dim(0), logits.dim(1), a.out);
  return 0;
}
}  // namespace

Command logits_command() {
  auto a = std::make_shared<LogitsArgs>();
  return {"logits",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("logits", "Run token ids and write the logits of every position (safetensors)");
            a->model.add(*c);
            a->model.add_sparsity(*c, /*selectors=*/true);
            c->add_option("--tokens", a->tokens, "Comma-separated token ids, e.g. 5,17,42 (no BOS is added)")->required();
            c->add_option("--out,-o", a->out, "Output file: one float32 tensor 'logits' of shape [T, vocab]")->required();
          },
          [a] { return run_logits(*a); }};
}

}  // namespace polar::cli
