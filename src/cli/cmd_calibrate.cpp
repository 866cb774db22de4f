// polar calibrate: trains a model's routers from its own activations on calibration text (calib/) and
// writes its router file; prints a per-layer summary (recall, F1, k fractions).
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include "calib/calibrate.h"
#include "calib/data.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace polar::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct CalibrateArgs {
  ModelOptions model;
  std::vector<std::string> text;
  std::string out;
  std::string work;
  int64_t tokens = 400000;
  int64_t seq = 512;
  uint64_t seed = 0;
  int64_t mlp_rank = 1024;
  double lr = 1e-4;
  int64_t epochs = 20;
  bool keep_work = false;
  bool json = false;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Fails now, before hours of collection, if the router file could not be written at the end.
void check_writable(const std::string& out) {
  check(!fs::is_directory(out), "--out {} is a directory; give the router file's path", out);
  const std::string tmp = out + ".tmp";
  std::ofstream f(tmp);
  check(f.good(), "cannot write --out {}: {}", out, std::strerror(errno));
  f.close();
  fs::remove(tmp);
}

std::string file_names(const std::vector<std::string>& files) {
  std::vector<std::string> names;
  for (const std::string& f : files) names.push_back(fs::path(f).filename().string());
  return fmt::format("{}", fmt::join(names, ", "));
}

std::string metric(double x) { return fmt::format("{:.3f}", x); }

void print_table(const calib::Calibration& cal, const calib::KTableOptions& k_table) {
  const calib::SpillDims& d = cal.dims();
  const bool gqa = d.kv_heads != d.heads;
  fmt::print("{:>5}  {:>11}", "layer", "head recall");
  if (gqa) fmt::print("  {:>12}", "group recall");
  fmt::print("  {:>5}  {:>7}", "epoch", "carried");
  if (d.mlp) {
    fmt::print("  {:>6}  {:>6}   k/D at batch", "mlp F1", "epoch");
    for (int64_t b : k_table.batch_sizes) fmt::print(" {:>5}", b);
  }
  fmt::print("\n");
  for (int64_t l = 0; l < d.layers; ++l) {
    const calib::LayerResult& r = cal.layer(l);
    const bool attn = !r.attn.w.empty();
    fmt::print("{:>5}  {:>11}", l, attn ? metric(r.attn.head_recall) : "dense");
    if (gqa) fmt::print("  {:>12}", attn ? metric(r.attn.group_recall) : "dense");
    fmt::print("  {:>5}  {:>7}", attn ? std::to_string(r.attn.epoch) : "-",
               attn ? metric(r.group_stats.coverage.at(size_t(calib::heads_kept(cal.head_density(), d.kv_heads)))) : "-");
    if (d.mlp) {
      fmt::print("  {:>6}  {:>6}   {:12}", metric(r.mlp.f1), fmt::format("{}/{}", r.mlp.epoch, r.mlp.epochs_run), "");
      for (int64_t k : r.k.k) fmt::print(" {:>5.2f}", static_cast<double>(k) / static_cast<double>(d.ffn));
    }
    fmt::print("\n");
  }
  const double density = cal.head_density();
  fmt::print("(random selection recalls {:.3f} of the heads",
             static_cast<double>(calib::heads_kept(density, d.heads)) / static_cast<double>(d.heads));
  if (gqa)
    fmt::print(", {:.3f} of the groups",
               static_cast<double>(calib::heads_kept(density, d.kv_heads)) / static_cast<double>(d.kv_heads));
  fmt::print(")\n(carried: the share of a token's attention-output energy the router's best {} of {} {} carry on the "
             "validation tokens; the calibrated density schedule gives more units to layers where it is low)\n",
             calib::heads_kept(density, d.kv_heads), d.kv_heads, gqa ? "KV groups" : "heads");
}

