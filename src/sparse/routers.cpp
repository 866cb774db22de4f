#include "sparse/routers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>

#include <fmt/format.h>

#include "core/random.h"
#include "io/json.h"
#include "io/safetensors.h"

namespace polar {

using json = nlohmann::json;

namespace {

constexpr const char* kMetadataKey = "polar.routers";
constexpr int64_t kFormat = 1;

// Mean fractions of D that the paper's MLP k table keeps for OPT-6.7B at batch sizes 1, 2, 4, ..., 256
// (polar-method.md §4), in thousandths so that rounding k up to a multiple of kKMultiple is exact.
constexpr int64_t kPaperKPerMille[] = {95, 150, 210, 290, 400, 520, 620, 710, 770};
// The paper rounds its k up to a multiple of 128: the selective GEMMs work in tiles of that many neurons.
constexpr int64_t kKMultiple = 128;
// Random attention router biases stay this small, far below the weighted sum (of order 1 for a normalised
// input), so that the heads are ranked by the input, per sequence, as trained routers rank them.
constexpr float kRandomBias = 0.01f;
// Rows of the token embedding hashed into a fingerprint: enough to tell fine-tunes apart, cheap to read.
constexpr int64_t kFingerprintEmbedRows = 64;

constexpr double kUnmeasured = std::numeric_limits<double>::quiet_NaN();

// A tensor of LayerRouters and its name in the file (layers.{l}.{part}).
struct Slot {
  const char* part;
  Tensor LayerRouters::*member;
};
constexpr Slot kAttnWeight{"attn.weight", &LayerRouters::attn_w}, kAttnBias{"attn.bias", &LayerRouters::attn_b},
    kMlpA{"mlp.a", &LayerRouters::mlp_a}, kMlpB{"mlp.b", &LayerRouters::mlp_b},
    kHeadShare{"attn.head_share", &LayerRouters::head_share}, kGroupShare{"attn.group_share", &LayerRouters::group_share};
constexpr Slot kSlots[] = {kAttnWeight, kAttnBias, kMlpA, kMlpB, kHeadShare, kGroupShare};

std::string tensor_name(int64_t layer, const Slot& slot) { return fmt::format("layers.{}.{}", layer, slot.part); }

// What a router file must hold: from the model's config, or (read_routers) from the file itself.
struct Dims {
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, ffn = 0;
  bool mlp = false;  // a ReLU MLP: MLP routers and a k table
};

Dims dims_of(const ModelConfig& c) { return {c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.ffn, !c.gated_mlp}; }

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ULL;
  return h;
}

json recall_json(const std::vector<double>& recall) {
  json a = json::array();
  for (double x : recall) a.push_back(std::isnan(x) ? json(nullptr) : json(x));
  return a;
}

// ---- Reading the metadata: every accessor fails with the file and the field's path (e.g. mlp_k.k[3][0]).

// A JSON value for an error message, shortened: a wrong field may hold a whole array.
std::string brief(const json& v) {
  std::string s = v.dump();
  return s.size() <= 40 ? s : s.substr(0, 37) + "...";
}

const json& field(const std::string& path, const json& obj, const std::string& key, const std::string& prefix = "") {
  auto it = obj.find(key);
  check(it != obj.end(), "{}: router metadata lacks \"{}{}\"", path, prefix, key);
  return *it;
}

int64_t as_int(const std::string& path, const json& v, const std::string& what) {
  check(v.is_number_integer(), "{}: router metadata {} must be an integer, not {}", path, what, brief(v));
  return v.get<int64_t>();
}

const std::string& as_string(const std::string& path, const json& v, const std::string& what) {
  check(v.is_string(), "{}: router metadata {} must be a string, not {}", path, what, brief(v));
  return v.get_ref<const std::string&>();
}

// null (unmeasured) -> NaN, else a number in [0, 1].
double as_recall(const std::string& path, const json& v, const std::string& what) {
  if (v.is_null()) return kUnmeasured;
  check(v.is_number() && v.get<double>() >= 0 && v.get<double>() <= 1,
        "{}: router metadata {} must be a recall in [0, 1] or null, not {}", path, what, brief(v));
  return v.get<double>();
}

const json& as_array(const std::string& path, const json& v, const std::string& what, size_t n, const char* unit) {
  check(v.is_array(), "{}: router metadata {} must be an array, not {}", path, what, brief(v));
  check(v.size() == n, "{}: router metadata {} has {} entries, expected {} ({})", path, what, v.size(), n, unit);
  return v;
}

void check_keys(const std::string& path, const json& obj, std::initializer_list<const char*> known, const char* what) {
  // Not a structured binding: clang 14 (the fuzz build) cannot capture one in a lambda.
  for (const auto& item : obj.items()) {
    const std::string& key = item.key();
    check(std::find_if(known.begin(), known.end(), [&](const char* k) { return key == k; }) != known.end(),
          "{}: router metadata {} has an unknown field \"{}\"", path, what, key);
  }
}

MlpKTable parse_k_table(const std::string& path, const json& mk, const Dims& dims) {
  check(mk.is_object(), "{}: router metadata mlp_k must be an object, not {}", path, brief(mk));
  check_keys(path, mk, {"batch_sizes", "k", "recall"}, "mlp_k");
  MlpKTable t;
  const json& bs = field(path, mk, "batch_sizes", "mlp_k.");
  check(bs.is_array() && !bs.empty(), "{}: router metadata mlp_k.batch_sizes must be a non-empty array, not {}", path,
        brief(bs));
  for (size_t i = 0; i < bs.size(); ++i) {
    const int64_t b = as_int(path, bs[i], fmt::format("mlp_k.batch_sizes[{}]", i));
    check(b >= 1, "{}: router metadata mlp_k.batch_sizes[{}] = {} is not a batch size (>= 1)", path, i, b);
    // (check's message arguments are evaluated even when it passes: no back() of an empty vector.)
    const int64_t previous = t.batch_sizes.empty() ? 0 : t.batch_sizes.back();
    check(b > previous, "{}: router metadata mlp_k.batch_sizes must be strictly ascending, but {} follows {}", path, b,
          previous);
    t.batch_sizes.push_back(b);
  }
  const size_t layers = static_cast<size_t>(dims.layers), n = t.batch_sizes.size();
  const json& k = as_array(path, field(path, mk, "k", "mlp_k."), "mlp_k.k", layers, "one per layer");
  const json& recall = as_array(path, field(path, mk, "recall", "mlp_k."), "mlp_k.recall", layers, "one per layer");
  for (size_t l = 0; l < layers; ++l) {
    const json& k_row = as_array(path, k[l], fmt::format("mlp_k.k[{}]", l), n, "one per batch size");
    const json& r_row = as_array(path, recall[l], fmt::format("mlp_k.recall[{}]", l), n, "one per batch size");
    t.k.emplace_back();
    t.recall.emplace_back();
    for (size_t i = 0; i < n; ++i) {
      const int64_t v = as_int(path, k_row[i], fmt::format("mlp_k.k[{}][{}]", l, i));
      check(v >= 1 && v <= dims.ffn, "{}: router metadata mlp_k.k[{}][{}] = {} is outside [1, {}] (the MLP's neurons)",
            path, l, i, v, dims.ffn);
      t.k.back().push_back(v);
      t.recall.back().push_back(as_recall(path, r_row[i], fmt::format("mlp_k.recall[{}][{}]", l, i)));
    }
  }
  return t;
}

// A non-empty array of n finite numbers (n = 0: any length >= 2), each >= the one before and, with
// `share`, in [0, 1].
std::vector<float> parse_curve(const std::string& path, const json& v, const std::string& what, size_t n, bool share) {
  check(v.is_array() && (n ? v.size() == n : v.size() >= 2), "{}: router metadata {} must be an array of {} numbers, not {}",
        path, what, n ? std::to_string(n) : "at least 2", brief(v));
  std::vector<float> out;
  for (size_t i = 0; i < v.size(); ++i) {
    check(v[i].is_number() && std::isfinite(v[i].get<double>()), "{}: router metadata {}[{}] must be a finite number, not {}",
          path, what, i, brief(v[i]));
    const float x = v[i].get<float>();
    check(!share || (x >= 0 && x <= 1), "{}: router metadata {}[{}] = {} is not a share in [0, 1]", path, what, i, x);
    check(out.empty() || x >= out.back(), "{}: router metadata {} must not decrease, but {}[{}] = {} follows {}", path,
          what, what, i, x, out.empty() ? 0.0f : out.back());
    out.push_back(x);
  }
  return out;
}

UnitStats parse_unit_stats(const std::string& path, const json& v, const std::string& what, int64_t units, size_t q) {
  check(v.is_object(), "{}: router metadata {} must be an object, not {}", path, what, brief(v));
  check_keys(path, v, {"score", "z", "coverage"}, what.c_str());
  UnitStats u;
  u.score = parse_curve(path, field(path, v, "score", what + "."), what + ".score", q + 1, false);
  u.z = parse_curve(path, field(path, v, "z", what + "."), what + ".z", q + 1, false);
  u.coverage = parse_curve(path, field(path, v, "coverage", what + "."), what + ".coverage",
                           units > 0 ? static_cast<size_t>(units + 1) : 0, true);
  check(u.coverage.front() == 0, "{}: router metadata {}.coverage[0] must be 0 (no unit carries nothing), not {}", path,
        what, u.coverage.front());
  return u;
}

SelectionStats parse_selection(const std::string& path, const json& sel, const Dims& dims) {
  check(sel.is_object(), "{}: router metadata selection must be an object, not {}", path, brief(sel));
  check_keys(path, sel, {"quantiles", "layers"}, "selection");
  const int64_t q = as_int(path, field(path, sel, "quantiles", "selection."), "selection.quantiles");
  check(q == kSelectionQuantiles, "{}: router metadata selection.quantiles is {}, this polar reads {}", path, q,
        kSelectionQuantiles);
  const json& layers = as_array(path, field(path, sel, "layers", "selection."), "selection.layers",
                                static_cast<size_t>(dims.layers), "one per layer");
  check(layers.empty() || layers[0].is_null(),
        "{}: router metadata selection.layers[0] must be null: layer 0 is always dense", path);
  SelectionStats out;
  out.group.resize(layers.size());
  out.head.resize(layers.size());
  for (size_t l = 1; l < layers.size(); ++l) {
    const std::string what = fmt::format("selection.layers[{}]", l);
    check(layers[l].is_object(), "{}: router metadata {} must be an object, not {}", path, what, brief(layers[l]));
    check_keys(path, layers[l], {"group", "head"}, what.c_str());
    out.group[l] = parse_unit_stats(path, field(path, layers[l], "group", what + "."), what + ".group", dims.kv_heads,
                                    static_cast<size_t>(q));
    out.head[l] = parse_unit_stats(path, field(path, layers[l], "head", what + "."), what + ".head", dims.heads,
                                   static_cast<size_t>(q));
  }
  return out;
}

// The dimensions a file describes by itself (read_routers): layers from attention_recall, H and d from layer
// 1's attention router, D from layer 0's MLP router. The full check against them follows in read_file.
Dims dims_from_file(const safetensors::File& f, const json& meta) {
  const std::string& path = f.path();
  Dims d;
  const json& recall = field(path, meta, "attention_recall");
  check(recall.is_array() && !recall.empty(),
        "{}: router metadata attention_recall must be a non-empty array (one entry per layer), not {}", path,
        brief(recall));
  d.layers = static_cast<int64_t>(recall.size());
  d.mlp = meta.contains("mlp_rank") || meta.contains("mlp_k");
  auto shape_of = [&](const std::string& name) {
    const safetensors::TensorInfo* t = f.find(name);
    check(t != nullptr, "{}: missing tensor '{}'", path, name);
    check(t->shape.size() == 2 && t->shape[0] >= 1 && t->shape[1] >= 1,
          "{}: tensor '{}' has shape {}, expected two non-empty dimensions", path, name, shape_str(t->shape));
    return t->shape;
  };
  if (d.layers > 1) {
    const Shape s = shape_of(tensor_name(1, kAttnWeight));
    d.heads = s[0];
    d.hidden = s[1];
    const std::string groups = tensor_name(1, kGroupShare);
    if (const safetensors::TensorInfo* t = f.find(groups)) {
      check(t->shape.size() == 1 && t->shape[0] >= 1 && d.heads % t->shape[0] == 0,
            "{}: tensor '{}' has shape {}, expected [Hkv] with Hkv dividing the {} heads", path, groups,
            shape_str(t->shape), d.heads);
      d.kv_heads = t->shape[0];
    }
  }
  if (d.mlp) {
    if (d.hidden == 0) d.hidden = shape_of(tensor_name(0, kMlpA))[1];
    d.ffn = shape_of(tensor_name(0, kMlpB))[0];
  }
  return d;
}

// Why a tensor does not belong in the file.
std::string why_unexpected(const std::string& name, const Dims& dims) {
  if (name.starts_with("layers.0.attn.")) return "layer 0 is always dense and has no attention router";
  if (name.find(".mlp.") != std::string::npos && !dims.mlp)
    return "the model's MLP is gated, and gated MLPs have no MLP routers";
  return "not a router tensor of this model";
}

// An fp32 copy the routers own. A view of the mapping would be cheaper, but it would turn into a SIGBUS if
// the file were rewritten while the routers live (a calibration loading and saving the same path).
Tensor owned_f32(const safetensors::File& f, const safetensors::TensorInfo& t) {
  check(t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16,
        "{}: tensor '{}' is {}; router tensors are F32, F16 or BF16", f.path(), t.name, dtype_name(t.dtype));
  const Tensor src = f.load_f32(t);
  Tensor out = Tensor::empty(DType::F32, t.shape);
  std::memcpy(out.raw(), src.raw(), out.nbytes());
  const float* p = out.data<float>();
  const float* bad = std::find_if(p, p + out.numel(), [](float x) { return !std::isfinite(x); });
  if (bad != p + out.numel()) fail("{}: tensor '{}' holds {} at element {}", f.path(), t.name, *bad, bad - p);
  return out;
}

// Reads and checks a router file: against a model (config and fingerprint given) or on its own.
Routers read_file(const std::string& path, const ModelConfig* config, const std::string* fingerprint) {
  const safetensors::File f = safetensors::File::open(path);
  auto it = f.metadata().find(kMetadataKey);
  check(it != f.metadata().end(), "{}: not a router file (no \"{}\" metadata)", path, kMetadataKey);
  json meta;
  try {
    meta = parse_json(it->second);
  } catch (const json::exception& e) {
    fail("{}: malformed \"{}\" metadata: {}", path, kMetadataKey, e.what());
  }
  check(meta.is_object(), "{}: \"{}\" metadata is not a JSON object", path, kMetadataKey);
  const int64_t format = as_int(path, field(path, meta, "format"), "format");
  check(format == kFormat, "{}: router file format {}, but this polar reads format {}", path, format, kFormat);

  Routers r;
  r.fingerprint = as_string(path, field(path, meta, "model"), "model");
  if (fingerprint)
    check(r.fingerprint == *fingerprint, "routers in {} were made for model {}, not {}", path, r.fingerprint,
          *fingerprint);
  const Dims dims = config ? dims_of(*config) : dims_from_file(f, meta);

  if (dims.mlp) {
    check_keys(path, meta,
               {"format", "model", "granularity", "head_density", "attention_recall", "source", "mlp_rank", "mlp_k",
                "selection"},
               "(top level)");
  } else {
    check(!meta.contains("mlp_rank") && !meta.contains("mlp_k"),
          "{}: router metadata has mlp_rank / mlp_k, but the model's MLP is gated, and gated MLPs have no MLP routers",
          path);
    check_keys(path, meta,
               {"format", "model", "granularity", "head_density", "attention_recall", "source", "selection"},
               "(top level)");
  }
  r.granularity = as_string(path, field(path, meta, "granularity"), "granularity");
  check(r.granularity == "head" || r.granularity == "group",
        "{}: router metadata granularity must be \"head\" or \"group\", not \"{}\"", path, r.granularity);
  const json& density = field(path, meta, "head_density");
  check(density.is_number() && density.get<double>() > 0 && density.get<double>() <= 1,
        "{}: router metadata head_density must be a number in (0, 1], not {}", path, brief(density));
  r.head_density = density.get<double>();
  const json& recall = as_array(path, field(path, meta, "attention_recall"), "attention_recall",
                                static_cast<size_t>(dims.layers), "one per layer");
  for (size_t l = 0; l < recall.size(); ++l)
    r.attn_recall.push_back(as_recall(path, recall[l], fmt::format("attention_recall[{}]", l)));
  check(r.attn_recall.empty() || std::isnan(r.attn_recall[0]),
        "{}: router metadata attention_recall[0] must be null: layer 0 is always dense and has no attention router",
        path);
  r.source = as_string(path, field(path, meta, "source"), "source");
  if (dims.mlp) {
    r.mlp_rank = as_int(path, field(path, meta, "mlp_rank"), "mlp_rank");
    check(r.mlp_rank >= 1, "{}: router metadata mlp_rank must be at least 1, not {}", path, r.mlp_rank);
    r.mlp_k = parse_k_table(path, field(path, meta, "mlp_k"), dims);
  }
  if (meta.contains("selection")) r.selection = parse_selection(path, meta["selection"], dims);

  // The tensors: exactly the expected set, each of the expected shape.
  struct Expected {
    int64_t layer;
    const Slot* slot;
    Shape shape;
  };
  std::map<std::string, Expected> expected;
  for (int64_t l = 1; l < dims.layers; ++l) {
    expected[tensor_name(l, kAttnWeight)] = {l, &kAttnWeight, {dims.heads, dims.hidden}};
    expected[tensor_name(l, kAttnBias)] = {l, &kAttnBias, {dims.heads}};
  }
  for (int64_t l = 0; dims.mlp && l < dims.layers; ++l) {
    expected[tensor_name(l, kMlpA)] = {l, &kMlpA, {r.mlp_rank, dims.hidden}};
    expected[tensor_name(l, kMlpB)] = {l, &kMlpB, {dims.ffn, r.mlp_rank}};
  }
  // Head shares are optional (older files, random routers), but a file that has some has them all.
  const bool shares = std::any_of(f.tensors().begin(), f.tensors().end(), [](const safetensors::TensorInfo& t) {
    return t.name.ends_with(std::string(".") + kHeadShare.part) || t.name.ends_with(std::string(".") + kGroupShare.part);
  });
  for (int64_t l = 1; shares && l < dims.layers; ++l) {
    expected[tensor_name(l, kHeadShare)] = {l, &kHeadShare, {dims.heads}};
    expected[tensor_name(l, kGroupShare)] = {l, &kGroupShare, {dims.kv_heads}};
  }
  const char* implied_by = config ? "the model needs" : "the rest of the file implies";
  r.layers.resize(static_cast<size_t>(dims.layers));
  for (const safetensors::TensorInfo& t : f.tensors()) {
    auto e = expected.find(t.name);
    check(e != expected.end(), "{}: unexpected tensor '{}' ({})", path, t.name, why_unexpected(t.name, dims));
    check(t.shape == e->second.shape, "{}: tensor '{}' has shape {} but {} {}", path, t.name, shape_str(t.shape),
          implied_by, shape_str(e->second.shape));
    Tensor& value = r.layers[static_cast<size_t>(e->second.layer)].*(e->second.slot->member);
    value = owned_f32(f, t);
    if (e->second.slot == &kHeadShare || e->second.slot == &kGroupShare) {
      const float* p = value.data<float>();
      const float* bad = std::find_if(p, p + value.numel(), [](float x) { return x < 0 || x > 1; });
      check(bad == p + value.numel(), "{}: tensor '{}' holds {} at element {}, not a share in [0, 1]", path, t.name,
            bad == p + value.numel() ? 0.0f : *bad, bad - p);
    }
    expected.erase(e);
  }
  if (!expected.empty())
    fail("{}: missing tensor '{}'{}", path, expected.begin()->first,
         expected.size() > 1 ? fmt::format(" (and {} more)", expected.size() - 1) : "");
  return r;
}

}  // namespace

