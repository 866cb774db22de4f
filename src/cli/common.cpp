#include "cli/common.h"

#include <charconv>
#include <filesystem>
#include <chrono>
#include <fstream>
#include <iterator>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include "bench/shapes.h"

#include "sparse/oracle_sparsity.h"
#include "sparse/random_sparsity.h"
#include "sparse/static_sparsity.h"

namespace polar::cli {

CLI::Option* ModelOptions::add(CLI::App& app) {
  CLI::Option* model_option =
      app.add_option("--model,-m", model, "Model: a Hugging Face directory or a GGUF file")->required();
  app.add_option("--device", device, "cpu or cuda[:N]")->capture_default_str();
  app.add_option("--dtype", dtype, "Weights/activations/KV on CUDA: f16 or bf16 (the CPU computes in f32)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f16", "bf16"}));
  app.add_option("--tp", tp,
                 "Tensor parallelism: split the model's heads and MLP over this many ranks (threads on the CPU, GPUs "
                 "on CUDA; docs/parallel.md)")
      ->capture_default_str()
      ->check(at_least(1));
  app.add_option("--devices", devices, "The ranks' CUDA devices with --tp, e.g. 2,3 (default: 0..tp-1)");
  app.add_flag("--tp-comm", tp_comm,
               "Run even --tp 1 through a communicator (NCCL on CUDA), every all-reduce issued: measures what the "
               "collectives cost against the plain path");
  return model_option;
}

std::vector<std::string> ModelOptions::rank_devices() const {
  if (device == "cpu") {
    check(devices.empty(), "--devices names CUDA devices; the ranks of --device cpu are threads");
    return std::vector<std::string>(static_cast<size_t>(tp), "cpu");
  }
  std::vector<std::string> out;
  if (!devices.empty()) {
    check(device == "cuda", "--devices {} with --device {}: give --device cuda", devices, device);
    for (int32_t d : parse_token_list(devices)) out.push_back(fmt::format("cuda:{}", d));
    check(static_cast<int>(out.size()) == tp, "--devices {} names {} devices for --tp {}", devices, out.size(), tp);
  } else if (tp == 1) {
    out.push_back(device);
  } else {
    check(device == "cuda", "--device {} is one GPU; --tp {} takes cuda:0..{} (--device cuda) or --devices", device,
          tp, tp - 1);
    for (int r = 0; r < tp; ++r) out.push_back(fmt::format("cuda:{}", r));
  }
  return out;
}

namespace {

// A validator over the flag's value as a double; `ok` says whether it is allowed and `rule` what is.
CLI::Validator numeric_rule(std::function<bool(double)> ok, std::string rule) {
  return CLI::Validator(
      [ok = std::move(ok), rule](std::string& text) -> std::string {
        double x = 0;
        if (!CLI::detail::lexical_cast(text, x)) return fmt::format("must be a number, got '{}'", text);
        return ok(x) ? std::string() : fmt::format("must be {}, got {}", rule, text);
      },
      rule);
}

}  // namespace

CLI::Validator at_least(double lo) {
  return numeric_rule([lo](double x) { return x >= lo; }, fmt::format(">= {}", lo));
}

CLI::Validator above(double lo) {
  return numeric_rule([lo](double x) { return x > lo; }, fmt::format("> {}", lo));
}

CLI::Validator between(double lo, double hi) {
  return numeric_rule([lo, hi](double x) { return x >= lo && x <= hi; }, fmt::format("in [{}, {}]", lo, hi));
}

CLI::Validator above_at_most(double lo, double hi) {
  return numeric_rule([lo, hi](double x) { return x > lo && x <= hi; }, fmt::format("in ({}, {}]", lo, hi));
}

