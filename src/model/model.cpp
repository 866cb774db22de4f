#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <iterator>

#include <fmt/ranges.h>

#include "core/random.h"

namespace polar {

namespace {

// Uniform ranges for synthetic weights that keep activations finite (in f16 too) through any number of
// layers: projections ±1/sqrt(fan-in) add residual increments no larger than their input, embeddings
// ±1, norm weights 1 ± 0.1, biases small.
std::pair<float, float> synthetic_range(const std::string& name, const Shape& shape) {
  if (shape.size() == 1) return name.ends_with(".bias") ? std::pair(-0.01f, 0.01f) : std::pair(0.9f, 1.1f);
  if (name.find("embed") != std::string::npos) return {-1.0f, 1.0f};
  const float bound = 1.0f / std::sqrt(static_cast<float>(shape.back()));
  return {-bound, bound};
}

// FNV-1a: a stable per-tensor stream, so a tensor's values do not depend on the order tensors are made in.
uint64_t name_hash(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ULL;
  return h;
}

}  // namespace

std::vector<int> tp_sizes(const ModelConfig& c, int up_to) {
  std::vector<int> sizes;
  for (int n = 1; n <= up_to; ++n)
    if (c.n_heads % n == 0 && (c.n_kv_heads % n == 0 || n % c.n_kv_heads == 0) && c.ffn % n == 0) sizes.push_back(n);
  return sizes;
}

ShardDims shard_dims(const ModelConfig& c, int rank, int size) {
  check(size >= 1 && rank >= 0 && rank < size, "tensor parallelism: rank {} of {}", rank, size);
  if (size > 1) {
    const std::vector<int> valid = tp_sizes(c, std::max<int>(size, static_cast<int>(c.n_heads)));
    check(std::find(valid.begin(), valid.end(), size) != valid.end(),
          "--tp {} does not split this model ({} query heads, {} KV heads, {} MLP neurons) evenly; it splits over "
          "{} ranks",
          size, c.n_heads, c.n_kv_heads, c.ffn, fmt::join(valid, ", "));
  }
  ShardDims d;
  d.heads = c.n_heads / size;
  d.head0 = rank * d.heads;
  d.kv_heads = std::max<int64_t>(1, c.n_kv_heads / size);
  d.kv_head0 = d.head0 / (c.n_heads / c.n_kv_heads);  // the KV head of the rank's first query head
  d.ffn = c.ffn / size;
  d.ffn0 = rank * d.ffn;
  return d;
}

Tensor Model::load_stacked(const Checkpoint& ck, const std::vector<Part>& all_parts) {
  const DType dt = backend_.activation_dtype();
  std::vector<Part> parts;  // without empty zero parts (a single rank's zero neuron: none)
  std::copy_if(all_parts.begin(), all_parts.end(), std::back_inserter(parts),
               [](const Part& p) { return !p.name.empty() || p.shape.at(0) > 0; });
  // Each part's slice [begin, begin + count) of rows and (2-D) columns, and the parts stacked along dim 0:
  // `shape` as uploaded, `full` as the unsliced stack (what a synthetic model's random values index).
  auto resolve = [](Range r, int64_t n) {
    const int64_t count = r.count < 0 ? n - r.begin : r.count;
    check(r.begin >= 0 && count >= 0 && r.begin + count <= n, "slice [{}, {}) of {}", r.begin, r.begin + count, n);
    return Range{r.begin, count};
  };
  std::vector<Range> rows, cols;
  Shape shape, full;
  std::string names;
  bool whole = true;  // every part unsliced and from the checkpoint
  for (const Part& p : parts) {
    rows.push_back(resolve(p.rows, p.shape.at(0)));
    cols.push_back(resolve(p.cols, p.shape.size() > 1 ? p.shape[1] : 1));
    Shape s = p.shape;
    s[0] = rows.back().count;
    if (s.size() > 1) s[1] = cols.back().count;
    whole = whole && !p.name.empty() && s == p.shape;
    if (shape.empty()) {
      shape = s;
      full = p.shape;
    } else {
      check(s.size() == shape.size() && std::equal(s.begin() + 1, s.end(), shape.begin() + 1),
            "cannot stack {} {} onto {} {}", p.name, shape_str(s), names, shape_str(shape));
      shape[0] += s[0];
      full[0] += p.name.empty() ? 0 : p.shape[0];
    }
    if (!p.name.empty()) names += (names.empty() ? "" : "+") + p.name;
  }
  Tensor t;
  const auto [lo, hi] = synthetic_range(parts[0].name, full);
  const uint64_t seed = ck.synthetic_seed ? mix64(*ck.synthetic_seed) ^ name_hash(names) : 0;
  if (whole && ck.synthetic_seed) {
    t = backend_.random_uniform(dt, shape, lo, hi, seed);
  } else if (whole && parts.size() == 1) {
    t = backend_.upload(ck.get(parts[0].name, parts[0].shape), dt);
  } else {
    Tensor host = Tensor::empty(DType::F32, shape);
    float* dst = host.data<float>();
    int64_t offset = 0;  // of the part in the unsliced stack
    for (size_t i = 0; i < parts.size(); ++i) {
      const Part& p = parts[i];
      const int64_t width = p.shape.size() > 1 ? p.shape[1] : 1;
      const float* src = p.name.empty() || ck.synthetic_seed ? nullptr : ck.get(p.name, p.shape).data<float>();
      for (int64_t r = rows[i].begin; r < rows[i].begin + rows[i].count; ++r)
        for (int64_t j = cols[i].begin; j < cols[i].begin + cols[i].count; ++j) {
          const int64_t e = r * width + j;
          *dst++ = p.name.empty() ? 0.0f
                   : src         ? src[e]
                                 : lo + (hi - lo) * uniform_hash(seed, static_cast<uint64_t>(offset + e));
        }
      if (!p.name.empty()) offset += numel(p.shape);
    }
    t = backend_.upload(host, dt);
  }
  weight_bytes_ += static_cast<int64_t>(t.nbytes());
  return t;
}

Tensor Model::load_transposed(const Checkpoint& ck, const std::string& name, const Shape& shape, Range cols,
                              int64_t zero_rows) {
  const DType dt = backend_.activation_dtype();
  const int64_t n = shape.at(0), k = shape.at(1);
  const int64_t c0 = cols.begin, m = cols.count < 0 ? k - c0 : cols.count;
  check(c0 >= 0 && m >= 0 && c0 + m <= k, "{}: columns [{}, {}) of {}", name, c0, c0 + m, k);
  const auto [lo, hi] = synthetic_range(name, shape);
  const uint64_t seed = ck.synthetic_seed ? mix64(*ck.synthetic_seed) ^ name_hash(name) : 0;
  Tensor t;
  if (ck.synthetic_seed && m == k && zero_rows == 0) {
    t = backend_.random_uniform(dt, {k, n}, lo, hi, seed);
  } else {
    // Row j of the result is column c0 + j of the source (element (c0 + j)·n + i of the transposed whole,
    // which a synthetic model's values index).
    const float* src = ck.synthetic_seed ? nullptr : ck.get(name, shape).data<float>();
    Tensor host = Tensor::zeros(DType::F32, {m + zero_rows, n});
    float* dst = host.data<float>();
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < n; ++i)
        dst[j * n + i] = src ? src[i * k + c0 + j]
                             : lo + (hi - lo) * uniform_hash(seed, static_cast<uint64_t>((c0 + j) * n + i));
    t = backend_.upload(host, dt);
  }
  weight_bytes_ += static_cast<int64_t>(t.nbytes());
  return t;
}

