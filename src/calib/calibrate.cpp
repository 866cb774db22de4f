#include "calib/calibrate.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <tuple>

#include <fmt/format.h>

#include "io/safetensors.h"

namespace polar::calib {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int64_t kStateFormat = 1;
// What a trained layer file holds; part of the training key, so layers trained by an older polar (format 1:
// no head shares; 2: no selection statistics) are trained again while their collection is reused.
constexpr int64_t kLayerFormat = 3;
constexpr const char* kStateFile = "state.json";
constexpr const char* kLayerMetaKey = "polar.calib";

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ULL;
  return h;
}

// Identifies the token sequences (their lengths and ids): a work directory's collection is reused only for
// exactly these.
std::string token_hash(const std::vector<std::vector<int32_t>>& sequences) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (const auto& s : sequences) {
    const uint64_t n = s.size();
    h = fnv1a(h, &n, sizeof n);
    h = fnv1a(h, s.data(), s.size() * sizeof(int32_t));
  }
  return fmt::format("{:016x}", h);
}

// Writes `text` to path through a temporary file and a rename, so the file is always whole or absent.
void write_atomically(const std::string& path, const std::function<void(const std::string&)>& write) {
  const std::string tmp = path + ".tmp";
  write(tmp);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  check(!ec, "cannot rename {} to {}: {}", tmp, path, ec.message());
}

// A host fp32 tensor holding `values` in `shape`.
Tensor tensor_of(const std::vector<float>& values, Shape shape) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  check(static_cast<size_t>(t.numel()) == values.size(), "router of {} values does not fill {}", values.size(),
        shape_str(t.shape()));
  std::memcpy(t.raw(), values.data(), t.nbytes());
  return t;
}

// The field names of two JSON objects whose values differ, for an error message.
std::string differing_fields(const json& a, const json& b) {
  std::string out;
  for (const auto& [key, value] : a.items())
    if (!b.contains(key) || b[key] != value) out += (out.empty() ? "" : ", ") + key;
  return out.empty() ? "format" : out;
}

}  // namespace

Calibration::Calibration(Model& model, std::string fingerprint, std::vector<std::vector<int32_t>> sequences,
                         CalibrationOptions options, CalibrationProgress progress)
    : model_(model),
      fingerprint_(std::move(fingerprint)),
      sequences_(std::move(sequences)),
      options_(std::move(options)),
      progress_(std::move(progress)),
      dims_(SpillDims::of(model.config())) {
  const ModelConfig& c = model.config();
  check(dims_.layers >= 2 || dims_.mlp,
        "nothing to calibrate: the model has one layer, which is always dense, and a gated MLP, which has no router");
  check(c.n_heads % c.n_kv_heads == 0, "{} query heads do not form groups over {} KV heads", c.n_heads, c.n_kv_heads);
  for (const auto& s : sequences_) {
    check(static_cast<int64_t>(s.size()) <= c.max_positions,
          "a calibration sequence of {} tokens exceeds the model's context of {} (lower --seq)", s.size(),
          c.max_positions);
    tokens_ += static_cast<int64_t>(s.size());
  }
  check(tokens_ >= 2, "calibration needs at least 2 tokens (one to validate on), got {}", tokens_);
  if (dims_.mlp) {
    check(options_.mlp_rank >= 1, "the MLP router rank must be at least 1, not {}", options_.mlp_rank);
    check_k_tokens(validation_tokens(tokens_), options_.k_table);
  }
  check(!options_.work_dir.empty(), "calibration needs a work directory");
  std::error_code ec;
  fs::create_directories(options_.work_dir, ec);
  check(!ec && fs::is_directory(options_.work_dir), "cannot create work directory {}{}", options_.work_dir,
        ec ? ": " + ec.message() : "");

  const TrainOptions& t = options_.train;
  const KTableOptions& k = options_.k_table;
  collection_key_ = {{"model", fingerprint_},
                     {"backend", model.backend().name()},
                     {"dtype", dtype_name(model.backend().activation_dtype())},
                     {"tokens", tokens_},
                     {"sequences", sequences_.size()},
                     {"token_hash", token_hash(sequences_)}};
  training_key_ = {{"layer_format", kLayerFormat},
                   {"seed", options_.seed},
                   {"mlp_rank", dims_.mlp ? options_.mlp_rank : 0},
                   {"lr", t.lr},
                   {"weight_decay", t.weight_decay},
                   {"batch", t.batch},
                   {"epochs", t.epochs},
                   {"patience", t.patience},
                   {"f1_stop", t.f1_stop},
                   {"head_density", t.head_density},
                   {"k_batch_sizes", k.batch_sizes},
                   {"k_groups", k.groups},
                   {"k_target", k.target},
                   {"k_multiple", k.multiple}};
  done_.assign(static_cast<size_t>(dims_.layers), false);
  results_.resize(static_cast<size_t>(dims_.layers));

  const std::string state_path = path(kStateFile);
  if (!fs::exists(state_path)) return;
  try {
    std::ifstream f(state_path);
    resume(json::parse(std::string(std::istreambuf_iterator<char>(f), {})));
  } catch (const json::exception& e) {
    fail("{}: corrupt calibration state ({}); remove the work directory to start over", state_path, e.what());
  }
}

