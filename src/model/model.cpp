#include "model/model.h"

#include <algorithm>
#include <cmath>

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

Tensor Model::load_stacked(const Checkpoint& ck, const std::vector<Part>& parts) {
  const DType dt = backend_.activation_dtype();
  Shape shape = parts.at(0).shape;
  std::string names = parts[0].name;
  for (size_t i = 1; i < parts.size(); ++i) {
    const Shape& p = parts[i].shape;
    check(p.size() == shape.size() && std::equal(p.begin() + 1, p.end(), shape.begin() + 1),
          "cannot stack {} {} onto {} {}", parts[i].name, shape_str(p), names, shape_str(shape));
    shape[0] += p[0];
    names += "+" + parts[i].name;
  }
  Tensor t;
  if (ck.synthetic_seed) {
    const auto [lo, hi] = synthetic_range(parts[0].name, shape);
    t = backend_.random_uniform(dt, shape, lo, hi, mix64(*ck.synthetic_seed) ^ name_hash(names));
  } else if (parts.size() == 1) {
    t = backend_.upload(ck.get(parts[0].name, parts[0].shape), dt);
  } else {
    Tensor host = Tensor::empty(DType::F32, shape);
    float* dst = host.data<float>();
    for (const Part& p : parts) {
      const Tensor& src = ck.get(p.name, p.shape);
      dst = std::copy(src.data<float>(), src.data<float>() + src.numel(), dst);
    }
    t = backend_.upload(host, dt);
  }
  weight_bytes_ += static_cast<int64_t>(t.nbytes());
  return t;
}

Tensor Model::load_transposed(const Checkpoint& ck, const std::string& name, const Shape& shape) {
  const DType dt = backend_.activation_dtype();
  const int64_t n = shape.at(0), k = shape.at(1);
  Tensor t;
  if (ck.synthetic_seed) {
    const auto [lo, hi] = synthetic_range(name, shape);
    t = backend_.random_uniform(dt, {k, n}, lo, hi, mix64(*ck.synthetic_seed) ^ name_hash(name));
  } else {
    const Tensor& src = ck.get(name, shape);
    Tensor host = Tensor::empty(DType::F32, {k, n});
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) host.data<float>()[j * n + i] = src.data<float>()[i * k + j];
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

void Model::attend(int layer, const StepInput& in, const Tensor& heads, const Tensor& q, const KVLayer& cache,
                   float scale, int64_t window, Tensor& attn) const {
  const Tensor* dense = in.dense_tokens.defined() ? &in.dense_tokens : nullptr;
  const bool per_query_head = in.sparsity && in.sparsity->per_query_head();
  const bool selective = heads.defined() && !per_query_head;
  backend_.attention(q, cache, in.layout, scale, window, attn, selective ? &heads : nullptr, dense);
  if (!in.sparsity || selective) return;
  const Tensor kept = heads.defined() ? heads : in.sparsity->heads_from_attention(layer, attn);
  if (kept.defined()) backend_.keep_heads(attn, kept, per_query_head ? 1 : config_.n_heads / config_.n_kv_heads, dense);
}

std::unique_ptr<Model> make_model(const Checkpoint& ck, Backend& backend) {
  switch (ck.config.family) {
    case Family::OPT: return make_opt(ck, backend);
    case Family::Llama: return make_llama(ck, backend);
  }
  fail("unknown model family");
}

}  // namespace polar