void Model::report_head_norms(Probe* probe, int layer, const Tensor& attn) const {
  Tensor a = backend_.to_host_f32(attn);
  const int64_t T = a.dim(0), H = a.dim(1), dh = a.dim(2);
  Tensor norms = Tensor::empty(DType::F32, {T, H});
  const float* pa = a.data<float>();
  for (int64_t i = 0; i < T * H; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < dh; ++j) ss += double(pa[i * dh + j]) * pa[i * dh + j];
    norms.data<float>()[i] = static_cast<float>(std::sqrt(ss));
  }
  probe->head_norms(layer, norms);
}

namespace {

// Whether a step's KV-head selections go to the attention op as kv_heads (selective attention), rather than
// being applied afterwards (keep_heads).
bool selective_attention(const StepInput& in, const Tensor& heads) {
  return heads.defined() && !(in.sparsity && in.sparsity->per_query_head());
}

const Tensor* dense_tokens_of(const StepInput& in) { return in.dense_tokens.defined() ? &in.dense_tokens : nullptr; }

}  // namespace

void Model::attend(int layer, const StepInput& in, const Tensor& heads, const Tensor& q, const KVLayer& cache,
                   float scale, int64_t window, Tensor& attn) const {
  const Tensor* dense = dense_tokens_of(in);
  const bool per_query_head = in.sparsity && in.sparsity->per_query_head();
  const bool selective = selective_attention(in, heads);
  backend_.attention(q, cache, in.layout, scale, window, attn, selective ? &heads : nullptr, dense);
  if (!in.sparsity || selective) return;
  const Tensor kept = heads.defined() ? heads : in.sparsity->heads_from_attention(layer, attn);
  if (kept.defined()) backend_.keep_heads(attn, kept, per_query_head ? 1 : dims_.heads / dims_.kv_heads, dense);
}

