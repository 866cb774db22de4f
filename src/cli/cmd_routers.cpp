// polar routers: make a model's router file (--random: routers of the right shapes with random weights, for
// benchmarks and tests) or inspect one (--show: a summary, checked against a model when one is given).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include "bench/shapes.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "io/checkpoint.h"
#include "sparse/routers.h"

namespace polar::cli {

namespace {

struct RoutersArgs {
  bool random = false;
  std::string show;
  std::string model;
  std::string shape;
  std::string out;
  uint64_t seed = 0;
  int64_t mlp_rank = 1024;
  bool json = false;
};

// The model the routers belong to: a checkpoint, or the synthetic model that `polar bench --shape NAME
// --seed S` builds (same config, same seed, so the same fingerprint).
Checkpoint model_checkpoint(const RoutersArgs& a) {
  if (!a.shape.empty()) return synthetic_checkpoint(shape_config(a.shape), "synthetic " + a.shape, a.seed);
  return load_checkpoint(a.model);
}

int write_random(const RoutersArgs& a) {
  check(!a.model.empty() || !a.shape.empty(), "polar routers --random needs a model: --model PATH or --shape NAME");
  check(!a.out.empty(), "polar routers --random needs --out FILE");
  const Checkpoint ck = model_checkpoint(a);
  const Routers r = random_routers(ck.config, model_fingerprint(ck), a.seed, a.mlp_rank);
  save_routers(a.out, r);
  fmt::print(stderr, "wrote random routers (seed {}) for {} to {} ({:.1f} MB)\n", a.seed, r.fingerprint, a.out,
             std::filesystem::file_size(a.out) / 1e6);
  return 0;
}

// The dimensions the routers' tensors show: H and d of the attention routers, D of the MLP routers (0 where
// there are none).
struct RouterShape {
  int64_t heads = 0, hidden = 0, ffn = 0;
};

RouterShape router_shape(const Routers& r) {
  RouterShape s;
  for (const LayerRouters& l : r.layers) {
    if (l.attn_w.defined() && s.heads == 0) {
      s.heads = l.attn_w.dim(0);
      s.hidden = l.attn_w.dim(1);
    }
    if (l.mlp_b.defined() && s.ffn == 0) {
      s.ffn = l.mlp_b.dim(0);
      if (s.hidden == 0) s.hidden = l.mlp_a.dim(1);
    }
  }
  return s;
}

std::string recall_str(double x) { return std::isnan(x) ? "-" : fmt::format("{:.3f}", x); }

bool any_measured(const std::vector<double>& v) {
  return std::any_of(v.begin(), v.end(), [](double x) { return !std::isnan(x); });
}

// One row per layer, one column per batch size.
void print_layer_table(const std::vector<int64_t>& batch_sizes, const std::vector<std::vector<double>>& rows) {
  fmt::print("  {:<8}", "batch");
  for (int64_t b : batch_sizes) fmt::print(" {:>6}", b);
  fmt::print("\n");
  for (size_t l = 0; l < rows.size(); ++l) {
    fmt::print("  {:<8}", fmt::format("layer {}", l));
    for (double x : rows[l]) fmt::print(" {:>6}", recall_str(x));
    fmt::print("\n");
  }
}

int show(const RoutersArgs& a) {
  std::optional<Checkpoint> ck;
  Routers r;
  if (!a.model.empty() || !a.shape.empty()) {
    ck = model_checkpoint(a);
    r = load_routers(a.show, ck->config, model_fingerprint(*ck));
  } else {
    r = read_routers(a.show);
  }
  const RouterShape s = router_shape(r);
  if (a.json) {
    nlohmann::json j = routers_metadata(r);
    j.update({{"path", a.show}, {"layers", r.layers.size()}, {"heads", s.heads}, {"hidden", s.hidden},
              {"checked_against", ck ? nlohmann::json(ck->path) : nlohmann::json(nullptr)},
              {"head_shares", has_head_shares(r)}});
    if (r.mlp_k) j["ffn"] = s.ffn;
    fmt::print("{}\n", j.dump(1));
    return 0;
  }
  const int64_t layers = static_cast<int64_t>(r.layers.size());
  fmt::print("routers      {}\nmodel        {}\n", a.show, r.fingerprint);
  if (ck)
    fmt::print("checked      valid for {}\n", ck->path);
  else
    fmt::print("checked      only on its own (give --model or --shape to check it against a model)\n");
  fmt::print("source       {}\n", r.source);
  if (layers > 1)
    fmt::print("attention    layers 1-{}: {} heads scored from d = {}, granularity {}, head density {}\n", layers - 1,
               s.heads, s.hidden, r.granularity, r.head_density);
  else
    fmt::print("attention    none (one layer, and layer 0 is always dense)\n");
  std::vector<std::string> recalls;
  for (size_t l = 1; l < r.attn_recall.size(); ++l) recalls.push_back(recall_str(r.attn_recall[l]));
  if (any_measured(r.attn_recall))
    fmt::print("attn recall  layers 1-{}: {}\n", layers - 1, fmt::join(recalls, " "));
  else
    fmt::print("attn recall  unmeasured\n");
  if (layers > 1)
    fmt::print("head shares  {}\n", has_head_shares(r) ? "recorded (--selector static can use this file)"
                                                       : "none (--selector static needs routers from polar calibrate)");
  if (layers > 1)
    fmt::print("selection    {}\n", r.selection ? "recorded (--selection threshold / stat-topk and --density-schedule "
                                                  "calibrated can use this file)"
                                                : "none (--selection threshold / stat-topk and --density-schedule "
                                                  "calibrated need routers from polar calibrate)");
  if (!r.mlp_k) {
    fmt::print("mlp          dense (no MLP routers)\n");
    return 0;
  }
  const MlpKTable& t = *r.mlp_k;
  fmt::print("mlp          rank {} routers over D = {} neurons\n", r.mlp_rank, s.ffn);
  std::vector<std::vector<double>> fractions;
  for (const auto& row : t.k) {
    fractions.emplace_back();
    for (int64_t k : row) fractions.back().push_back(static_cast<double>(k) / static_cast<double>(s.ffn));
  }
  fmt::print("mlp k        fraction of D kept, by batch size:\n");
  print_layer_table(t.batch_sizes, fractions);
  if (std::any_of(t.recall.begin(), t.recall.end(), any_measured)) {
    fmt::print("mlp recall   union recall reached in calibration, by batch size:\n");
    print_layer_table(t.batch_sizes, t.recall);
  } else {
    fmt::print("mlp recall   unmeasured\n");
  }
  return 0;
}

int run_routers(const RoutersArgs& a) {
  check(a.random || !a.show.empty(), "polar routers needs --random (write routers) or --show FILE (inspect them)");
  return a.random ? write_random(a) : show(a);
}

}  // namespace

Command routers_command() {
  auto a = std::make_shared<RoutersArgs>();
  return {"routers",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand(
                "routers", "Write random Polar routers for a model (--random) or inspect a router file (--show)");
            c->footer(
                "A router file (safetensors, <name>.routers.safetensors by convention) holds one model's routers: "
                "per layer an attention router that scores the query heads (none on layer 0, which is always "
                "dense) and, for ReLU models (OPT), a low-rank MLP router with a table of how many MLP neurons a "
                "decode step keeps at each batch size. It names the model it was made for (family, dimensions and "
                "a checksum of some weights; a synthetic model by its seed), and is refused for any other.\n"
                "--random makes routers of the right shapes with random weights and the paper's OPT-6.7B k table, "
                "for benchmarks and tests; they carry no accuracy.\n");
            CLI::Option* random =
                c->add_flag("--random", a->random, "Write routers with random weights for the model to --out");
            CLI::Option* show = c->add_option(
                "--show", a->show, "Summarise this router file (and check it against --model or --shape if given)");
            random->excludes(show);
            CLI::Option* model =
                c->add_option("--model,-m", a->model, "The model: a Hugging Face directory or a GGUF file");
            c->add_option("--shape", a->shape,
                          fmt::format("The synthetic model polar bench --shape builds with --seed: {}",
                                      fmt::join(shape_names(), ", ")))
                ->excludes(model);
            c->add_option("--out,-o", a->out, "Where --random writes the routers")->needs(random);
            c->add_option("--seed", a->seed,
                          "Seed of the random routers; with --shape also of the synthetic model's weights, as for "
                          "polar bench --seed")
                ->capture_default_str();
            c->add_option("--mlp-rank", a->mlp_rank, "Rank of the random MLP routers (ReLU models only)")
                ->capture_default_str()
                ->check(above(0))
                ->needs(random);
            c->add_flag("--json", a->json, "With --show: print JSON instead of a summary")->needs(show);
          },
          [a] { return run_routers(*a); }};
}

}  // namespace polar::cli
