// The CPU backend: plain fp32 reference implementations, OpenBLAS for GEMM and OpenMP across rows.
// Obviously-correct first: every CUDA kernel is tested against these.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <omp.h>
#include <unistd.h>
#include <vector>

#include "core/random.h"
#include "ops/backend.h"

namespace polar {

namespace {

void expect_f32(const Tensor& t, const char* what) {
  check(t.dtype() == DType::F32, "cpu backend: {} must be f32, got {}", what, dtype_name(t.dtype()));
}

// The k best of n scores (higher first, the lower index among equals, NaN as -inf) into out[k] in
// ascending index order: the selection rule of every sparse op (backend.h).
void select_top(const float* score, int64_t n, int64_t k, int32_t* out) {
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](int32_t i) { return std::isnan(score[i]) ? -INFINITY : score[i]; };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int32_t a, int32_t b) {
    return key(a) > key(b) || (key(a) == key(b) && a < b);
  });
  std::sort(order.begin(), order.begin() + k);
  std::copy(order.begin(), order.begin() + k, out);
}

// Statistical top-k's threshold for a row of n pooled scores: mean + c · std (population), in fp64 in index
// order with explicit fused multiply-adds (the CUDA kernel computes it the same way, op for op, so both
// backends draw the same line whatever the compiler would contract).
double row_threshold(const float* pooled, int64_t n, float c) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += pooled[i];
  const double mean = sum / double(n);
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = pooled[i] - mean;
    ss = std::fma(d, d, ss);
  }
  return std::fma(double(c), std::sqrt(ss / double(n)), mean);
}

void check_cutoff(const HeadCutoff& c, int64_t R, int64_t k) {
  check(c.kmin >= 1 && c.kmin <= k, "route_heads: kmin {} outside [1, {}] (the list's capacity)", c.kmin, k);
  check(!c.tally || (c.tally->dtype() == DType::I32 && c.tally->numel() == 2),
        "route_heads: the tally must be I32 [2], not {} {}", c.tally ? dtype_name(c.tally->dtype()) : "",
        c.tally ? shape_str(c.tally->shape()) : "");
  check(!c.dense_rows || c.dense_rows->numel() == R, "route_heads: dense_rows {} for {} rows",
        c.dense_rows ? shape_str(c.dense_rows->shape()) : "", R);
}

// Whether row r's selection counts in the tally (HeadCutoff).
bool counts_row(const HeadCutoff& c, int64_t r) {
  if (c.live_rows && r >= c.live_rows->data<int32_t>()[0]) return false;
  return !(c.dense_rows && c.dense_rows->data<int32_t>()[r]);
}

class CpuBackend final : public Backend {
 public:
  // share > 1: one of that many backends running at once (tensor-parallel ranks on the CPU), each issuing
  // its ops with 1/share of OpenMP's threads, so the ranks split the cores instead of each starting a team
  // as large as the machine (4 ranks on 2 cores: 8 threads contending).
  explicit CpuBackend(int share)
      : threads_(share > 1 ? std::max(1, omp_get_max_threads() / share) : 0) {}
  Device device() const override { return Device::CPU; }
  // OpenMP's thread count is per calling thread: the rank's thread sets its own share before issuing work.
  void bind_thread() override {
    if (threads_ > 0) omp_set_num_threads(threads_);
  }
  std::string name() const override { return "cpu"; }
  DType activation_dtype() const override { return DType::F32; }

  Tensor alloc(DType dtype, Shape shape) override { return Tensor::empty(dtype, std::move(shape)); }

  Tensor upload(const Tensor& host, DType dtype) override {
    check(dtype == host.dtype(), "cpu backend: upload cannot convert {} to {}", dtype_name(host.dtype()), dtype_name(dtype));
    return host;
  }

  Tensor to_host_f32(const Tensor& t) override {
    check(t.dtype() == DType::F32 || t.dtype() == DType::I32, "cpu backend: to_host_f32 of a {} tensor",
          dtype_name(t.dtype()));
    return t;
  }