void ModelOptions::add_sparsity(CLI::App& app, bool selectors) {
  app.add_option("--routers", routers, "Router file for sparse decoding (polar routers)");
  app.add_option("--density", density,
                 "Share of attention heads (KV groups for GQA) each sequence keeps in decode steps, in (0, 1]; "
                 "default: the router file's")
      ->check(above_at_most(0, 1));
  add_sparse_mlp_option(app, sparse_mlp);
  app.add_option("--tp-heads", tp_heads,
                 "With --tp: global (every rank takes the whole model's top heads, the selection of --tp 1, and runs "
                 "its own; ranks may get unequal work) or balanced (each rank its own best k/N: equal work, another "
                 "selection; router selection only)")
      ->capture_default_str()
      ->check(CLI::IsMember({"global", "balanced"}));
  app.add_option("--selection", selection,
                 "How many heads (KV groups) a token keeps: topk (exactly the density's k), threshold (those whose "
                 "router score clears the layer's calibrated threshold) or stat-topk (those above mean + c·std of the "
                 "token's own scores, c calibrated per layer); the threshold rules keep --kmin..--kmax and need a "
                 "router file from polar calibrate (stat-topk also runs on random routers: synthetic normal scores)")
      ->capture_default_str()
      ->check(CLI::IsMember({"topk", "threshold", "stat-topk"}));
  app.add_option("--kmin", kmin, "Threshold rules: the fewest heads (KV groups) a token keeps")
      ->capture_default_str()
      ->check(at_least(1));
  app.add_option("--kmax", kmax,
                 "Threshold rules: the most heads (KV groups) a token keeps, the width of the head lists (0: all)")
      ->capture_default_str()
      ->check(at_least(0));
  app.add_option("--density-schedule", density_schedule,
                 "uniform (every layer keeps the density's share) or calibrated (the same mean spread over the layers "
                 "by the router file's per-layer importance: more heads where the router's best heads carry less of "
                 "the attention output)")
      ->capture_default_str()
      ->check(CLI::IsMember({"uniform", "calibrated"}));
  if (!selectors) return;
  app.add_option("--selector", selector,
                 "Who picks the heads: router (the router file's routers), oracle (the heads with the largest true "
                 "output norm, from a dense attention: what the routers are trained to predict; no routers), static (the same heads for every "
                 "token, those most often important in calibration: the router file's head shares) or random (as "
                 "many heads at random: the chance baseline; no routers)")
      ->capture_default_str()
      ->check(CLI::IsMember({"router", "oracle", "static", "random"}));
  app.add_option("--selector-seed", selector_seed, "Seed of --selector random")->capture_default_str();
  app.add_option("--granularity", granularity,
                 "What a token keeps: group (KV groups: what saves KV reads) or head (query heads of GQA models, the "
                 "others' outputs zeroed: for accuracy comparison, no KV read saved); the same for MHA models")
      ->capture_default_str()
      ->check(CLI::IsMember({"group", "head"}));
}

namespace {

// --selector oracle / static / random, which need no routers (static reads only the file's head shares), for
// `model` (one rank's).
std::unique_ptr<HeadSelector> baseline_selector(const LoadedModel& m, Model& model, const ModelOptions& opt,
                                                Granularity g) {
  check(opt.density > 0 && opt.density < 1, "--selector {} needs --density below 1", opt.selector);
  check(opt.tp == 1 || parse_tp_heads(opt.tp_heads) == TpHeads::Global,
        "--tp-heads balanced needs router selection (--selector router): each rank scores its own heads");
  if (opt.selector == "static") {
    check(!opt.routers.empty(), "--selector static needs --routers FILE (its head shares rank the heads)");
    const Routers routers = load_routers(opt.routers, model.config(), model_fingerprint(m.checkpoint));
    return std::make_unique<StaticSparsity>(model, routers, opt.density, opt.routers, g);
  }
  check(opt.routers.empty(), "--selector {} picks heads without routers: drop --routers", opt.selector);
  if (opt.selector == "oracle") return std::make_unique<OracleSparsity>(model, opt.density, g);
  check(opt.selector == "random", "unknown selector '{}': choose router, oracle, static or random", opt.selector);
  return std::make_unique<RandomSparsity>(model, opt.density, opt.selector_seed, g);
}

// One Sparsity per rank of m.model, made by make(rank's model): rank 0's, owning the others'.
template <typename S>
std::unique_ptr<S> for_every_rank(LoadedModel& m, const std::function<std::unique_ptr<S>(Model&)>& make) {
  // Each rank's routers are uploaded with its device current (CUDA allocates on the current device).
  m.backend->bind_thread();
  std::unique_ptr<S> first = make(*m.model);
  for (int r = 1; r < m.model->ranks(); ++r) {
    m.model->rank(r).backend().bind_thread();
    first->add_rank(make(m.model->rank(r)));
  }
  m.backend->bind_thread();
  return first;
}

}  // namespace

