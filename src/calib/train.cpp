#include "calib/train.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>

#include "core/error.h"
#include "core/random.h"
#include "sparse/selection.h"

namespace polar::calib {

namespace {

// torch.optim.AdamW's defaults (polar-method.md §4 gives lr and weight decay).
constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8;
// Loss weights of the negatives (positives weigh 1): attention routers 0.5; MLP routers the minibatch's
// fraction of positives plus this, so the rare active neurons are not drowned by the many inactive ones.
constexpr float kAttnNegativeWeight = 0.5f;
constexpr float kMlpNegativeOffset = 0.005f;
// Elementwise loops run on OpenMP threads beyond this many elements (each element independently, so the
// result does not depend on the thread count).
constexpr int64_t kParallelElements = 1 << 16;

// c [m, n] = op(a) · op(b), row-major: a is [m, k] ([k, m] when trans_a), b is [k, n] ([n, k] when trans_b).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, int(m), int(n),
              int(k), 1.0f, a, int(trans_a ? m : k), b, int(trans_b ? k : n), 0.0f, c, int(n));
}

float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// Values [offset, offset + n) of `stream` as torch.nn.Linear initialises weights: uniform in ±1/sqrt(fan_in).
std::vector<float> linear_init(int64_t n, int64_t fan_in, uint64_t stream, int64_t offset = 0) {
  const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[size_t(i)] = (2.0f * uniform_hash(stream, static_cast<uint64_t>(offset + i)) - 1.0f) * bound;
  return v;
}

// v shuffled by a Fisher-Yates walk driven by `stream`.
std::vector<int64_t> shuffled(std::vector<int64_t> v, uint64_t stream) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[mix64(stream + i) % i]);
  return v;
}

// A trained tensor with its gradient and AdamW moments.
struct Param {
  std::vector<float> value, grad, m, v;
  explicit Param(std::vector<float> init)
      : value(std::move(init)), grad(value.size()), m(value.size()), v(value.size()) {}
};

// torch.optim.AdamW: decoupled weight decay, then the bias-corrected Adam step.
class AdamW {
 public:
  explicit AdamW(const TrainOptions& o) : lr_(o.lr), wd_(o.weight_decay) {}
  void step(std::initializer_list<Param*> params) {
    ++t_;
    const double c1 = 1 - std::pow(kBeta1, double(t_)), c2 = 1 - std::pow(kBeta2, double(t_));
    const float decay = float(1 - lr_ * wd_), step = float(lr_ / c1), inv_sqrt_c2 = float(1 / std::sqrt(c2));
    const float b1 = float(kBeta1), b2 = float(kBeta2), eps = float(kEps);
    for (Param* p : params) {
      const int64_t n = static_cast<int64_t>(p->value.size());
      float *w = p->value.data(), *m = p->m.data(), *v = p->v.data();
      const float* g = p->grad.data();
#pragma omp parallel for schedule(static) if (n > kParallelElements)
      for (int64_t i = 0; i < n; ++i) {
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
        w[i] = w[i] * decay - step * m[i] / (std::sqrt(v[i]) * inv_sqrt_c2 + eps);
      }
    }
  }

 private:
  double lr_, wd_;
  int64_t t_ = 0;
};

// Whether entry a of v ranks before entry b: higher first, the lower index among equals (the sparse ops' rule).
bool ranks_before(const float* v, int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }

// Sets chosen[i] = 1 for the k largest of v [n], 0 elsewhere. order: scratch of n entries.
void top_k(const float* v, int64_t n, int64_t k, std::vector<int32_t>& order, uint8_t* chosen) {
  order.resize(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                   [&](int32_t a, int32_t b) { return ranks_before(v, a, b); });
  std::fill(chosen, chosen + n, 0);
  for (int64_t i = 0; i < k; ++i) chosen[order[size_t(i)]] = 1;
}

// Minibatches of `batch` rows over `rows` in order (the last one shorter).
template <typename Fn>
void for_each_batch(const std::vector<int64_t>& rows, int64_t batch, Fn&& fn) {
  for (size_t start = 0; start < rows.size(); start += size_t(batch))
    fn(std::span<const int64_t>(rows).subspan(start, std::min(rows.size() - start, size_t(batch))));
}