  Tensor random_uniform(DType dtype, Shape shape, float lo, float hi, uint64_t seed) override {
    check(dtype == DType::F32, "cpu backend: random_uniform makes f32 tensors, not {}", dtype_name(dtype));
    Tensor t = Tensor::empty(dtype, std::move(shape));
    float* p = t.data<float>();
    const int64_t n = t.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) p[i] = lo + (hi - lo) * uniform_hash(seed, static_cast<uint64_t>(i));
    return t;
  }

  void embedding(const Tensor& table, const Tensor& ids, Tensor& out, int64_t id_offset) override {
    const int64_t vocab = table.dim(0), d = table.dim(1), n = ids.numel();
    check(out.dim(0) == n && out.dim(1) == d, "embedding: output shape {} for {} ids of width {}", shape_str(out.shape()), n, d);
    const int32_t* id = ids.data<int32_t>();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t row = id[t] + id_offset;
      check(row >= 0 && row < vocab, "id {} is out of range for a table of {} rows", row, vocab);
      std::memcpy(out.data<float>() + t * d, table.data<float>() + row * d, d * sizeof(float));
    }
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, bool accumulate) override {
    gemm(x, w, /*w_kn=*/false, bias, y, accumulate, "linear");
  }

  void add(const Tensor& a, const Tensor& b, Tensor& out) override {
    check(a.numel() == b.numel() && a.numel() == out.numel(), "add: shapes {} and {} differ", shape_str(a.shape()),
          shape_str(b.shape()));
    const float *pa = a.data<float>(), *pb = b.data<float>();
    float* po = out.data<float>();
    const int64_t n = a.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) po[i] = pa[i] + pb[i];
  }

  void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) override {
    const int64_t d = x.dim(-1), rows = x.numel() / d;
    const float *px = x.data<float>(), *pw = w.data<float>(), *pb = b.data<float>();
    float* po = out.data<float>();
#pragma omp parallel for schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xi = px + r * d;
      double mean = 0, var = 0;
      for (int64_t i = 0; i < d; ++i) mean += xi[i];
      mean /= d;
      for (int64_t i = 0; i < d; ++i) var += (xi[i] - mean) * (xi[i] - mean);
      var /= d;
      const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
      for (int64_t i = 0; i < d; ++i) po[r * d + i] = (xi[i] - static_cast<float>(mean)) * inv * pw[i] + pb[i];
    }
  }

  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    const int64_t d = x.dim(-1), rows = x.numel() / d;
    const float *px = x.data<float>(), *pw = w.data<float>();
    float* po = out.data<float>();