int64_t MlpKTable::k_for(int64_t layer, int64_t batch) const {
  check(layer >= 0 && layer < static_cast<int64_t>(k.size()), "MLP k table: layer {} is outside [0, {})", layer,
        k.size());
  check(batch >= 1 && !batch_sizes.empty(), "MLP k table: no k for batch size {} in a table of {} batch sizes", batch,
        batch_sizes.size());
  const auto it = std::lower_bound(batch_sizes.begin(), batch_sizes.end(), batch);
  const size_t i = it == batch_sizes.end() ? batch_sizes.size() - 1 : static_cast<size_t>(it - batch_sizes.begin());
  return k[static_cast<size_t>(layer)][i];
}

bool has_head_shares(const Routers& routers) {
  for (size_t l = 1; l < routers.layers.size(); ++l)
    if (!routers.layers[l].head_share.defined() || !routers.layers[l].group_share.defined()) return false;
  return true;
}

std::string model_fingerprint(const Checkpoint& ck) {
  const ModelConfig& c = ck.config;
  const std::string dims = fmt::format("{} L{} d{} H{} Hkv{} dh{} ffn{} V{}", c.model_type, c.n_layers, c.hidden,
                                       c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab_size);
  if (ck.synthetic_seed) return fmt::format("{} synthetic:{}", dims, *ck.synthetic_seed);
  // The token embedding and the final norm: every checkpoint of the family has them (OPT post-LN has no
  // final norm), and a fine-tune changes them.
  const bool opt = c.family == Family::OPT;
  const std::string embed = opt ? "model.decoder.embed_tokens.weight" : "model.embed_tokens.weight";
  const Tensor rows =
      ck.get(embed, {c.vocab_size, c.embed_dim()}).slice_rows(0, std::min(kFingerprintEmbedRows, c.vocab_size));
  uint64_t h = fnv1a(0xCBF29CE484222325ULL, rows.raw(), rows.nbytes());
  if (c.final_norm) {
    const Tensor& norm = ck.get(opt ? "model.decoder.final_layer_norm.weight" : "model.norm.weight", {c.hidden});
    h = fnv1a(h, norm.raw(), norm.nbytes());
  }
  return fmt::format("{} w:{:016x}", dims, h);
}