json layers_json(const calib::Calibration& cal) {
  json layers = json::array();
  for (int64_t l = 0; l < cal.dims().layers; ++l) {
    const calib::LayerResult& r = cal.layer(l);
    json j = {{"layer", l}, {"attention", nullptr}, {"mlp", nullptr}};
    if (!r.attn.w.empty())
      j["attention"] = {{"head_recall", r.attn.head_recall}, {"group_recall", r.attn.group_recall}, {"epoch", r.attn.epoch},
                        {"group_coverage", r.group_stats.coverage}, {"head_coverage", r.head_stats.coverage}};
    if (r.mlp.rank > 0)
      j["mlp"] = {{"f1", r.mlp.f1}, {"epoch", r.mlp.epoch}, {"epochs_run", r.mlp.epochs_run},
                  {"k", r.k.k},     {"k_recall", r.k.recall}};
    layers.push_back(j);
  }
  return layers;
}

int run_calibrate(const CalibrateArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  check(a.tokens >= 1, "--tokens must be at least 1, not {}", a.tokens);
  check(a.model.tp == 1, "polar calibrate records the whole model's activations on one rank: run it without --tp");
  check_writable(a.out);
  calib::check_text_files(a.text);
  LoadedModel m = load_model(a.model);
  check(a.seq <= m.model->config().max_positions, "--seq {} exceeds the model's context of {} tokens", a.seq,
        m.model->config().max_positions);
  calib::CalibrationText text = calib::read_calibration_text(a.text, m.tokenizer(), a.seq, a.tokens);
  fmt::print(stderr, "calibration text: {} tokens in {} sequences of up to {}{}\n", text.tokens, text.sequences.size(),
             a.seq, text.exhausted ? fmt::format(" (the files hold no more; --tokens asked for {})", a.tokens) : "");

  calib::CalibrationOptions options;
  options.work_dir = a.work.empty() ? a.out + ".work" : a.work;
  options.seed = a.seed;
  options.mlp_rank = a.mlp_rank;
  options.train.lr = a.lr;
  options.train.epochs = a.epochs;
  options.data = file_names(a.text);
  calib::CalibrationProgress progress;
  const auto t_collect = std::chrono::steady_clock::now();
  progress.collected = [&](int64_t done, int64_t total) {
    fmt::print(stderr, "\rcollected {}/{} tokens ({:.0f} tok/s)", done, total, done / std::max(seconds_since(t_collect), 1e-9));
    if (done == total) fmt::print(stderr, "\n");
  };
  progress.epoch = [](int64_t layer, const char* router, int64_t epoch, double x) {
    fmt::print(stderr, "layer {} {} router: epoch {}, validation {} {:.4f}\n", layer, router, epoch,
               std::strcmp(router, "mlp") == 0 ? "F1" : "recall", x);
  };
  progress.note = [](const std::string& s) { fmt::print(stderr, "{}\n", s); };
  calib::Calibration cal(*m.model, model_fingerprint(m.checkpoint), std::move(text.sequences), options, progress);
  fmt::print(stderr, "work directory {}: collection {:.2f} GB on disk; training ~{:.1f} MB of memory per layer\n",
             options.work_dir, cal.spill_bytes() / 1e9, cal.training_bytes() / 1e6);

  cal.collect();
  const double collect_s = seconds_since(t_collect);
  const auto t_train = std::chrono::steady_clock::now();
  for (int64_t l = 0; l < cal.dims().layers; ++l) {
    const bool has_router = cal.dims().has_norms(l) || cal.dims().mlp, fresh = has_router && !cal.trained(l);
    const auto t_layer = std::chrono::steady_clock::now();
    cal.train_layer(l);
    if (fresh) fmt::print(stderr, "layer {} trained in {:.1f} s\n", l, seconds_since(t_layer));
  }
  const double train_s = seconds_since(t_train);

  const std::string tmp = a.out + ".tmp";
  save_routers(tmp, cal.routers());
  std::error_code ec;
  fs::rename(tmp, a.out, ec);
  check(!ec, "cannot rename {} to {}: {}", tmp, a.out, ec.message());
  if (!a.keep_work) cal.remove_work_files();
  fmt::print(stderr, "wrote {} ({:.1f} MB) in {:.1f} s (collection {:.1f} s, training {:.1f} s)\n", a.out,
             fs::file_size(a.out) / 1e6, seconds_since(t0), collect_s, train_s);
  if (a.json) {
    fmt::print("{}\n", json{{"out", a.out},
                            {"tokens", cal.tokens()},
                            {"seconds", {{"total", seconds_since(t0)}, {"collection", collect_s}, {"training", train_s}}},
                            {"layers", layers_json(cal)}}
                           .dump(1));
  } else {
    print_table(cal, options.k_table);
  }
  return 0;
}

}  // namespace