#pragma omp parallel for schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xi = px + r * d;
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += double(xi[i]) * xi[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
      for (int64_t i = 0; i < d; ++i) po[r * d + i] = pw[i] * (xi[i] * inv);
    }
  }

  void add_rms_norm(Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& out) override {
    add(x, delta, x);
    rms_norm(x, w, eps, out);
  }

  void rope_kv_append(const Tensor& qkv, KVLayer& cache, const StepLayout& layout, const Tensor& inv_freq,
                      Tensor& q) override {
    // Caches [num_blocks, Hkv, bs, dh]: slot s of head h is row s % bs of block s / bs in h's slab.
    const int64_t T = qkv.dim(0), H = q.dim(1), dh = q.dim(2), Hkv = cache.k.dim(1), bs = cache.k.dim(2),
                  half = dh / 2;
    check(qkv.dim(1) == H + 2 * Hkv && qkv.dim(2) == dh && q.dim(0) == T && cache.k.dim(3) == dh && dh % 2 == 0 &&
              layout.block_size == bs,
          "rope_kv_append: qkv {}, q {} and cache {} (block size {}) do not agree", shape_str(qkv.shape()),
          shape_str(q.shape()), shape_str(cache.k.shape()), layout.block_size);
    const bool rotate = inv_freq.defined();
    check(!rotate || inv_freq.numel() == half, "rope: {} frequencies for head_dim {}", inv_freq.numel(), dh);
    check(layout.slots.numel() == T, "kv_append: {} slots for {} tokens", layout.slots.numel(), T);
    const int64_t slots_total = cache.k.dim(0) * bs;
    const int32_t* slot = layout.slots.data<int32_t>();
    for (int64_t t = 0; t < T; ++t)
      check(slot[t] >= 0 && slot[t] < slots_total, "kv_append: slot {} outside the cache", slot[t]);
    const int32_t* pos = layout.positions.data<int32_t>();
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; ++t) {
      const float* row = qkv.data<float>() + t * (H + 2 * Hkv) * dh;
      // Destination of head row r of the token: q for r < H, then the K cache, then the V cache.
      auto dst_row = [&](int64_t r) {
        if (r < H) return q.data<float>() + (t * H + r) * dh;
        const int64_t h = (r - H) % Hkv;
        float* base = r < H + Hkv ? cache.k.data<float>() : cache.v.data<float>();
        return base + ((slot[t] / bs * Hkv + h) * bs + slot[t] % bs) * dh;
      };
      // Values always, and query and key rows too when nothing rotates, are copied as they are.
      for (int64_t r = rotate ? H + Hkv : 0; r < H + 2 * Hkv; ++r) std::copy(row + r * dh, row + (r + 1) * dh, dst_row(r));
      if (!rotate) continue;
      for (int64_t i = 0; i < half; ++i) {
        // float32 angle, as transformers computes it
        const float angle = static_cast<float>(pos[t]) * inv_freq.data<float>()[i];
        const float c = std::cos(angle), sn = std::sin(angle);
        for (int64_t r = 0; r < H + Hkv; ++r) {
          const float a = row[r * dh + i], b = row[r * dh + i + half];
          float* dst = dst_row(r);
          dst[i] = a * c - b * sn;
          dst[i + half] = b * c + a * sn;
        }
      }
    }
  }

  void attention(const Tensor& q, const KVLayer& cache, const StepLayout& layout, float scale, int64_t window,
                 Tensor& out, const Tensor* kv_heads, const Tensor* dense_tokens) override {
    const int64_t T = q.dim(0), H = q.dim(1), dh = q.dim(2);
    const int64_t Hkv = cache.k.dim(1), group = H / Hkv, bs = layout.block_size;
    check(cache.k.dim(2) == bs, "attention: cache {} does not have blocks of {}", shape_str(cache.k.shape()), bs);
    // selected[t * Hkv + g]: whether token t attends with KV head g's query heads.
    std::vector<char> selected(T * Hkv, kv_heads ? 0 : 1);
    if (kv_heads) {
      const int64_t k = kv_heads->dim(1);
      check(kv_heads->dim(0) == T && k <= Hkv, "attention: kv_heads {} for {} tokens and {} KV heads",
            shape_str(kv_heads->shape()), T, Hkv);
      check(!dense_tokens || dense_tokens->numel() == T, "attention: dense_tokens {} for {} tokens",
            dense_tokens ? shape_str(dense_tokens->shape()) : "", T);
      for (int64_t t = 0; t < T; ++t) {
        if (dense_tokens && dense_tokens->data<int32_t>()[t]) {
          std::fill(selected.begin() + t * Hkv, selected.begin() + (t + 1) * Hkv, 1);
          continue;
        }
        for (int64_t j = 0; j < k; ++j) {
          const int32_t g = kv_heads->data<int32_t>()[t * k + j];
          check(g >= 0 && g <= Hkv, "attention: KV head {} outside [0, {})", g, Hkv);
          if (g < Hkv) selected[t * Hkv + g] = 1;  // Hkv: padding
        }
      }
    }
    const int64_t max_blocks = layout.block_tables.dim(1);
    const int32_t* pos = layout.positions.data<int32_t>();
    const int32_t* seq = layout.token_seq.data<int32_t>();
    const int32_t* tables = layout.block_tables.data<int32_t>();
    const float *pq = q.data<float>(), *pk = cache.k.data<float>(), *pv = cache.v.data<float>();
    float* po = out.data<float>();
#pragma omp parallel
    {
      std::vector<float> scores;
      std::vector<double> acc(dh);
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t first = window > 0 ? std::max<int64_t>(0, pos[t] - window + 1) : 0;
          const int64_t n = pos[t] + 1 - first;
          const int32_t* table = tables + int64_t(seq[t]) * max_blocks;
          const float* qv = pq + (t * H + h) * dh;
          const int64_t kvh = h / group;
          if (!selected[t * Hkv + kvh]) {
            std::fill(po + (t * H + h) * dh, po + (t * H + h + 1) * dh, 0.0f);
            continue;
          }
          auto kv_row = [&](const float* base, int64_t p) {
            return base + ((int64_t(table[p / bs]) * Hkv + kvh) * bs + p % bs) * dh;
          };
          scores.resize(n);
          float mx = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            const float* kr = kv_row(pk, first + j);
            float s = 0;
            for (int64_t i = 0; i < dh; ++i) s += qv[i] * kr[i];
            scores[j] = s * scale;
            mx = std::max(mx, scores[j]);
          }
          double sum = 0;
          for (int64_t j = 0; j < n; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < n; ++j) {
            const float* vr = kv_row(pv, first + j);
            for (int64_t i = 0; i < dh; ++i) acc[i] += double(scores[j]) * vr[i];
          }
          float* o = po + (t * H + h) * dh;
          for (int64_t i = 0; i < dh; ++i) o[i] = static_cast<float>(acc[i] / sum);
        }
      }
    }
  }

  void silu_mul(const Tensor& gate_up, Tensor& out) override {
    const int64_t T = out.dim(0), F = out.dim(1);
    check(gate_up.dim(0) == T && gate_up.dim(1) == 2 * F, "silu_mul: gate_up {} for output {}",
          shape_str(gate_up.shape()), shape_str(out.shape()));
    const float* gu = gate_up.data<float>();
    float* o = out.data<float>();
#pragma omp parallel for schedule(static) if (T * F > 65536)
    for (int64_t i = 0; i < T * F; ++i) {
      const float g = gu[i / F * 2 * F + i % F], u = gu[i / F * 2 * F + F + i % F];
      o[i] = g / (1.0f + std::exp(-g)) * u;
    }
  }

  void argmax(const Tensor& logits, Tensor& out) override {
    const int64_t R = logits.dim(0), V = logits.dim(1);
    check(out.numel() == R && out.dtype() == DType::I32, "argmax: output must be I32 [{}]", R);
    for (int64_t r = 0; r < R; ++r) {
      const float* row = logits.data<float>() + r * V;
      out.data<int32_t>()[r] = static_cast<int32_t>(std::max_element(row, row + V) - row);
    }
  }

  void logprobs(const Tensor& logits, const Tensor& rows, const Tensor& targets, Tensor& target_lp, Tensor& top_ids,
                Tensor& top_lp) override {
    expect_f32(logits, "logprobs logits");
    const int64_t R = logits.dim(0), V = logits.dim(1), M = rows.numel(), n = top_ids.ndim() == 2 ? top_ids.dim(1) : 0;
    check(rows.dtype() == DType::I32 && targets.dtype() == DType::I32 && targets.numel() == M &&
              target_lp.dtype() == DType::F32 && target_lp.numel() == M && top_ids.dtype() == DType::I32 &&
              top_ids.dim(0) == M && n >= 1 && n <= V && top_lp.dtype() == DType::F32 && top_lp.numel() == M * n,
          "logprobs: {} rows, {} targets, outputs {} {} {}", M, targets.numel(), shape_str(target_lp.shape()),
          shape_str(top_ids.shape()), shape_str(top_lp.shape()));
    std::vector<int32_t> order(V);
    for (int64_t m = 0; m < M; ++m) {
      const int32_t r = rows.data<int32_t>()[m], target = targets.data<int32_t>()[m];
      check(r >= 0 && r < R && target >= 0 && target < V, "logprobs: row {} of {}, target {} of {}", r, R, target, V);
      const float* row = logits.data<float>() + r * V;
      const float mx = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      const float lse = static_cast<float>(mx + std::log(sum));
      target_lp.data<float>()[m] = row[target] - lse;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + n, order.end(),
                        [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
      for (int64_t j = 0; j < n; ++j) {
        top_ids.data<int32_t>()[m * n + j] = order[j];
        top_lp.data<float>()[m * n + j] = row[order[j]] - lse;
      }
    }
  }

  void route_heads(const Tensor& scores, int64_t group, Tensor& idx, const HeadCutoff* cutoff) override {
    const int64_t R = scores.dim(0), H = scores.dim(1), k = idx.dim(1), G = H / std::max<int64_t>(group, 1);
    check(group >= 1 && H % group == 0 && idx.dim(0) == R && k >= 1 && k <= G && idx.dtype() == DType::I32,
          "route_heads: {} scores per row in groups of {} cannot give idx {}", H, group, shape_str(idx.shape()));
    if (cutoff) check_cutoff(*cutoff, R, k);
    std::vector<float> pooled(G);
    for (int64_t r = 0; r < R; ++r) {
      const float* row = scores.data<float>() + r * H;
      for (int64_t g = 0; g < G; ++g) {
        pooled[g] = -INFINITY;
        for (int64_t j = g * group; j < (g + 1) * group; ++j)
          if (!std::isnan(row[j])) pooled[g] = std::max(pooled[g], row[j]);
      }
      int32_t* out = idx.data<int32_t>() + r * k;
      if (!cutoff) {
        select_top(pooled.data(), G, k, out);
        continue;
      }
      // The units at or above the threshold are a prefix of the selection order, so keeping n of them is
      // keeping the top n: n = that count, clamped to [kmin, k].
      const double t = cutoff->row_stat ? row_threshold(pooled.data(), G, cutoff->value) : double(cutoff->value);
      const int64_t above = std::count_if(pooled.begin(), pooled.end(), [&](float p) { return double(p) >= t; });
      const int64_t n = std::clamp(above, cutoff->kmin, k);
      select_top(pooled.data(), G, n, out);
      std::fill(out + n, out + k, static_cast<int32_t>(G));
      if (cutoff->tally && counts_row(*cutoff, r)) {
        cutoff->tally->data<int32_t>()[0] += static_cast<int32_t>(n);
        cutoff->tally->data<int32_t>()[1] += 1;
      }
    }
  }

  void route_neurons(const Tensor& logits, const Tensor& live_rows, Tensor& idx) override {
    const int64_t R = std::min<int64_t>(logits.dim(0), live_rows.data<int32_t>()[0]), D = logits.dim(1),
                  k = idx.numel();
    check(k >= 1 && k <= D && idx.dtype() == DType::I32, "route_neurons: {} of {} neurons", k, D);
    std::vector<float> score(D, 0.0f);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < D; ++j) score[j] += std::max(logits.data<float>()[r * D + j], 0.0f);
    select_top(score.data(), D, k, idx.data<int32_t>());
  }

  void l2_norms(const Tensor& x, Tensor& out) override {
    check(x.ndim() == 2 && out.numel() == x.dim(0), "l2_norms: input {} for {} rows", shape_str(x.shape()), out.numel());
    const int64_t R = x.dim(0), n = x.dim(1);
    const float* px = x.data<float>();
    for (int64_t r = 0; r < R; ++r) {
      double ss = 0;
      for (int64_t j = 0; j < n; ++j) ss += double(px[r * n + j]) * px[r * n + j];
      out.data<float>()[r] = static_cast<float>(std::sqrt(ss));
    }
  }

  void keep_heads(Tensor& x, const Tensor& heads, int64_t group, const Tensor* dense_tokens) override {
    const int64_t T = x.dim(0), H = x.dim(1), dh = x.dim(2), k = heads.dim(1);
    check(x.ndim() == 3 && group >= 1 && H % group == 0 && heads.dtype() == DType::I32 && heads.ndim() == 2 &&
              (heads.dim(0) == T || heads.dim(0) == 1) && k >= 1 && k <= H / group,
          "keep_heads: heads {} for x {} in groups of {}", shape_str(heads.shape()), shape_str(x.shape()), group);
    check(!dense_tokens || dense_tokens->numel() == T, "keep_heads: dense_tokens {} for {} tokens",
          dense_tokens ? shape_str(dense_tokens->shape()) : "", T);
    std::vector<char> kept(H / group);
    const int64_t stride = heads.dim(0) == 1 ? 0 : k;  // [1, k]: the same set for every token
    for (int64_t t = 0; t < T; ++t) {
      if (dense_tokens && dense_tokens->data<int32_t>()[t]) continue;
      std::fill(kept.begin(), kept.end(), 0);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t u = heads.data<int32_t>()[t * stride + j];
        check(u >= 0 && u <= H / group, "keep_heads: head {} outside [0, {})", u, H / group);
        if (u < H / group) kept[u] = 1;  // H / group: padding
      }
      for (int64_t h = 0; h < H; ++h)
        if (!kept[h / group]) std::fill_n(x.data<float>() + (t * H + h) * dh, dh, 0.0f);
    }
  }

  void localize_indices(const Tensor& idx, int64_t first, int64_t count, Tensor& out) override {
    const int64_t R = idx.dim(0), k = idx.dim(1), m = out.dim(1);
    check(idx.dtype() == DType::I32 && out.dtype() == DType::I32 && idx.ndim() == 2 && out.ndim() == 2 &&
              out.dim(0) == R && m >= std::min(k, count),
          "localize_indices: {} into {} for {} units", shape_str(idx.shape()), shape_str(out.shape()), count);
    for (int64_t r = 0; r < R; ++r) {
      // Rows are ascending, so the rank's entries are one run of the row.
      const int32_t* row = idx.data<int32_t>() + r * k;
      const int32_t* lo = std::lower_bound(row, row + k, static_cast<int32_t>(first));
      const int32_t* hi = std::lower_bound(lo, row + k, static_cast<int32_t>(first + count));
      int32_t* o = out.data<int32_t>() + r * m;
      for (int64_t j = 0; j < m; ++j) o[j] = static_cast<int32_t>(j < hi - lo ? lo[j] - first : count);
    }
  }

  void gather_up_relu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* idx, Tensor& y) override {
    Tensor b;
    if (bias && idx) b = gather_rows(bias->reshape({bias->numel(), 1}), *idx).reshape({idx->numel()});
    gemm(x, idx ? gather_rows(w, *idx) : w, false, bias && idx ? &b : bias, y, false, "gather_up_relu");
    float* p = y.data<float>();
    for (int64_t i = 0; i < y.numel(); ++i) p[i] = std::max(p[i], 0.0f);
  }

  void gather_down(const Tensor& a, const Tensor& wt, const Tensor* idx, const Tensor* bias, Tensor& y,
                   bool accumulate) override {
    gemm(a, idx ? gather_rows(wt, *idx) : wt, /*w_kn=*/true, bias, y, accumulate, "gather_down");
  }

  void copy_to_device(const Tensor& host, Tensor& dst) override {
    check(host.dtype() == dst.dtype() && host.numel() == dst.numel(), "copy_to_device: {} {} into {} {}",
          dtype_name(host.dtype()), shape_str(host.shape()), dtype_name(dst.dtype()), shape_str(dst.shape()));
    std::memcpy(dst.raw(), host.raw(), host.nbytes());
  }

  void sample(const Tensor& logits, const SamplingParams& p, const Tensor& uniforms, Tensor& out) override {
    expect_f32(logits, "sample logits");
    const int64_t R = logits.dim(0), V = logits.dim(1);
    check(uniforms.numel() == R && out.numel() == R && out.dtype() == DType::I32, "sample: {} rows, {} uniforms, {} outputs",
          R, uniforms.numel(), out.numel());
    for (int64_t r = 0; r < R; ++r)
      out.data<int32_t>()[r] = sample_row(logits.data<float>() + r * V, V, p, uniforms.data<float>()[r]);
  }

  std::pair<int64_t, int64_t> memory_info() override {
    const int64_t page = sysconf(_SC_PAGESIZE);
    return {int64_t(sysconf(_SC_AVPHYS_PAGES)) * page, int64_t(sysconf(_SC_PHYS_PAGES)) * page};
  }

  // The CPU's probe is a streaming read already (a copy would measure the same path less cleanly).
  double measure_read_gbps() override { return measure_memory_gbps(); }

  double measure_memory_gbps() override {
    // 1 GiB of floats, summed in parallel; best of 5 passes after a first touch. Each 4096-float chunk is
    // summed in float with SIMD lanes (exact for ones) so the loop is bound by memory, not by a serial add.
    const int64_t count = int64_t(1) << 28, chunk = 4096;
    std::vector<float> buf(count, 1.0f);
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      double sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
      for (int64_t c0 = 0; c0 < count; c0 += chunk) {
        float part = 0;
        const float* p = buf.data() + c0;
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < chunk; ++i) part += p[i];
        sum += part;
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (sum != double(count)) fail("bandwidth probe: bad sum");
      best = std::max(best, count * 4.0 / s / 1e9);
    }
    return best;
  }

 protected:
  // CPU ops finish before they return, so the host clock at a region mark is the device time.
  int64_t time_marker() override {
    times_.push_back(std::chrono::steady_clock::now());
    return static_cast<int64_t>(times_.size()) - 1;
  }
  double marker_ms(int64_t from, int64_t to) override {
    return std::chrono::duration<double, std::milli>(times_.at(to) - times_.at(from)).count();
  }
  void reset_markers() override { times_.clear(); }

 private:
  int threads_;  // OpenMP threads of the rank that issues this backend's ops; 0: OpenMP's default
  // y[m, n] = x[m, k] · W (+ bias[n]) (+ y), W = wᵀ for w [n, k] (a Linear's weight) or W = w for w [k, n]
  // (w_kn: neuron-major down-projection rows).
  void gemm(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias, Tensor& y, bool accumulate,
            const char* what) {
    const int64_t k = w_kn ? w.dim(0) : w.dim(1), n = w_kn ? w.dim(1) : w.dim(0);
    const int64_t m = x.numel() / std::max<int64_t>(k, 1);
    check(x.numel() == m * k && y.numel() == m * n, "{}: x {} w {} y {} do not agree", what, shape_str(x.shape()),
          shape_str(w.shape()), shape_str(y.shape()));
    check(!bias || bias->numel() == n, "{}: bias of {} for {} outputs", what, bias ? bias->numel() : 0, n);
    float* out = y.data<float>();
    if (bias) {
      const float* b = bias->data<float>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) out[i * n + j] = (accumulate ? out[i * n + j] : 0.0f) + b[j];
    }
    if (m == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, w_kn ? CblasNoTrans : CblasTrans, int(m), int(n), int(k), 1.0f,
                x.data<float>(), int(k), w.data<float>(), w_kn ? int(n) : int(k), (bias || accumulate) ? 1.0f : 0.0f,
                out, int(n));
  }

  // Rows idx of w [D, d] copied into a new [k, d] tensor: an embedding gather (bad indices are errors).
  Tensor gather_rows(const Tensor& w, const Tensor& idx) {
    Tensor out = Tensor::empty(DType::F32, {idx.numel(), w.dim(1)});
    embedding(w, idx, out, 0);
    return out;
  }

  std::vector<std::chrono::steady_clock::time_point> times_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int share) { return std::make_unique<CpuBackend>(share); }

}  // namespace polar
