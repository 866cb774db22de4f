// Pieces every subcommand shares: loading a model onto a device, token parsing, progress on stderr.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "io/checkpoint.h"
#include "model/model.h"
#include "sparse/router_sparsity.h"

namespace polar::cli {

struct ModelOptions {
  std::string model;
  std::string device = "cpu";
  std::string dtype = "f16";
  std::string routers;  // router file (polar routers); empty = none
  double density = 0;   // head (KV group) density of sparse decode steps; 0 = the router file's own
  // Who picks the heads: router, oracle (the largest true outputs: what routers are trained to predict), static
  // (the same heads for every token: calibration's most often important) or random (the chance baseline)
  std::string selector = "router";
  uint64_t selector_seed = 0;
  std::string granularity = "group";  // group (KV groups) or head (query heads, GQA models)
  // Adaptive selection (sparse/selection.h): the rule, its bounds (kmax 0 = every unit) and the schedule
  std::string selection = "topk";
  int64_t kmin = 1, kmax = 0;
  std::string density_schedule = "uniform";
  std::string sparse_mlp = "fastest";  // the CUDA backend's SparseMlpPath: fastest, kernel or dense
  int tp = 1;                          // tensor-parallel ranks (docs/parallel.md)
  std::string devices;                 // the ranks' CUDA devices ("2,3"); empty: 0..tp-1
  std::string tp_heads = "global";     // how ranks share a sparse step's heads: global or balanced
  bool tp_comm = false;                // --tp 1 through a one-rank communicator (what the collectives cost)
  // --model (required; returned so a command with other model sources can relax that), --device, --dtype,
  // --tp, --devices, --tp-comm
  CLI::Option* add(CLI::App& app);
  // --routers, --density, --tp-heads, --selection, --kmin, --kmax, --density-schedule; with selectors,
  // also --selector, --selector-seed and --granularity
  void add_sparsity(CLI::App& app, bool selectors = false);
  // The device of each rank: "cpu" for all on the CPU; --devices, or cuda:0..tp-1, on CUDA.
  std::vector<std::string> rank_devices() const;
  DType activation_dtype() const;
  SparseMlpPath sparse_mlp_path() const;
};
// --sparse-mlp's choices and their SparseMlpPath.
void add_sparse_mlp_option(CLI::App& app, std::string& value);
SparseMlpPath sparse_mlp_path(const std::string& value);

// With --tp N > 1, backend, model and sparsity are rank 0's, and the model and sparsity own the other
// ranks' (Model::rank, Sparsity::rank); the other ranks' backends and every rank's communicator are kept here.
struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> backend;
  std::vector<std::unique_ptr<Backend>> peer_backends;  // ranks 1..N-1
  std::vector<std::unique_ptr<Communicator>> comms;     // ranks 0..N-1 (none alone)
  std::unique_ptr<Model> model;
  std::unique_ptr<Sparsity> sparsity;  // set by load_sparsity for sparse decoding; null = dense
  RouterSparsity* routers = nullptr;   // the same object when routers select (benchmarks read its sizes)
  HeadSelector* selector = nullptr;    // the same object whoever selects
  double density = 1.0;                // of the sparsity in use (the mean aimed at)
  const Tokenizer& tokenizer() const;  // error if the checkpoint carries none
};

// Loads the checkpoint (opt.model, or what `checkpoint` makes) and builds the model on the device,
// logging to stderr.
LoadedModel load_model(const ModelOptions& opt);
LoadedModel load_model(const ModelOptions& opt, const std::function<Checkpoint()>& checkpoint);

// The model of a benchmark: a checkpoint (--model), or a synthetic model with random weights of a named
// shape (--shape) or shaped by a Hugging Face config.json (--config).
struct BenchModelOptions {
  ModelOptions model;
  std::string shape;
  std::string config;
  // --model (not required), --device, --dtype, --shape, --config, and the sparsity flags.
  void add(CLI::App& app);
  // What results call the model: the shape, the folder of a config.json (else the file's stem), or a
  // checkpoint's file or folder name.
  std::string label() const;
  // Loads it; synthetic weights are drawn from `seed`.
  LoadedModel load(uint64_t seed) const;
  // Its config alone, without weights (a client of a server that runs the model).
  ModelConfig model_config() const;
};

// The scheduler's batching limits a serving command takes: --max-seqs, --max-batch-tokens, --kv-tokens
// (kv_default says what 0 means there).
struct BatchingOptions {
  int64_t max_seqs = 64;
  int64_t max_batch_tokens = 2048;
  int64_t kv_tokens = 0;
  bool prefix_caching = true;  // SchedulerOptions::prefix_caching; --no-prefix-caching
  void add(CLI::App& app, const std::string& kv_default);
  // --kv-tokens, or default_kv_tokens for sequences of `longest` tokens when it is 0.
  int64_t kv_tokens_for(const LoadedModel& m, int64_t longest) const;
};

// The KV cache a server-like run gets unless told: max_seqs sequences of `longest` tokens each, unless that
// is more than 90% of the device's free memory holds beside a step of max_batch_tokens tokens (then
// sequences are preempted when the cache fills). Too little room for one sequence is a polar::Error. Under
// tensor parallelism each rank's device holds its own KV heads' share.
int64_t default_kv_tokens(const LoadedModel& m, int64_t max_seqs, int64_t longest, int64_t max_batch_tokens);
// The memory of a KV cache of `tokens` tokens: "X GB", or under tensor parallelism, where each rank holds its
// KV heads' share, "X GB per rank, Y GB over N ranks".
std::string kv_cache_size(const Model& model, int64_t tokens);

// Sparse decoding per --routers / --density: the router file, validated against the model; without a file
// but with a density below 1, random routers drawn from `seed` when `random_allowed` (benchmarks), else an
// error. Nothing when neither option is given or the density is 1.
void load_sparsity(LoadedModel& m, const ModelOptions& opt, bool random_allowed, uint64_t seed);

// The mean density the sparse steps so far reached (HeadSelector::density_reached), or nullopt (dense, or
// no step yet).
std::optional<double> density_reached(const LoadedModel& m);
// Prints it to stderr ("mean density reached: ..."), if any; `what` names the run.
void report_density_reached(const LoadedModel& m, const std::string& what = "");

// Range checks for numeric flags whose messages read as a person would say them ("--temperature: must be
// >= 0, got -1"); CLI11's own NonNegativeNumber prints the largest double as the upper bound. A value that
// is not a number is CLI11's conversion error before these run.
CLI::Validator at_least(double lo);       // x >= lo
CLI::Validator above(double lo);          // x > lo
CLI::Validator between(double lo, double hi);  // lo <= x <= hi
CLI::Validator above_at_most(double lo, double hi);  // lo < x <= hi

// "5,17,42" -> {5, 17, 42}; anything else is a polar::Error.
std::vector<int32_t> parse_token_list(const std::string& s);

// Reads a whole text file; error naming the path if it cannot be read.
std::string read_text_file(const std::string& path);

}  // namespace polar::cli