Command calibrate_command() {
  auto a = std::make_shared<CalibrateArgs>();
  return {"calibrate",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("calibrate", "Train a model's routers on calibration text and write its "
                                                      "router file");
            c->footer(
                "Runs the model over the text (tokenized with the model's tokenizer, each file cut into sequences "
                "of --seq tokens, BOS first where the model has one; one sequence of each file in turn until "
                "--tokens tokens), records per "
                "layer and token the attention router's input, every query head's output norm and, for ReLU models "
                "(OPT), which MLP neurons fire, then trains per layer an attention router (layers 1..L-1) and, for "
                "ReLU models, a rank --mlp-rank MLP router and the table of MLP neurons kept per batch size "
                "(polar-method.md §4). Files ending in .jsonl hold one JSON object a line with \"text\", or "
                "\"prefix\" and \"gold_completion\"; other files are plain text.\n"
                "Disk: the collection writes tokens x layers x (2d + 4H + D/8) bytes to --work (fp16 router "
                "inputs, fp32 head norms, one bit per MLP neuron), e.g. 400k tokens of OPT-6.7B ~130 GB; removed "
                "after success unless --keep-work.\n"
                "Peak memory: collection holds the model on --device, one step of up to ~2048 tokens (its KV cache, "
                "2 x layers x 2048 x d values, and activations) and 1 MiB per spill file; training holds one layer at a time, 20 x (H(d + 1) + rank(d + D)) bytes plus "
                "a few [320, D] fp32 buffers (OPT-6.7B at rank 1024: ~0.5 GB); spilled arrays are memory-mapped.\n"
                "Interrupted? Run the same command again: a complete collection and the layers already trained "
                "in --work are reused, and the router file comes out byte-identical.\n");
            a->model.add(*c);
            c->add_option("--text", a->text, "Calibration text files (plain text or .jsonl)")->required()->expected(1, -1);
            c->add_option("--out,-o", a->out, "Router file to write (e.g. M.routers.safetensors)")->required();
            c->add_option("--tokens", a->tokens, "Tokens to calibrate on")->capture_default_str();
            c->add_option("--seq", a->seq, "Tokens per sequence")->capture_default_str()->check(between(2, 1 << 20));
            c->add_option("--seed", a->seed, "Seed of the split, initial weights, minibatch order and k-table groups")
                ->capture_default_str();
            c->add_option("--mlp-rank", a->mlp_rank, "Rank of the MLP routers (ReLU models only)")
                ->capture_default_str()
                ->check(above(0));
            c->add_option("--lr", a->lr, "AdamW learning rate")->capture_default_str()->check(above(0));
            c->add_option("--epochs", a->epochs,
                          "Attention routers: epochs (the best by validation recall is kept); MLP routers: at most "
                          "this many (early stop on validation F1)")
                ->capture_default_str()
                ->check(between(1, 100000));
            c->add_option("--work", a->work, "Work directory for the collection and resume state (default: --out + .work)");
            c->add_flag("--keep-work", a->keep_work, "Keep the work directory after success (to retrain with other "
                                                     "training options without collecting again)");
            c->add_flag("--json", a->json, "Print the per-layer results as JSON");
          },
          [a] { return run_calibrate(*a); }};
}

}  // namespace polar::cli