void check_split(const LayerSpill& spill, const Split& split, const TrainOptions& o) {
  check(!split.train.empty() && !split.val.empty(), "router training needs training and validation tokens");
  for (const auto* rows : {&split.train, &split.val})
    for (int64_t r : *rows) check(r >= 0 && r < spill.tokens(), "token {} is outside the {} collected", r, spill.tokens());
  check(o.batch >= 1 && o.epochs >= 1 && o.lr > 0, "router training needs batch >= 1, epochs >= 1 and lr > 0");
}

// logits [n, D] = (x [n, d] · aᵀ) · bᵀ with a [r, d], b [D, r].
void low_rank_logits(const float* a, const float* b, int64_t r, int64_t d, int64_t D, const float* x, int64_t n,
                     float* logits) {
  std::vector<float> low(size_t(n * r));
  gemm(false, true, n, r, d, x, a, low.data());
  gemm(false, true, n, D, r, low.data(), b, logits);
}

// Validation F1 of `logit > 0` against `activation > 0`, over all neurons of `rows`, for the router a, b.
double mlp_f1(const LayerSpill& spill, const std::vector<int64_t>& rows, const float* a, const float* b, int64_t r) {
  const int64_t d = spill.dims().hidden, D = spill.dims().ffn;
  std::vector<float> x(size_t(kValidationChunk * d)), logits(size_t(kValidationChunk * D));
  int64_t tp = 0, fp = 0, fn = 0;
  for_each_batch(rows, kValidationChunk, [&](std::span<const int64_t> batch) {
    const int64_t n = static_cast<int64_t>(batch.size());
    spill.inputs(batch, x.data());
    low_rank_logits(a, b, r, d, D, x.data(), n, logits.data());
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* mask = spill.active(batch[size_t(i)]);
      for (int64_t j = 0; j < D; ++j) {
        const bool active = (mask[j / 8] >> (j % 8)) & 1u, predicted = logits[size_t(i * D + j)] > 0;
        tp += active && predicted;
        fp += !active && predicted;
        fn += active && !predicted;
      }
    }
  });
  return tp == 0 ? 0.0 : 2.0 * double(tp) / double(2 * tp + fp + fn);
}

}  // namespace

int64_t heads_kept(double density, int64_t heads) {
  return std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(heads)));
}

uint64_t stream_seed(uint64_t seed, int64_t layer, Stream stream) {
  return mix64(mix64(mix64(seed) + static_cast<uint64_t>(layer)) + static_cast<uint64_t>(stream));
}

int64_t validation_tokens(int64_t n) { return std::max<int64_t>(1, n / kValidationShare); }

Split split_tokens(int64_t n, uint64_t seed) {
  check(n >= 2, "router training needs at least 2 tokens (one for validation), got {}", n);
  std::vector<int64_t> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  all = shuffled(std::move(all), stream_seed(seed, 0, Stream::Split));
  const size_t n_val = static_cast<size_t>(validation_tokens(n));
  Split s{{all.begin() + n_val, all.end()}, {all.begin(), all.begin() + n_val}};
  // Ascending, so the reads of the memory-mapped spill walk forward (training reshuffles every epoch).
  std::sort(s.train.begin(), s.train.end());
  std::sort(s.val.begin(), s.val.end());
  return s;
}

// One token's head norms [heads] pooled per group of `group` consecutive heads into out [heads / group]: the
// L2 norm of the group's output, sqrt(Σ norm²).
void pool_norms(const float* norm, int64_t heads, int64_t group, float* out) {
  for (int64_t g = 0; g < heads / group; ++g) {
    double ss = 0;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) ss += double(norm[h]) * norm[h];
    out[g] = static_cast<float>(std::sqrt(ss));
  }
}