ModelConfig BenchModelOptions::model_config() const {
  label();  // says which flags give a model when none was
  if (!shape.empty()) return shape_config(shape);
  if (!config.empty()) return load_hf_config(config);
  return load_checkpoint_metadata(model.model).config;
}

void BenchModelOptions::add(CLI::App& app) {
  CLI::Option* checkpoint = model.add(app);
  model.add_sparsity(app);
  checkpoint->required(false);
  CLI::Option* shape_option = app.add_option(
      "--shape", shape,
      fmt::format("Synthetic model with random weights of this shape: {}", fmt::join(shape_names(), ", ")));
  CLI::Option* config_option =
      app.add_option("--config", config, "Synthetic model with random weights shaped by this Hugging Face config.json");
  shape_option->excludes(checkpoint)->excludes(config_option);
  config_option->excludes(checkpoint);
}

std::string BenchModelOptions::label() const {
  namespace fs = std::filesystem;
  check(!model.model.empty() || !shape.empty() || !config.empty(),
        "a benchmark needs a model: --model PATH, --shape NAME or --config FILE");
  if (!shape.empty()) return shape;
  const bool from_config = !config.empty();
  fs::path p = fs::absolute(from_config ? config : model.model).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // a folder given with a trailing slash
  if (from_config) return (p.filename() == "config.json" ? p.parent_path().filename() : p.stem()).string();
  return p.filename().string();
}

LoadedModel BenchModelOptions::load(uint64_t seed) const {
  const std::string name = label();
  if (!model.model.empty()) return load_model(model);
  const ModelConfig c = shape.empty() ? load_hf_config(config) : shape_config(shape);
  return load_model(model, [&] { return synthetic_checkpoint(c, "synthetic " + name, seed); });
}

void BatchingOptions::add(CLI::App& app, const std::string& kv_default) {
  app.add_option("--max-seqs", max_seqs, "Sequences in the running batch at most")->capture_default_str()
      ->check(at_least(1));
  app.add_option("--max-batch-tokens", max_batch_tokens, "Tokens per engine step at most (decode tokens + prompt chunks)")
      ->capture_default_str()->check(at_least(1));
  app.add_option("--kv-tokens", kv_tokens, "KV cache capacity in tokens (0: " + kv_default + ")")
      ->capture_default_str()->check(at_least(0));
  app.add_flag("!--no-prefix-caching", prefix_caching,
               "Compute every prompt in full: no reuse of the cached K/V of earlier requests' prefixes");
}

int64_t BatchingOptions::kv_tokens_for(const LoadedModel& m, int64_t longest) const {
  return kv_tokens ? kv_tokens : default_kv_tokens(m, max_seqs, longest, max_batch_tokens);
}

int64_t default_kv_tokens(const LoadedModel& m, int64_t max_seqs, int64_t longest, int64_t max_batch_tokens) {
  const ModelConfig& c = m.model->config();
  const int64_t want = max_seqs * (longest + 16);  // + a partly used block each
  const double activations = static_cast<double>(max_batch_tokens) * 4.0 *
                             static_cast<double>(4 * c.hidden + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.ffn);
  // Tokens whose KV (per_token bytes each) fit in 90% of what `be` has free, beside the step's activations.
  auto fit = [&](Backend& be, int64_t per_token) {
    const double room = 0.9 * static_cast<double>(be.memory_info().first) - activations - 1e9;
    check(room > static_cast<double>(per_token * longest),
          "the device has no room for a KV cache of even one sequence of {} tokens", longest);
    return static_cast<int64_t>(room / static_cast<double>(per_token));
  };
  // Under tensor parallelism each rank caches only its own KV heads (docs/parallel.md): a CUDA rank has a GPU
  // of its own, so the fullest one sets the size; CPU ranks share the host's memory, so their heads add up.
  const bool one_memory = m.backend->device() == Device::CPU;
  int64_t tokens = want, host_per_token = 0;
  for (int r = 0; r < m.model->ranks(); ++r) {
    Model& rank = m.model->rank(r);
    const int64_t per_token = rank.kv_bytes_per_token();
    if (one_memory)
      host_per_token += per_token;
    else
      tokens = std::min(tokens, fit(rank.backend(), per_token));
  }
  return one_memory ? std::min(tokens, fit(*m.backend, host_per_token)) : tokens;
}