void Calibration::resume(const json& state) {
  check(state.is_object() && state.value("format", int64_t(0)) == kStateFormat,
        "{}: not a calibration state of format {}", path(kStateFile), kStateFormat);
  const json& collection = state.at("collection");
  check(collection == collection_key_,
        "work directory {} holds the collection of another calibration ({} differ); remove it or choose another "
        "--work",
        options_.work_dir, differing_fields(collection_key_, collection));
  collected_ = state.at("collected").get<bool>() && spill_complete(options_.work_dir, dims_, tokens_);
  if (collected_ && progress_.note)
    progress_.note(fmt::format("collection of {} tokens found complete in {}: not collected again", tokens_,
                               options_.work_dir));
  const json& training = state.at("training");
  if (training != training_key_) {
    if (progress_.note)
      progress_.note(fmt::format("training options differ from the work directory's ({}): every layer is trained again",
                                 differing_fields(training_key_, training)));
    return;
  }
  int64_t reused = 0;
  for (const json& l : state.at("layers")) {
    const int64_t layer = l.get<int64_t>();
    if (!collected_ || layer < 0 || layer >= dims_.layers || !fs::exists(layer_path(layer))) continue;
    results_[size_t(layer)] = read_layer(layer);
    done_[size_t(layer)] = true;
    ++reused;
  }
  if (reused > 0 && progress_.note)
    progress_.note(fmt::format("{} of {} layers found trained in {}: not trained again", reused, dims_.layers,
                               options_.work_dir));
}

int64_t Calibration::training_bytes() const {
  const int64_t d = dims_.hidden, H = dims_.heads, D = dims_.ffn, r = options_.mlp_rank;
  const int64_t batch = options_.train.batch, eval = kValidationChunk;
  // Five copies of the parameters (weights, gradient, two moments, the best epoch) plus the minibatch and
  // validation buffers (inputs, labels, logits, low-rank activations).
  const int64_t attn = 5 * H * (d + 1) + (batch + eval) * (d + 3 * H);
  const int64_t mlp = dims_.mlp ? 5 * r * (d + D) + (batch + eval) * (d + 2 * D + 2 * r) : 0;
  return 4 * std::max(attn, mlp);
}

std::string Calibration::path(const std::string& name) const { return (fs::path(options_.work_dir) / name).string(); }

std::string Calibration::layer_path(int64_t layer) const { return path(fmt::format("layer.{}.safetensors", layer)); }

void Calibration::write_state() const {
  json layers = json::array();
  for (int64_t l = 0; l < dims_.layers; ++l)
    if (done_[size_t(l)]) layers.push_back(l);
  const json state = {{"format", kStateFormat},
                      {"collection", collection_key_},
                      {"collected", collected_},
                      {"training", training_key_},
                      {"layers", layers}};
  write_atomically(path(kStateFile), [&](const std::string& tmp) {
    std::ofstream f(tmp);
    f << state.dump(1) << '\n';
    f.close();
    check(!f.fail(), "cannot write {}", tmp);
  });
}

void Calibration::collect() {
  if (collected_) return;
  // Space the collection's own earlier files (an interrupted attempt) take is given back as they are rewritten.
  int64_t reclaimable = 0;
  for (const std::string& f : spill_files(options_.work_dir, dims_)) reclaimable += int64_t(fs::file_size(f));
  std::error_code ec;
  const fs::space_info space = fs::space(options_.work_dir, ec);
  check(ec || static_cast<int64_t>(space.available) + reclaimable >= spill_bytes(),
        "collecting {} tokens needs {:.2f} GB in {}, but only {:.2f} GB are free", tokens_, spill_bytes() / 1e9,
        options_.work_dir, (static_cast<double>(space.available) + reclaimable) / 1e9);
  // The state says "not collected" before any file is touched, so a run killed mid-collection starts over.
  done_.assign(done_.size(), false);
  write_state();
  calib::collect(model_, sequences_, options_.work_dir, progress_.collected);
  collected_ = true;
  write_state();
}