Routers random_routers(const ModelConfig& config, const std::string& fingerprint, uint64_t seed, int64_t mlp_rank) {
  const Dims dims = dims_of(config);
  check(!dims.mlp || mlp_rank >= 1, "random routers: the MLP router rank must be at least 1, not {}", mlp_rank);
  Routers r;
  r.fingerprint = fingerprint;
  r.source = fmt::format("random, seed {}", seed);
  r.attn_recall.assign(static_cast<size_t>(dims.layers), kUnmeasured);
  r.layers.resize(static_cast<size_t>(dims.layers));
  // One stream of the counter-based generator per tensor, in a fixed order: the routers are a pure function
  // of the seed (and so is the file), however the fill is parallelised.
  uint64_t stream = mix64(seed);
  auto uniform = [&](const Shape& shape, float bound) {
    Tensor t = Tensor::empty(DType::F32, shape);
    float* p = t.data<float>();
    const int64_t n = t.numel();
    const uint64_t s = stream++;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) p[i] = (2.0f * uniform_hash(s, static_cast<uint64_t>(i)) - 1.0f) * bound;
    return t;
  };
  // Weights as torch.nn.Linear initialises them: uniform in ±1/sqrt(fan_in).
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(dims.hidden));
  for (int64_t l = 1; l < dims.layers; ++l) {
    r.layers[l].attn_w = uniform({dims.heads, dims.hidden}, inv_sqrt_d);
    r.layers[l].attn_b = uniform({dims.heads}, kRandomBias);
  }
  if (!dims.mlp) return r;
  r.mlp_rank = mlp_rank;
  for (int64_t l = 0; l < dims.layers; ++l) {
    r.layers[l].mlp_a = uniform({mlp_rank, dims.hidden}, inv_sqrt_d);
    r.layers[l].mlp_b = uniform({dims.ffn, mlp_rank}, 1.0f / std::sqrt(static_cast<float>(mlp_rank)));
  }
  MlpKTable t;
  std::vector<int64_t> k;
  for (size_t i = 0; i < std::size(kPaperKPerMille); ++i) {
    t.batch_sizes.push_back(int64_t(1) << i);
    const int64_t tiles = (kPaperKPerMille[i] * dims.ffn + 1000 * kKMultiple - 1) / (1000 * kKMultiple);
    k.push_back(std::min(dims.ffn, tiles * kKMultiple));
  }
  t.k.assign(static_cast<size_t>(dims.layers), k);
  t.recall.assign(static_cast<size_t>(dims.layers), std::vector<double>(k.size(), kUnmeasured));
  r.mlp_k = std::move(t);
  return r;
}