double topk_recall(const float* score, const float* norm, int64_t n, int64_t heads, int64_t group, double density) {
  check(group >= 1 && heads % group == 0, "{} heads do not form groups of {}", heads, group);
  const int64_t G = heads / group, k = heads_kept(density, G);
  std::vector<float> pooled_score(static_cast<size_t>(G)), pooled_norm(static_cast<size_t>(G));
  std::vector<uint8_t> by_score(static_cast<size_t>(G)), by_norm(static_cast<size_t>(G));
  std::vector<int32_t> order;
  double sum = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t g = 0; g < G; ++g)
      pooled_score[size_t(g)] = *std::max_element(score + t * heads + g * group, score + t * heads + (g + 1) * group);
    pool_norms(norm + t * heads, heads, group, pooled_norm.data());
    top_k(pooled_score.data(), G, k, order, by_score.data());
    top_k(pooled_norm.data(), G, k, order, by_norm.data());
    int64_t hits = 0;
    for (int64_t g = 0; g < G; ++g) hits += by_score[size_t(g)] & by_norm[size_t(g)];
    sum += double(hits) / double(k);
  }
  return n ? sum / double(n) : 0.0;
}

std::vector<float> top_share(const LayerSpill& spill, int64_t group, double density) {
  const int64_t H = spill.dims().heads, n = spill.tokens();
  check(group >= 1 && H % group == 0, "{} heads do not form groups of {}", H, group);
  const int64_t G = H / group, k = heads_kept(density, G);
  std::vector<float> pooled(static_cast<size_t>(G));
  std::vector<uint8_t> chosen(static_cast<size_t>(G));
  std::vector<int32_t> order;
  std::vector<int64_t> count(static_cast<size_t>(G), 0);
  for (int64_t t = 0; t < n; ++t) {
    pool_norms(spill.norms(t), H, group, pooled.data());
    top_k(pooled.data(), G, k, order, chosen.data());
    for (int64_t g = 0; g < G; ++g) count[size_t(g)] += chosen[size_t(g)];
  }
  std::vector<float> share(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) share[size_t(g)] = n ? float(double(count[size_t(g)]) / double(n)) : 0.0f;
  return share;
}

UnitStats selection_stats(const LayerSpill& spill, const std::vector<int64_t>& rows, const std::vector<float>& w,
                          const std::vector<float>& b, int64_t group) {
  const SpillDims& dims = spill.dims();
  const int64_t d = dims.hidden, H = dims.heads;
  check(group >= 1 && H % group == 0 && !rows.empty(), "selection statistics: {} heads in groups of {} over {} tokens", H,
        group, rows.size());
  const int64_t G = H / group;
  const size_t units = static_cast<size_t>(G);
  std::vector<float> x(static_cast<size_t>(kValidationChunk * d)), score(static_cast<size_t>(kValidationChunk * H)),
      pooled(units), norm(units), scores, z;
  std::vector<int32_t> order(units);
  std::vector<double> coverage(units + 1, 0.0);
  scores.reserve(rows.size() * size_t(G));
  z.reserve(rows.size() * size_t(G));
  for_each_batch(rows, kValidationChunk, [&](std::span<const int64_t> batch) {
    const int64_t n = static_cast<int64_t>(batch.size());
    spill.inputs(batch, x.data());
    gemm(false, true, n, H, d, x.data(), w.data(), score.data());
    for (int64_t i = 0; i < n; ++i) {
      const float* s = score.data() + i * H;
      for (int64_t g = 0; g < G; ++g) {
        pooled[size_t(g)] = -INFINITY;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) pooled[size_t(g)] = std::max(pooled[size_t(g)], s[h] + b[size_t(h)]);
      }
      scores.insert(scores.end(), pooled.begin(), pooled.end());
      append_standardised(pooled.data(), G, z);
      pool_norms(spill.norms(batch[size_t(i)]), H, group, norm.data());
      // The router's order (higher score first, ties to the lower index), and the energy its first k carry.
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t p, int32_t q) { return ranks_before(pooled.data(), p, q); });
      double total = 0, carried = 0;
      for (float v : norm) total += double(v) * v;
      for (int64_t k = 1; k <= G; ++k) {
        carried += double(norm[size_t(order[size_t(k - 1)])]) * norm[size_t(order[size_t(k - 1)])];
        coverage[size_t(k)] += total > 0 ? std::min(1.0, carried / total) : double(k) / double(G);
      }
    }
  });
  UnitStats out;
  out.score = quantile_table(scores);
  out.z = quantile_table(z);
  out.coverage.resize(size_t(G + 1));
  for (int64_t k = 0; k <= G; ++k) out.coverage[size_t(k)] = float(coverage[size_t(k)] / double(rows.size()));
  return out;
}