void Calibration::train_layer(int64_t layer) {
  check(layer >= 0 && layer < dims_.layers, "layer {} is outside [0, {})", layer, dims_.layers);
  check(collected_, "layer {} cannot be trained before the collection", layer);
  if (trained(layer)) return;
  const LayerSpill spill(options_.work_dir, dims_, layer, tokens_);
  const Split split = split_tokens(tokens_, options_.seed);
  LayerResult r;
  auto report = [&](const char* router) {
    return [this, layer, router](int64_t epoch, double metric) {
      if (progress_.epoch) progress_.epoch(layer, router, epoch, metric);
    };
  };
  if (dims_.has_norms(layer)) {
    r.attn = train_attention_router(spill, split, options_.train, options_.seed, layer, report("attention"));
    r.head_share = top_share(spill, 1, options_.train.head_density);
    r.group_share = top_share(spill, dims_.heads / dims_.kv_heads, options_.train.head_density);
    r.group_stats = selection_stats(spill, split.val, r.attn.w, r.attn.b, dims_.heads / dims_.kv_heads);
    r.head_stats = selection_stats(spill, split.val, r.attn.w, r.attn.b, 1);
  }
  if (dims_.mlp) {
    r.mlp = train_mlp_router(spill, split, options_.mlp_rank, options_.train, options_.seed, layer, report("mlp"));
    r.k = mlp_k_row(spill, split.val, r.mlp, stream_seed(options_.seed, layer, Stream::KGroups), options_.k_table);
  }
  write_layer(layer, r);
  results_[size_t(layer)] = std::move(r);
  done_[size_t(layer)] = true;
  write_state();
}

const LayerResult& Calibration::layer(int64_t layer) const {
  check(layer >= 0 && layer < dims_.layers && trained(layer), "layer {} is not trained", layer);
  return results_[size_t(layer)];
}

void Calibration::write_layer(int64_t layer, const LayerResult& r) const {
  const int64_t d = dims_.hidden;
  std::vector<std::pair<std::string, Tensor>> tensors;
  json meta = json::object();
  if (!r.attn.w.empty()) {
    tensors.emplace_back("attn.weight", tensor_of(r.attn.w, {dims_.heads, d}));
    tensors.emplace_back("attn.bias", tensor_of(r.attn.b, {dims_.heads}));
    meta["attn"] = {{"head_recall", r.attn.head_recall}, {"group_recall", r.attn.group_recall}, {"epoch", r.attn.epoch}};
    tensors.emplace_back("attn.head_share", tensor_of(r.head_share, {dims_.heads}));
    tensors.emplace_back("attn.group_share", tensor_of(r.group_share, {dims_.kv_heads}));
    for (const auto& [name, u] : {std::pair{"group", &r.group_stats}, std::pair{"head", &r.head_stats}}) {
      tensors.emplace_back(fmt::format("sel.{}.score", name), tensor_of(u->score, {int64_t(u->score.size())}));
      tensors.emplace_back(fmt::format("sel.{}.z", name), tensor_of(u->z, {int64_t(u->z.size())}));
      tensors.emplace_back(fmt::format("sel.{}.coverage", name), tensor_of(u->coverage, {int64_t(u->coverage.size())}));
    }
  }
  if (r.mlp.rank > 0) {
    tensors.emplace_back("mlp.a", tensor_of(r.mlp.a, {r.mlp.rank, d}));
    tensors.emplace_back("mlp.b", tensor_of(r.mlp.b, {dims_.ffn, r.mlp.rank}));
    meta["mlp"] = {{"f1", r.mlp.f1}, {"epoch", r.mlp.epoch}, {"epochs_run", r.mlp.epochs_run}};
    meta["k"] = {{"k", r.k.k}, {"recall", r.k.recall}};
  }
  write_atomically(layer_path(layer), [&](const std::string& tmp) {
    safetensors::write(tmp, tensors, {{kLayerMetaKey, meta.dump()}});
  });
}

