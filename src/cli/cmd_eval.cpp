// polar eval: zero-shot accuracy of a model on task files (multiple choice, schema, language modelling,
// RTE; eval/tasks.h), with standard errors. Table or JSON (with every item's scores) on stdout, progress
// on stderr, and a gnuplot PNG of accuracy against head density on request.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <optional>

#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/gnuplot.h"
#include "eval/eval.h"

namespace polar::cli {

namespace {

struct EvalArgs {
  ModelOptions model;
  std::vector<std::string> tasks;
  int64_t limit = 0;
  int64_t batch = 16;
  bool json = false;
  std::string plot;
  bool skip_bad = false;
  std::vector<double> densities = {1.0};
  bool sparse_context = false;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

nlohmann::json estimate_json(const std::optional<Estimate>& e) {
  return e ? nlohmann::json{{"mean", e->mean}, {"se", e->se}} : nlohmann::json(nullptr);
}

nlohmann::json to_json(const TaskResult& r) {
  nlohmann::json items = nlohmann::json::array();
  for (const ItemResult& item : r.items) {
    nlohmann::json logprob = nlohmann::json::array(), tokens = nlohmann::json::array();
    for (const Score& s : item.scores) {
      logprob.push_back(s.logprob);
      tokens.push_back(s.tokens);
    }
    nlohmann::json j = {{"line", item.line}, {"logprob", logprob}, {"tokens", tokens}, {"correct", item.correct}};
    if (r.acc_norm) j["correct_norm"] = item.correct_norm;
    items.push_back(j);
  }
  return {{"task", r.task},
          {"file", r.path},
          {"format", format_name(r.format)},
          {"density", r.density},
          {"n", r.items.size()},
          {"skipped", r.skipped},
          {"truncated", r.truncated},
          {"acc", estimate_json(r.acc)},
          {"acc_norm", estimate_json(r.acc_norm)},
          {"perplexity", r.perplexity ? nlohmann::json(*r.perplexity) : nlohmann::json(nullptr)},
          {"items", items}};
}

// The paired difference of a sparse run's accuracy to the dense run of the same task (same items, in the
// same order), when both are there.
std::optional<Estimate> delta_to_dense(const TaskResult& r, const std::vector<TaskResult>& results) {
  if (r.density >= 1.0) return std::nullopt;
  for (const TaskResult& d : results)
    if (d.density >= 1.0 && d.path == r.path && d.items.size() == r.items.size()) {
      const std::vector<double> a = item_values(r, Metric::kAcc), b = item_values(d, Metric::kAcc);
      return paired_difference(a, b);
    }
  return std::nullopt;
}

void print_table(const std::vector<TaskResult>& results) {
  auto number = [](std::optional<double> v, int decimals) {
    return v ? fmt::format("{:.{}f}", *v, decimals) : std::string("-");
  };
  fmt::print("{:<16} {:<17} {:>7} {:>6} {:>7} {:>9} {:>7} {:>7} {:>8} {:>7} {:>10} {:>8} {:>8}\n", "task", "format",
             "density", "n", "skipped", "truncated", "acc", "acc_se", "acc_norm", "norm_se", "perplexity", "d_acc",
             "d_acc_se");
  for (const TaskResult& r : results) {
    const std::optional<double> norm = r.acc_norm ? std::optional(r.acc_norm->mean) : std::nullopt;
    const std::optional<double> norm_se = r.acc_norm ? std::optional(r.acc_norm->se) : std::nullopt;
    const std::optional<Estimate> delta = delta_to_dense(r, results);
    fmt::print("{:<16} {:<17} {:>7.2f} {:>6} {:>7} {:>9} {:>7} {:>7} {:>8} {:>7} {:>10} {:>8} {:>8}\n", r.task,
               format_name(r.format), r.density, r.items.size(), r.skipped, r.truncated, number(r.acc.mean, 4),
               number(r.acc.se, 4), number(norm, 4), number(norm_se, 4), number(r.perplexity, 2),
               number(delta ? std::optional(delta->mean) : std::nullopt, 4),
               number(delta ? std::optional(delta->se) : std::nullopt, 4));
  }
}

// Accuracy against head density, one line per task (results of one task at several densities join into
// its line), with standard-error bars. Each task is drawn slightly apart along x so that the error bars of
// tasks at the same density do not hide one another.
void write_plot(const std::string& path, const std::string& title, const std::vector<TaskResult>& results) {
  std::vector<std::string> names;
  for (const TaskResult& r : results)
    if (std::find(names.begin(), names.end(), r.task) == names.end()) names.push_back(r.task);
  std::string script, plots;
  for (size_t t = 0; t < names.size(); ++t) {
    const double dodge = 0.006 * (static_cast<double>(t) - (static_cast<double>(names.size()) - 1) / 2);
    script += fmt::format("$task{} << EOD\n", t);
    for (const TaskResult& r : results)
      if (r.task == names[t])
        script += fmt::format("{} {} {}\n", r.density + dodge, r.acc.mean, std::isnan(r.acc.se) ? 0 : r.acc.se);
    script += "EOD\n";
    plots += fmt::format("{}$task{} using 1:2:3 with yerrorlines title {}", t ? ", " : "", t, gnuplot_quoted(names[t]));
  }
  script += fmt::format(R"(set title {}
set xlabel 'head density (1 = dense)'
set ylabel 'accuracy'
set xrange [0:1.05]
set yrange [0:1]
set grid
set key outside right
plot {}
)",
                        gnuplot_quoted(title), plots);
  run_gnuplot(path, 900, 520, script);
}

int run_eval(const EvalArgs& a) {
  // Tasks first: a malformed file is reported before the model is loaded.
  const auto warn = [](const std::string& w) { fmt::print(stderr, "warning: {}\n", w); };
  std::vector<Task> tasks;
  for (const std::string& path : a.tasks) {
    tasks.push_back(load_task(path, {.limit = a.limit, .skip_bad = a.skip_bad, .warn = warn}));
    const Task& t = tasks.back();
    fmt::print(stderr, "{}: {} items ({}){}\n", t.path, t.items.size(), format_name(t.format),
               t.skipped ? fmt::format(", {} malformed lines skipped", t.skipped) : "");
  }
  LoadedModel m = load_model(a.model);
  const Tokenizer& tok = m.tokenizer();
  for (double d : a.densities) check(d > 0 && d <= 1, "--density {} is outside (0, 1]", d);
  const bool sparse_runs = std::any_of(a.densities.begin(), a.densities.end(), [](double d) { return d < 1; });
  check(!sparse_runs || !a.model.routers.empty() || a.model.selector == "random" || a.model.selector == "oracle",
        "densities below 1 need --routers FILE (or --selector random or oracle)");
  // Dense first: the sparse runs are reported as paired differences to it.
  std::vector<double> densities = {1.0};
  for (double d : a.densities)
    if (d < 1 && std::find(densities.begin(), densities.end(), d) == densities.end()) densities.push_back(d);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<TaskResult> results;
  std::map<double, double> reached;  // density -> the mean density its run reached (over all its tasks)
  for (double density : densities) {
    ModelOptions at = a.model;
    at.density = density;
    m.sparsity.reset();
    m.routers = nullptr;
    m.selector = nullptr;
    if (density < 1) load_sparsity(m, at, /*random_allowed=*/false, 0);
    for (const Task& task : tasks) {
      const auto t1 = std::chrono::steady_clock::now();
      const EvalOptions options{
          .scoring = {.batch = a.batch, .sparsity = m.sparsity.get(), .sparse_context = a.sparse_context},
          .density = density,
          .skip_bad = a.skip_bad,
          .warn = warn};
      results.push_back(evaluate(*m.model, tok, task, options, [&](int64_t done, int64_t total) {
        fmt::print(stderr, "\r{} (density {:g}): scored {}/{} requests ({:.1f}/s)", task.name, density, done, total,
                   done / std::max(seconds_since(t1), 1e-9));
      }));
      const TaskResult& r = results.back();
      fmt::print(stderr, "\n{} (density {:g}): acc {:.4f} in {:.1f} s{}\n", r.task, density, r.acc.mean,
                 seconds_since(t1),
                 r.truncated ? fmt::format(" ({} requests had their context cut to fit the model)", r.truncated) : "");
    }
    if (const std::optional<double> d = density_reached(m)) reached[density] = *d;
    report_density_reached(m, fmt::format("density {:g}", density));
  }
  const double secs = seconds_since(t0);
  const std::string device = fmt::format("{}, {}", m.backend->name(), dtype_name(m.backend->activation_dtype()));
  // Results first, the plot after: a failing plot must not lose the numbers.
  if (a.json) {
    nlohmann::json j = {{"model", m.checkpoint.path}, {"device", device}, {"seconds", secs},
                        {"tasks", nlohmann::json::array()}};
    for (const TaskResult& r : results) {
      j["tasks"].push_back(to_json(r));
      if (const auto delta = delta_to_dense(r, results))
        j["tasks"].back()["delta_acc"] = {{"mean", delta->mean}, {"se", delta->se}};
      if (reached.count(r.density)) j["tasks"].back()["density_reached"] = reached[r.density];
    }
    j["selector"] = a.model.selector;
    j["granularity"] = a.model.granularity;
    j["selection"] = a.model.selection;
    j["density_schedule"] = a.model.density_schedule;
    j["kmin"] = a.model.kmin;
    j["kmax"] = a.model.kmax;
    j["sparse_context"] = a.sparse_context;
    fmt::print("{}\n", j.dump(1));
  } else {
    fmt::print("{} on {}, {:.1f} s\n", m.checkpoint.path, device, secs);
    print_table(results);
  }
  std::fflush(stdout);
  if (!a.plot.empty()) write_plot(a.plot, fmt::format("{} on {}", m.checkpoint.path, device), results);
  return 0;
}

}  // namespace

Command eval_command() {
  auto a = std::make_shared<EvalArgs>();
  return {"eval",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("eval", "Zero-shot accuracy on task files (JSON Lines)");
            c->footer(
                "Task formats, detected from the first valid line of each file:\n"
                "  multiple choice {\"query\", \"choices\", \"gold\"}: each \" \" + choice scored after the query; acc "
                "by summed log-likelihood, acc_norm by log-likelihood per byte of \" \" + choice\n"
                "  schema {\"context_options\", \"continuation\", \"gold\"}: \" \" + continuation scored after each "
                "option; acc\n"
                "  language modelling {\"context\", \"continuation\"}: acc = \" \" + continuation is the greedy "
                "continuation; perplexity = exp(-mean log-likelihood of a continuation)\n"
                "  RTE {\"premise\", \"hypothesis\", \"label\"}: \"{premise}\\nQuestion: {hypothesis} True or "
                "False?\\nAnswer:\" with \" True\" (entailment) / \" False\"; acc\n"
                "Ties go to the first candidate. Standard errors: sample standard deviation / sqrt(n). Contexts too "
                "long for the model are cut from the left (after BOS).\n");
            a->model.add(*c);
            a->model.add_sparsity(*c, /*selectors=*/true);
            // --density here is a list: every density is a run, reported beside the dense one.
            c->remove_option(c->get_option("--density"));
            c->add_option("--density", a->densities,
                          "Head densities to evaluate, e.g. 1,0.75,0.5 (each below 1 needs --routers, or --selector "
                          "oracle or random); the dense run always comes first and sparse accuracies are also reported as "
                          "paired differences to it (d_acc)")
                ->delimiter(',')
                ->capture_default_str();
            c->add_flag("--sparse-context", a->sparse_context,
                        "Also sparsify the context tokens (after the first), not only the continuation's");
            c->add_option("--task", a->tasks, "Task file (JSON Lines); repeat for several tasks")->required();
            c->add_option("--limit", a->limit, "Evaluate the first N items of each task (0 = all)")
                ->capture_default_str()
                ->check(at_least(0));
            c->add_option("--batch", a->batch, "Requests (candidate continuations) per forward pass")
                ->capture_default_str()
                ->check(between(1, 4096));
            c->add_flag("--json", a->json, "Print JSON (with every item's log-likelihoods) instead of a table");
            c->add_option("--plot", a->plot, "Also plot accuracy against head density per task to this PNG");
            c->add_flag("--skip-bad", a->skip_bad,
                        "Skip malformed task lines, and items the model cannot score (a continuation longer than its "
                        "context), with a warning naming FILE:LINE, instead of failing");
          },
          [a] { return run_eval(*a); }};
}

}  // namespace polar::cli