json routers_metadata(const Routers& r) {
  json j = {{"format", kFormat},
            {"model", r.fingerprint},
            {"granularity", r.granularity},
            {"head_density", r.head_density},
            {"attention_recall", recall_json(r.attn_recall)},
            {"source", r.source}};
  if (r.selection) {
    json layers = json::array();
    auto stats = [](const UnitStats& u) { return json{{"score", u.score}, {"z", u.z}, {"coverage", u.coverage}}; };
    for (size_t l = 0; l < r.layers.size(); ++l)
      layers.push_back(l == 0 ? json(nullptr)
                              : json{{"group", stats(r.selection->group.at(l))}, {"head", stats(r.selection->head.at(l))}});
    j["selection"] = {{"quantiles", kSelectionQuantiles}, {"layers", layers}};
  }
  if (r.mlp_k) {
    json recall = json::array();
    for (const auto& row : r.mlp_k->recall) recall.push_back(recall_json(row));
    j["mlp_rank"] = r.mlp_rank;
    j["mlp_k"] = {{"batch_sizes", r.mlp_k->batch_sizes}, {"k", r.mlp_k->k}, {"recall", recall}};
  }
  return j;
}

void save_routers(const std::string& path, const Routers& routers) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t l = 0; l < routers.layers.size(); ++l)
    for (const Slot& slot : kSlots) {
      const Tensor& t = routers.layers[l].*slot.member;
      if (!t.defined()) continue;
      const std::string name = tensor_name(static_cast<int64_t>(l), slot);
      // The format promises fp32; anything else here is a bug in whoever built the routers.
      check(t.dtype() == DType::F32, "save_routers {}: tensor '{}' is {}, not F32", path, name, dtype_name(t.dtype()));
      tensors.emplace_back(name, t);
    }
  safetensors::write(path, tensors, {{kMetadataKey, routers_metadata(routers).dump()}});
}

Routers load_routers(const std::string& path, const ModelConfig& config, const std::string& fingerprint) {
  return read_file(path, &config, &fingerprint);
}

Routers read_routers(const std::string& path) { return read_file(path, nullptr, nullptr); }

}  // namespace polar