AttentionRecall attention_recall(const LayerSpill& spill, const std::vector<int64_t>& rows, const std::vector<float>& w,
                                 const std::vector<float>& b, double density) {
  const SpillDims& dims = spill.dims();
  const int64_t d = dims.hidden, H = dims.heads, group = dims.heads / dims.kv_heads;
  check(static_cast<int64_t>(w.size()) == H * d && static_cast<int64_t>(b.size()) == H,
        "attention router of {} + {} values does not fit {} heads over d = {}", w.size(), b.size(), H, d);
  std::vector<float> x(size_t(kValidationChunk * d)), score(size_t(kValidationChunk * H)), norm(size_t(kValidationChunk * H));
  AttentionRecall sum;
  for_each_batch(rows, kValidationChunk, [&](std::span<const int64_t> batch) {
    const int64_t n = static_cast<int64_t>(batch.size());
    spill.inputs(batch, x.data());
    gemm(false, true, n, H, d, x.data(), w.data(), score.data());
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < H; ++h) score[size_t(i * H + h)] += b[size_t(h)];
      std::copy_n(spill.norms(batch[size_t(i)]), H, norm.data() + i * H);
    }
    sum.head += topk_recall(score.data(), norm.data(), n, H, 1, density) * double(n);
    sum.group += topk_recall(score.data(), norm.data(), n, H, group, density) * double(n);
  });
  const double n = static_cast<double>(std::max<size_t>(1, rows.size()));
  return {sum.head / n, sum.group / n};
}

AttentionRouter train_attention_router(const LayerSpill& spill, const Split& split, const TrainOptions& o,
                                       uint64_t seed, int64_t layer, const EpochFn& on_epoch) {
  check_split(spill, split, o);
  const int64_t d = spill.dims().hidden, H = spill.dims().heads, K = heads_kept(o.head_density, H);
  const uint64_t init = stream_seed(seed, layer, Stream::AttnInit), order_stream = stream_seed(seed, layer, Stream::AttnOrder);
  Param w(linear_init(H * d, d, init)), b(linear_init(H, d, init, H * d));
  AdamW adam(o);
  // Minibatch buffers: x [B, d] inputs, y [B, H] labels, z [B, H] logits, then the loss gradient in place.
  std::vector<float> x(size_t(o.batch * d)), y(size_t(o.batch * H)), z(size_t(o.batch * H));
  std::vector<uint8_t> top(static_cast<size_t>(H));
  std::vector<int32_t> order;
  AttentionRouter best;
  best.head_recall = -1;
  for (int64_t epoch = 1; epoch <= o.epochs; ++epoch) {
    for_each_batch(shuffled(split.train, mix64(order_stream + uint64_t(epoch))), o.batch, [&](std::span<const int64_t> rows) {
      const int64_t B = static_cast<int64_t>(rows.size());
      spill.inputs(rows, x.data());
      for (int64_t i = 0; i < B; ++i) {
        top_k(spill.norms(rows[size_t(i)]), H, K, order, top.data());
        std::copy(top.begin(), top.end(), y.begin() + i * H);
      }
      gemm(false, true, B, H, d, x.data(), w.value.data(), z.data());
      // dLoss/dlogit of the weighted mean BCE: weight · (sigmoid(z) − y) / (B·H).
      const float scale = 1.0f / float(B * H);
      for (int64_t i = 0; i < B * H; ++i) {
        const float label = y[size_t(i)], p = sigmoid(z[size_t(i)] + b.value[size_t(i % H)]);
        z[size_t(i)] = (label > 0 ? 1.0f : kAttnNegativeWeight) * (p - label) * scale;
      }
      gemm(true, false, H, d, B, z.data(), x.data(), w.grad.data());  // dW [H, d] = gᵀ · x
      std::fill(b.grad.begin(), b.grad.end(), 0.0f);
      for (int64_t i = 0; i < B * H; ++i) b.grad[size_t(i % H)] += z[size_t(i)];
      adam.step({&w, &b});
    });
    const AttentionRecall r = attention_recall(spill, split.val, w.value, b.value, o.head_density);
    if (r.head > best.head_recall) best = {w.value, b.value, r.head, r.group, epoch};
    if (on_epoch) on_epoch(epoch, r.head);
  }
  return best;
}