LayerResult Calibration::read_layer(int64_t layer) const {
  const std::string p = layer_path(layer);
  const safetensors::File f = safetensors::File::open(p);
  auto values = [&](const char* name, const Shape& shape) {
    const safetensors::TensorInfo* t = f.find(name);
    check(t && t->dtype == DType::F32 && t->shape == shape, "{}: tensor '{}' is missing or not F32 {}", p, name,
          shape_str(shape));
    const Tensor v = f.load_f32(*t);
    return std::vector<float>(v.data<float>(), v.data<float>() + v.numel());
  };
  LayerResult r;
  try {
    const json meta = json::parse(f.metadata().at(kLayerMetaKey));
    if (dims_.has_norms(layer)) {
      const json& a = meta.at("attn");
      r.attn = {values("attn.weight", {dims_.heads, dims_.hidden}), values("attn.bias", {dims_.heads}),
                a.at("head_recall").get<double>(), a.at("group_recall").get<double>(), a.at("epoch").get<int64_t>()};
      r.head_share = values("attn.head_share", {dims_.heads});
      r.group_share = values("attn.group_share", {dims_.kv_heads});
      for (const auto& [name, u, units] : {std::tuple{"group", &r.group_stats, dims_.kv_heads},
                                           std::tuple{"head", &r.head_stats, dims_.heads}}) {
        u->score = values(fmt::format("sel.{}.score", name).c_str(), {kSelectionQuantiles + 1});
        u->z = values(fmt::format("sel.{}.z", name).c_str(), {kSelectionQuantiles + 1});
        u->coverage = values(fmt::format("sel.{}.coverage", name).c_str(), {units + 1});
      }
    }
    if (dims_.mlp) {
      const json& m = meta.at("mlp");
      const int64_t rank = options_.mlp_rank;
      r.mlp = {rank, values("mlp.a", {rank, dims_.hidden}), values("mlp.b", {dims_.ffn, rank}), m.at("f1").get<double>(),
               m.at("epoch").get<int64_t>(), m.at("epochs_run").get<int64_t>()};
      r.k = {meta.at("k").at("k").get<std::vector<int64_t>>(), meta.at("k").at("recall").get<std::vector<double>>()};
      check(r.k.k.size() == options_.k_table.batch_sizes.size() && r.k.recall.size() == r.k.k.size(),
            "{}: k table row of {} entries, expected {}", p, r.k.k.size(), options_.k_table.batch_sizes.size());
    }
  } catch (const std::exception& e) {  // std::out_of_range from at(), json errors
    fail("{}: corrupt trained layer ({}); remove it to train the layer again", p, e.what());
  }
  return r;
}

Routers Calibration::routers() const {
  Routers out;
  out.fingerprint = fingerprint_;
  // Sparse decoding max-pools the query heads' scores per KV group (= per head for MHA), and the recall
  // recorded is measured that way.
  out.granularity = "group";
  out.head_density = options_.train.head_density;
  out.attn_recall.assign(size_t(dims_.layers), std::numeric_limits<double>::quiet_NaN());
  out.layers.resize(size_t(dims_.layers));
  const TrainOptions& t = options_.train;
  out.source = fmt::format("polar calibrate: {} tokens in {} sequences of {}; seed {}; attention routers: best of {} "
                           "epochs by validation recall at density {}",
                           tokens_, sequences_.size(), options_.data, options_.seed, t.epochs, t.head_density);
  if (dims_.mlp) {
    out.source += fmt::format("; MLP routers: rank {}, up to {} epochs (patience {}), k for union recall {}",
                              options_.mlp_rank, t.epochs, t.patience, options_.k_table.target);
    out.mlp_rank = options_.mlp_rank;
    out.mlp_k = MlpKTable{options_.k_table.batch_sizes, {}, {}};
  }
  out.source += fmt::format("; AdamW lr {}, weight decay {}, batch {}", t.lr, t.weight_decay, t.batch);
  if (dims_.layers > 1) {
    out.selection = SelectionStats{};
    out.selection->group.resize(size_t(dims_.layers));
    out.selection->head.resize(size_t(dims_.layers));
  }
  for (int64_t l = 0; l < dims_.layers; ++l) {
    const LayerResult& r = layer(l);
    LayerRouters& lr = out.layers[size_t(l)];
    if (dims_.has_norms(l)) {
      lr.attn_w = tensor_of(r.attn.w, {dims_.heads, dims_.hidden});
      lr.attn_b = tensor_of(r.attn.b, {dims_.heads});
      lr.head_share = tensor_of(r.head_share, {dims_.heads});
      lr.group_share = tensor_of(r.group_share, {dims_.kv_heads});
      out.attn_recall[size_t(l)] = r.attn.group_recall;
      out.selection->group[size_t(l)] = r.group_stats;
      out.selection->head[size_t(l)] = r.head_stats;
    }
    if (dims_.mlp) {
      lr.mlp_a = tensor_of(r.mlp.a, {r.mlp.rank, dims_.hidden});
      lr.mlp_b = tensor_of(r.mlp.b, {dims_.ffn, r.mlp.rank});
      out.mlp_k->k.push_back(r.k.k);
      out.mlp_k->recall.push_back(r.k.recall);
    }
  }
  return out;
}

void Calibration::remove_work_files() const {
  std::error_code ec;
  for (const std::string& f : spill_files(options_.work_dir, dims_)) fs::remove(f, ec);
  for (int64_t l = 0; l < dims_.layers; ++l) fs::remove(layer_path(l), ec);
  fs::remove(path(kStateFile), ec);
  if (fs::is_empty(options_.work_dir, ec)) fs::remove(options_.work_dir, ec);
}

}  // namespace polar::calib