std::string kv_cache_size(const Model& model, int64_t tokens) {
  const double per_rank = static_cast<double>(tokens * model.kv_bytes_per_token()) / 1e9;
  if (model.ranks() == 1) return fmt::format("{:.3g} GB", per_rank);
  return fmt::format("{:.3g} GB per rank, {:.3g} GB over {} ranks", per_rank, per_rank * model.ranks(), model.ranks());
}

void load_sparsity(LoadedModel& m, const ModelOptions& opt, bool random_allowed, uint64_t seed) {
  const ModelConfig& c = m.model->config();
  const Granularity granularity = parse_granularity(opt.granularity);
  const SelectionOptions selection{parse_selection_rule(opt.selection), parse_density_schedule(opt.density_schedule),
                                   opt.kmin, opt.kmax};
  if (opt.selector != "router") {
    check(!selection.adaptive() && selection.schedule == DensitySchedule::Uniform && opt.kmin == 1 && opt.kmax == 0,
          "--selection, --kmin, --kmax and --density-schedule choose how routers select: the baselines (--selector {}) "
          "keep a uniform top-k",
          opt.selector);
    std::unique_ptr<HeadSelector> selector = for_every_rank<HeadSelector>(
        m, [&](Model& model) { return baseline_selector(m, model, opt, granularity); });
    fmt::print(stderr, "{} heads: {} per token at layers 1..{}{}\n", opt.selector, selector->describe(), c.n_layers - 1,
               opt.selector == "random" ? fmt::format(" (seed {})", opt.selector_seed) : "");
    m.selector = selector.get();
    m.sparsity = std::move(selector);
    m.density = opt.density;
    return;
  }
  Routers routers;
  if (!opt.routers.empty()) {
    routers = load_routers(opt.routers, c, model_fingerprint(m.checkpoint));
  } else if (opt.density > 0 && opt.density < 1) {
    check(random_allowed, "--density needs --routers FILE (polar routers --random makes random ones)");
    routers = random_routers(c, model_fingerprint(m.checkpoint), seed);
    fmt::print(stderr, "random routers (seed {}) for the sparse decode steps\n", seed);
    check(selection.rule != SelectionRule::Threshold && selection.schedule == DensitySchedule::Uniform,
          "--selection threshold and --density-schedule calibrated need calibrated routers (--routers FILE from polar "
          "calibrate): random routers have no score distribution or layer importance to calibrate them by");
    if (selection.rule == SelectionRule::StatTopK) {
      // Random routers' scores of a token's query heads are close to independent normals of one scale, so
      // statistical top-k's c comes from that distribution (synthetic, not measured).
      routers.selection = synthetic_stat_topk_stats(c.n_layers, c.n_heads, c.n_kv_heads);
      fmt::print(stderr, "stat-topk on random routers: c from independent normal head scores (synthetic)\n");
    }
  } else {
    return;
  }
  const double density = opt.density > 0 ? opt.density : routers.head_density;
  check(density > 0, "--density must be in (0, 1]");
  const TpHeads tp_heads = parse_tp_heads(opt.tp_heads);
  auto router_sparsity = for_every_rank<RouterSparsity>(m, [&](Model& model) {
    return std::make_unique<RouterSparsity>(model, routers, density, granularity, tp_heads, selection,
                                            opt.routers.empty() ? "random routers" : opt.routers);
  });
  m.routers = router_sparsity.get();
  m.selector = router_sparsity.get();
  m.density = density;
  m.sparsity = std::move(router_sparsity);
  fmt::print(stderr, "sparse decoding: {} per sequence at layers 1..{}{}{}\n", m.routers->describe(), c.n_layers - 1,
             routers.mlp_k ? ", MLP neurons per the router file's k table" : "",
             opt.tp > 1 ? fmt::format(", heads shared over {} ranks: {}", opt.tp, opt.tp_heads) : "");
}