void mlp_logits(const MlpRouter& router, int64_t d, int64_t D, const float* x, int64_t n, float* logits) {
  check(static_cast<int64_t>(router.a.size()) == router.rank * d && static_cast<int64_t>(router.b.size()) == D * router.rank,
        "MLP router of rank {} ({} + {} values) does not fit d = {} and {} neurons", router.rank, router.a.size(),
        router.b.size(), d, D);
  low_rank_logits(router.a.data(), router.b.data(), router.rank, d, D, x, n, logits);
}

MlpRouter train_mlp_router(const LayerSpill& spill, const Split& split, int64_t rank, const TrainOptions& o,
                           uint64_t seed, int64_t layer, const EpochFn& on_epoch) {
  check_split(spill, split, o);
  check(spill.dims().mlp, "layer {} has no ReLU MLP to train a router for", layer);
  check(rank >= 1, "the MLP router rank must be at least 1, not {}", rank);
  const int64_t d = spill.dims().hidden, D = spill.dims().ffn, r = rank;
  const uint64_t init = stream_seed(seed, layer, Stream::MlpInit), order_stream = stream_seed(seed, layer, Stream::MlpOrder);
  Param a(linear_init(r * d, d, init)), b(linear_init(D * r, r, init, r * d));
  AdamW adam(o);
  // Minibatch buffers: x [B, d], y [B, D] labels, low [B, r] = x·aᵀ, z [B, D] logits then their gradient,
  // dlow [B, r].
  std::vector<float> x(size_t(o.batch * d)), y(size_t(o.batch * D)), low(size_t(o.batch * r)), z(size_t(o.batch * D)),
      dlow(size_t(o.batch * r));
  MlpRouter best;
  best.rank = r;
  best.f1 = -1;  // below any F1, so the first epoch is kept
  int64_t since_best = 0;
  for (int64_t epoch = 1; epoch <= o.epochs; ++epoch) {
    for_each_batch(shuffled(split.train, mix64(order_stream + uint64_t(epoch))), o.batch, [&](std::span<const int64_t> rows) {
      const int64_t B = static_cast<int64_t>(rows.size()), n = B * D;
      spill.inputs(rows, x.data());
      spill.labels(rows, y.data());
      gemm(false, true, B, r, d, x.data(), a.value.data(), low.data());
      gemm(false, true, B, D, r, low.data(), b.value.data(), z.data());
      int64_t positives = 0;
      for (int64_t i = 0; i < n; ++i) positives += y[size_t(i)] > 0;
      const float negative_weight = float(positives) / float(n) + kMlpNegativeOffset, scale = 1.0f / float(n);
#pragma omp parallel for schedule(static) if (n > kParallelElements)
      for (int64_t i = 0; i < n; ++i) {
        const float label = y[size_t(i)];
        z[size_t(i)] = (label > 0 ? 1.0f : negative_weight) * (sigmoid(z[size_t(i)]) - label) * scale;
      }
      gemm(true, false, D, r, B, z.data(), low.data(), b.grad.data());      // db [D, r] = gᵀ · low
      gemm(false, false, B, r, D, z.data(), b.value.data(), dlow.data());   // dlow [B, r] = g · b
      gemm(true, false, r, d, B, dlow.data(), x.data(), a.grad.data());     // da [r, d] = dlowᵀ · x
      adam.step({&a, &b});
    });
    const double f1 = mlp_f1(spill, split.val, a.value.data(), b.value.data(), r);
    if (f1 > best.f1) {
      best.a = a.value;
      best.b = b.value;
      best.f1 = f1;
      best.epoch = epoch;
      since_best = 0;
    } else {
      ++since_best;
    }
    best.epochs_run = epoch;
    if (on_epoch) on_epoch(epoch, f1);
    if (f1 > o.f1_stop || since_best >= o.patience) break;
  }
  return best;
}

}  // namespace polar::calib