void Model::project_attention(const StepInput& in, const Tensor& heads, const Tensor& attn, const Tensor& wo,
                              const Tensor* bo, Tensor& y, bool accumulate) const {
  const int64_t T = attn.dim(0), H = attn.dim(1), dh = attn.dim(2);
  const Tensor a = attn.reshape({T, H * dh});
  if (selective_attention(in, heads))
    backend_.linear_selected_inputs(a, wo, bo, heads, H / dims_.kv_heads * dh, dense_tokens_of(in), y, accumulate);
  else
    backend_.linear(a, wo, bo, y, accumulate);
}

namespace {

std::unique_ptr<Model> make_rank(const Checkpoint& ck, Backend& backend, TpShard shard) {
  switch (ck.config.family) {
    case Family::OPT: return make_opt(ck, backend, shard);
    case Family::Llama: return make_llama(ck, backend, shard);
  }
  fail("unknown model family");
}

}  // namespace

std::unique_ptr<Model> make_model(const Checkpoint& ck, Backend& backend) { return make_rank(ck, backend, {}); }

std::unique_ptr<Model> make_model(const Checkpoint& ck, const std::vector<Backend*>& backends,
                                  const std::vector<Communicator*>& comms) {
  const int n = static_cast<int>(backends.size());
  check(n >= 1 && (comms.empty() ? n == 1 : static_cast<int>(comms.size()) == n),
        "tensor parallelism: {} communicators for {} ranks", comms.size(), n);
  shard_dims(ck.config, 0, n);  // an uneven split fails here, before anything is uploaded
  auto shard = [&](int r) { return TpShard{r, n, comms.empty() ? nullptr : comms[static_cast<size_t>(r)]}; };
  // Each rank's weights are uploaded with its device current (CUDA: allocations go to the current device).
  backends[0]->bind_thread();
  std::unique_ptr<Model> first = make_rank(ck, *backends[0], shard(0));
  for (int r = 1; r < n; ++r) {
    backends[static_cast<size_t>(r)]->bind_thread();
    first->peers_.push_back(make_rank(ck, *backends[static_cast<size_t>(r)], shard(r)));
  }
  backends[0]->bind_thread();
  return first;
}

}  // namespace polar