std::optional<double> density_reached(const LoadedModel& m) {
  return m.selector ? m.selector->density_reached() : std::nullopt;
}

void report_density_reached(const LoadedModel& m, const std::string& what) {
  if (const std::optional<double> d = density_reached(m))
    fmt::print(stderr, "{}mean density reached: {:.4f} (units kept / units, over layers 1..{} and the sparse tokens{})\n",
               what.empty() ? "" : what + ": ", *d, m.model->config().n_layers - 1,
               m.selector->selection().adaptive() ? ", tallied on the device" : "; exact for top-k");
}

DType ModelOptions::activation_dtype() const { return dtype == "bf16" ? DType::BF16 : DType::F16; }

SparseMlpPath ModelOptions::sparse_mlp_path() const { return cli::sparse_mlp_path(sparse_mlp); }

void add_sparse_mlp_option(CLI::App& app, std::string& value) {
  app.add_option("--sparse-mlp", value,
                 "How a CUDA device runs the sparse MLP (same values either way): fastest (the faster of the gather "
                 "kernel and the dense GEMM, timed once per shape), kernel (always the gather kernel) or dense "
                 "(always the dense GEMM, selected neurons moved in and out)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fastest", "kernel", "dense"}));
}

SparseMlpPath sparse_mlp_path(const std::string& value) {
  if (value == "kernel") return SparseMlpPath::gather_kernel;
  if (value == "dense") return SparseMlpPath::dense_gemm;
  return SparseMlpPath::fastest;
}

const Tokenizer& LoadedModel::tokenizer() const {
  check(checkpoint.tokenizer != nullptr, "{} has no tokenizer (use a GGUF file, or a directory with tokenizer.json)",
        checkpoint.path);
  return *checkpoint.tokenizer;
}

LoadedModel load_model(const ModelOptions& opt) {
  return load_model(opt, [&] { return load_checkpoint(opt.model); });
}

LoadedModel load_model(const ModelOptions& opt, const std::function<Checkpoint()>& checkpoint) {
  auto t0 = std::chrono::steady_clock::now();
  LoadedModel m;
  const std::vector<std::string> devices = opt.rank_devices();
  // CPU ranks share the cores (make_cpu_backend's share), CUDA ranks have a GPU each.
  auto make_rank_backend = [&](size_t r) {
    return devices[r] == "cpu" ? make_cpu_backend(opt.tp) : make_backend(devices[r], opt.activation_dtype(), opt.sparse_mlp_path());
  };
  m.backend = make_rank_backend(0);
  m.checkpoint = checkpoint();
  if (opt.tp == 1 && !opt.tp_comm) {
    m.model = make_model(m.checkpoint, *m.backend);
  } else {
    shard_dims(m.checkpoint.config, 0, opt.tp);  // an uneven split fails before any other device is set up
    std::vector<Backend*> backends = {m.backend.get()};
    for (size_t r = 1; r < devices.size(); ++r) {
      m.peer_backends.push_back(make_rank_backend(r));
      backends.push_back(m.peer_backends.back().get());
    }
    m.comms = make_communicators(backends);
    std::vector<Communicator*> comms;
    for (const auto& comm : m.comms) comms.push_back(comm.get());
    m.model = make_model(m.checkpoint, backends, comms);
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print(stderr, "loaded {} ({}, {}) on {}{} in {:.2f} s\n", m.checkpoint.path, m.checkpoint.config.model_type,
             m.checkpoint.weight_types, m.backend->name(),
             opt.tp > 1      ? fmt::format(" as rank 0 of {} (--tp)", opt.tp)
             : opt.tp_comm ? " through a one-rank communicator (--tp-comm)"
                           : "",
             s);
  return m;
}

std::vector<int32_t> parse_token_list(const std::string& s) {
  std::vector<int32_t> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    std::string_view item(s.data() + pos, end - pos);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    int32_t v = 0;
    auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    check(!item.empty() && ec == std::errc() && p == item.data() + item.size(), "invalid token id '{}' in '{}'", item, s);
    out.push_back(v);
    pos = end + 1;
  }
  return out;
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  check(f.good(), "cannot read {}", path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

}  // namespace polar::cli
