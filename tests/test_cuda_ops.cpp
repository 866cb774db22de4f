// CUDA backend parity: every op against the CPU reference on random inputs over odd shapes, in f16 and
// bf16. Inputs are drawn in fp32, rounded to the CUDA dtype, and the CPU runs on the rounded values, so the
// comparison measures the op's own error. Outputs are poisoned with NaN before each run so an element the
// kernel forgets to write fails the test. Skipped (not failed) where no CUDA device is available.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <tuple>

#include "core/half.h"
#include "ops/backend.h"
#include "ops/cuda_devices.h"
#ifdef POLAR_HAVE_CUDA
#include "ops/cuda/attention.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/selected_gemv.h"
#endif

namespace polar {
namespace {

// Max |a - b| over max |b|: the error measure of the issue (NaN anywhere fails).
double rel_err(const Tensor& got, const Tensor& ref) {
  EXPECT_EQ(got.numel(), ref.numel());
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double g = got.data<float>()[i], r = ref.data<float>()[i];
    if (std::isnan(g) || std::isnan(r)) return std::numeric_limits<double>::infinity();
    diff = std::max(diff, std::abs(g - r));
    scale = std::max(scale, std::abs(r));
  }
  return diff / std::max(scale, 1e-30);
}

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device (or a build without CUDA)";
    cuda_ = make_backend("cuda", GetParam());
    cpu_ = make_cpu_backend();
  }
  DType dt() const { return GetParam(); }
  // Tolerance on rel_err for outputs that went through a few roundings to the CUDA dtype.
  double tol() const { return dt() == DType::F16 ? 4e-3 : 3e-2; }

  float round(float x) const { return dt() == DType::F16 ? f16_to_f32(f32_to_f16(x)) : bf16_to_f32(f32_to_bf16(x)); }

  // A host fp32 tensor of uniform values in [lo, hi), already rounded to the CUDA dtype.
  Tensor host_random(Shape shape, float lo = -1, float hi = 1) {
    Tensor t = Tensor::empty(DType::F32, std::move(shape));
    std::uniform_real_distribution<float> u(lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = round(u(rng_));
    return t;
  }
  Tensor host_i32(const std::vector<int32_t>& v) {
    Tensor t = Tensor::empty(DType::I32, {static_cast<int64_t>(v.size())});
    std::copy(v.begin(), v.end(), t.data<int32_t>());
    return t;
  }
  Tensor dev(const Tensor& host) { return cuda_->upload(host, host.dtype() == DType::I32 ? DType::I32 : dt()); }
  // A CUDA output tensor filled with NaN.
  Tensor poisoned(Shape shape) {
    Tensor t = Tensor::empty(DType::F32, shape);
    std::fill(t.data<float>(), t.data<float>() + t.numel(), std::numeric_limits<float>::quiet_NaN());
    return cuda_->upload(t, dt());
  }
  Tensor back(const Tensor& t) { return cuda_->to_host_f32(t); }
  // gather_up_relu and gather_down against the CPU over odd shapes, and their errors for bad neuron ids.
  void check_gather_gemms();
  // keep_heads of x [T, H, dh] with heads [T, k] (or one set [1, k]) on both backends, tokens 1, 4, 7, ... flagged dense: the
  // elements where the results differ (zeroing and copying are exact, so none may).
  int64_t keep_heads_mismatches(const Tensor& x, const Tensor& heads, int64_t group) {
    std::vector<int32_t> flags(static_cast<size_t>(x.dim(0)));
    for (size_t t = 0; t < flags.size(); ++t) flags[t] = t % 3 == 1;
    Tensor dense = host_i32(flags);
    Tensor ref = Tensor::empty(DType::F32, x.shape());
    std::copy(x.data<float>(), x.data<float>() + x.numel(), ref.data<float>());
    cpu_->keep_heads(ref, heads, group, &dense);
    Tensor got = dev(x), d_heads = dev(heads), d_dense = dev(dense);
    cuda_->keep_heads(got, d_heads, group, &d_dense);
    Tensor g = back(got);
    int64_t wrong = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) wrong += ref.data<float>()[i] != g.data<float>()[i];
    return wrong;
  }

  std::unique_ptr<Backend> cuda_, cpu_;
  std::mt19937_64 rng_{1234};
};


#ifdef POLAR_HAVE_CUDA
// The caching allocator's size classes (pure host arithmetic, so it runs without a GPU): never smaller than
// asked, at most 12.5% larger in the rounded range, and a bounded number of classes over all prompt sizes.
TEST(CudaAllocator, SizeClassesAreBoundedAndTight) {
  EXPECT_EQ(cuda_block_bytes(1), 256u);
  EXPECT_EQ(cuda_block_bytes(257), 512u);
  EXPECT_EQ(cuda_block_bytes(size_t{64} << 10), size_t{64} << 10);
  EXPECT_EQ(cuda_block_bytes((size_t{64} << 10) + 1), (size_t{72} << 10));
  EXPECT_EQ(cuda_block_bytes((size_t{256} << 20) + 1), (size_t{258} << 20));
  std::set<size_t> classes;
  // Activations of a 7B model's steps of 1..2048 tokens: [T, 11008] fp16.
  for (size_t t = 1; t <= 2048; ++t) {
    const size_t bytes = t * 11008 * 2, block = cuda_block_bytes(bytes);
    ASSERT_GE(block, bytes);
    if (bytes >= (size_t{64} << 10) && bytes < (size_t{256} << 20)) {
      ASSERT_LE(block, bytes + bytes / 8);
    }
    classes.insert(block);
  }
  EXPECT_LE(classes.size(), 8u * 12) << "8 classes per power of two";
}

// The read-rate probe reads every word once: its XOR of all 32-bit words equals the host's, over sizes
// with and without a tail past the last 16-byte vector and with one CTA or the whole resident grid; and the
// rate it gives is above zero.
TEST(CudaReadProbe, ReadsEveryWordOnce) {
  if (cuda_devices().empty()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(3);
  const int grid = cuda::read_probe_blocks(0);
  for (int64_t words : {int64_t(1), int64_t(3), int64_t(4), int64_t(1001), int64_t(1) << 22, (int64_t(1) << 24) + 7}) {
    std::vector<uint32_t> host(words);
    uint32_t expected = 0;
    for (uint32_t& w : host) expected ^= (w = rng());
    void* data = nullptr;
    uint32_t* out = nullptr;
    ASSERT_EQ(cudaMalloc(&data, words * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&out, 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(data, host.data(), words * 4, cudaMemcpyHostToDevice), cudaSuccess);
    for (int blocks : {1, grid}) {
      uint32_t got = 0xdeadbeef;
      ASSERT_EQ(cudaMemset(out, 0, 4), cudaSuccess);
      cuda::read_probe(data, words * 4, out, blocks, nullptr);
      ASSERT_EQ(cudaMemcpy(&got, out, 4, cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(got, expected) << words << " words, " << blocks << " CTAs";
    }
    cudaFree(data);
    cudaFree(out);
  }
  auto be = make_backend("cuda", DType::F16);
  EXPECT_GT(be->measure_read_gbps(), 0);
}
#endif

TEST_P(CudaOps, LinearMatchesCpuOverOddShapes) {
  for (int64_t m : {1, 3, 17, 129})
    for (auto [n, k] : {std::pair<int64_t, int64_t>{5, 7}, {64, 48}, {576, 192}, {1000, 1536}}) {
      for (int mode = 0; mode < 3; ++mode) {  // plain, + bias, + bias + accumulate
        SCOPED_TRACE(testing::Message() << "m=" << m << " n=" << n << " k=" << k << " mode=" << mode);
        Tensor x = host_random({m, k}), w = host_random({n, k}, -0.2f, 0.2f), b = host_random({n}), y0 = host_random({m, n});
        Tensor ref = Tensor::empty(DType::F32, {m, n});
        std::copy(y0.data<float>(), y0.data<float>() + y0.numel(), ref.data<float>());
        Tensor got = mode == 2 ? dev(y0) : poisoned({m, n});
        cpu_->linear(x, w, mode ? &b : nullptr, ref, mode == 2);
        Tensor db = dev(b);
        cuda_->linear(dev(x), dev(w), mode ? &db : nullptr, got, mode == 2);
        EXPECT_LT(rel_err(back(got), ref), tol());
      }
    }
}

// Selective attention's output for o_proj tests: a [T, units·width] with each token's units (sel [T, k], a
// random count of real entries, the rest padding = units; row 0 full) and the column blocks of units a token
// did not select zeroed, tokens flagged in dense [T] keeping all; used[u]: some token reads unit u.
struct SelectedInputs {
  Tensor a, sel, dense;
  std::vector<bool> used;
};

SelectedInputs selected_inputs(std::mt19937_64& rng, const Tensor& a_full, int64_t units, int64_t width, int64_t k,
                               const std::vector<int32_t>& dense_flags) {
  const int64_t T = a_full.dim(0), K = units * width;
  std::vector<int32_t> sel(static_cast<size_t>(T * k));
  SelectedInputs s{a_full, {}, {}, std::vector<bool>(static_cast<size_t>(units), false)};
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> all(static_cast<size_t>(units));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    const int64_t real = t == 0 ? k : 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(k));
    std::sort(all.begin(), all.begin() + real);
    for (int64_t j = 0; j < k; ++j) sel[t * k + j] = j < real ? all[j] : static_cast<int32_t>(units);
    for (int64_t u = 0; u < units; ++u) {
      const bool on = dense_flags[t] || std::find(sel.begin() + t * k, sel.begin() + (t + 1) * k, u) != sel.begin() + (t + 1) * k;
      s.used[u] = s.used[u] || on;
      if (!on) std::fill(s.a.data<float>() + t * K + u * width, s.a.data<float>() + t * K + (u + 1) * width, 0.0f);
    }
  }
  s.sel = Tensor::empty(DType::I32, {T, k});
  std::copy(sel.begin(), sel.end(), s.sel.data<int32_t>());
  s.dense = Tensor::empty(DType::I32, {T});
  std::copy(dense_flags.begin(), dense_flags.end(), s.dense.data<int32_t>());
  return s;
}

#ifdef POLAR_HAVE_CUDA
// The selective o_proj kernel itself (linear_selected_inputs takes it only where it is faster than cuBLASLt,
// so the test below may not reach it): every row count it takes, odd shapes, unit widths that are not 16-byte
// multiples and x one element off alignment (the element-wise path), bias and accumulate, padding entries
// and a token flagged dense. The weight columns of units no token selected are NaN, so reading any of them
// fails the comparison.
TEST_P(CudaOps, SelectedGemvReadsOnlySelectedUnits) {
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cuda_device(*cuda_)), cudaSuccess);
  const auto stream = static_cast<cudaStream_t>(cuda_stream(*cuda_));
  const cuda::Elem elem = dt() == DType::F16 ? cuda::Elem::F16 : cuda::Elem::BF16;
  struct Case {
    int64_t units, width, k, n;
  };
  for (int64_t T = 1; T <= cuda::kSelectedGemvMaxRows; ++T)
    for (const Case& c : std::vector<Case>{{8, 16, 3, 40}, {32, 128, 16, 257}, {7, 24, 2, 100}, {4, 5, 1, 33},
                                           {8, 512, 5, 4097}, {3, 8, 3, 6}})
      for (int mode = 0; mode < 4; ++mode) {  // plain, bias + accumulate, x unaligned, a token flagged dense
        SCOPED_TRACE(testing::Message() << "T=" << T << " units=" << c.units << " width=" << c.width << " k=" << c.k
                                        << " n=" << c.n << " mode=" << mode);
        const int64_t K = c.units * c.width, shift = mode == 2 ? 1 : 0;
        std::vector<int32_t> flags(static_cast<size_t>(T), 0);
        if (mode == 3) flags[static_cast<size_t>(T - 1)] = 1;
        SelectedInputs in = selected_inputs(rng_, host_random({T, K}), c.units, c.width, c.k, flags);
        Tensor w = host_random({c.n, K}, -0.2f, 0.2f), b = host_random({c.n}), y0 = host_random({T, c.n});
        Tensor w_gpu = Tensor::empty(DType::F32, w.shape());
        std::copy(w.data<float>(), w.data<float>() + w.numel(), w_gpu.data<float>());
        for (int64_t u = 0; u < c.units; ++u)
          for (int64_t i = 0; i < c.n && !in.used[u]; ++i)
            std::fill(w_gpu.data<float>() + i * K + u * c.width, w_gpu.data<float>() + i * K + (u + 1) * c.width,
                      std::numeric_limits<float>::quiet_NaN());
        Tensor ref = Tensor::empty(DType::F32, {T, c.n});
        std::copy(y0.data<float>(), y0.data<float>() + y0.numel(), ref.data<float>());
        cpu_->linear(in.a, w, mode == 1 ? &b : nullptr, ref, mode == 1);
        Tensor x = Tensor::zeros(DType::F32, {T * K + shift});
        std::copy(in.a.data<float>(), in.a.data<float>() + T * K, x.data<float>() + shift);
        Tensor dx = dev(x), dw = dev(w_gpu), db = dev(b), dsel = dev(in.sel), ddense = dev(in.dense);
        Tensor got = mode == 1 ? dev(y0) : poisoned({T, c.n});
        cuda::SelectedGemv g;
        g.x = static_cast<const char*>(dx.raw()) + shift * 2;
        g.ldx = K;
        g.w = dw.raw();
        g.bias = mode == 1 ? db.raw() : nullptr;
        g.y = got.raw();
        g.ldy = c.n;
        g.M = T;
        g.N = c.n;
        g.accumulate = mode == 1;
        g.sel = dsel.data<int32_t>();
        g.sel_k = c.k;
        g.dense_rows = mode == 3 ? ddense.data<int32_t>() : nullptr;
        g.units = c.units;
        g.width = c.width;
        cuda::selected_gemv(g, sms, elem, stream);
        EXPECT_LT(rel_err(back(got), ref), tol());
      }
}
#endif

// The output projection of selective attention through the backend (on CUDA selected_gemv or cuBLASLt,
// whichever is faster for the shape) equals linear on the CPU, at decode-sized and larger T, with padding
// entries and a token flagged dense.
TEST_P(CudaOps, LinearSelectedInputsMatchesCpu) {
  for (int64_t T : {1, 2, 4, 6})
    for (bool dense_token : {false, true}) {
      SCOPED_TRACE(testing::Message() << "T=" << T << " dense_token=" << dense_token);
      const int64_t units = 8, width = 64, k = 3, n = 96;
      std::vector<int32_t> flags(static_cast<size_t>(T), 0);
      if (dense_token) flags[0] = 1;
      SelectedInputs in = selected_inputs(rng_, host_random({T, units * width}), units, width, k, flags);
      Tensor w = host_random({n, units * width}, -0.2f, 0.2f), b = host_random({n});
      Tensor ref = host_random({T, n}), got = dev(ref);
      cpu_->linear(in.a, w, &b, ref, /*accumulate=*/true);
      Tensor db = dev(b), dsel = dev(in.sel), ddense = dev(in.dense);
      cuda_->linear_selected_inputs(dev(in.a), dev(w), &db, dsel, width, dense_token ? &ddense : nullptr, got, true);
      EXPECT_LT(rel_err(back(got), ref), tol());
    }
}

TEST_P(CudaOps, NormsMatchCpu) {
  for (int64_t rows : {1, 3, 17, 129})
    for (int64_t d : {8, 67, 576, 4096}) {
      SCOPED_TRACE(testing::Message() << "rows=" << rows << " d=" << d);
      Tensor x = host_random({rows, d}, -3, 3), w = host_random({d}, 0.5f, 1.5f), b = host_random({d});
      Tensor ref = Tensor::empty(DType::F32, {rows, d});
      cpu_->rms_norm(x, w, 1e-5f, ref);
      Tensor got = poisoned({rows, d});
      cuda_->rms_norm(dev(x), dev(w), 1e-5f, got);
      EXPECT_LT(rel_err(back(got), ref), tol());
      cpu_->layer_norm(x, w, b, 1e-5f, ref);
      Tensor inplace = dev(x);  // out aliasing x is allowed
      cuda_->layer_norm(inplace, dev(w), dev(b), 1e-5f, inplace);
      EXPECT_LT(rel_err(back(inplace), ref), tol());
      // The residual add fused in: x += delta is stored, and the norm is of the sum; out separate, then in place.
      Tensor delta = host_random({rows, d}, -3, 3), sum_ref = Tensor::empty(DType::F32, {rows, d});
      cpu_->add(x, delta, sum_ref);
      cpu_->rms_norm(sum_ref, w, 1e-5f, ref);
      for (bool in_place : {false, true}) {
        Tensor xd = dev(x), out = poisoned({rows, d});
        cuda_->add_rms_norm(xd, dev(delta), dev(w), 1e-5f, in_place ? xd : out);
        EXPECT_LT(rel_err(back(in_place ? xd : out), ref), tol()) << "add_rms_norm, in place: " << in_place;
        if (!in_place) {
          EXPECT_LT(rel_err(back(xd), sum_ref), tol()) << "add_rms_norm's stored sum";
        }
      }
    }
}

TEST_P(CudaOps, ElementwiseAndEmbeddingMatchCpu) {
  for (int64_t n : {1, 3, 17, 129 * 1000 + 7}) {
    Tensor a = host_random({n}, -4, 4), b = host_random({n});
    Tensor ref = Tensor::empty(DType::F32, {n}), got = poisoned({n});
    cpu_->add(a, b, ref);
    cuda_->add(dev(a), dev(b), got);
    EXPECT_LT(rel_err(back(got), ref), tol()) << "add n=" << n;
    Tensor gate_up = host_random({3, 2 * n}, -4, 4), act_ref = Tensor::empty(DType::F32, {3, n}),
           act = poisoned({3, n});
    cpu_->silu_mul(gate_up, act_ref);
    cuda_->silu_mul(dev(gate_up), act);
    EXPECT_LT(rel_err(back(act), act_ref), tol()) << "silu_mul n=" << n;
  }
  Tensor table = host_random({37, 24});
  std::vector<int32_t> ids = {0, 35, 5, 5, 2, 34};  // + offset 1: rows 1..36
  Tensor ref = Tensor::empty(DType::F32, {6, 24}), got = poisoned({6, 24});
  cpu_->embedding(table, host_i32(ids), ref, 1);
  cuda_->embedding(dev(table), dev(host_i32(ids)), got, 1);
  EXPECT_EQ(rel_err(back(got), ref), 0.0);
  // An id past the table is reported at the next synchronisation, and the backend stays usable.
  Tensor one = poisoned({1, 24});
  cuda_->embedding(dev(table), dev(host_i32({40})), one, 0);
  EXPECT_THROW(cuda_->synchronize(), Error);
  cuda_->embedding(dev(table), dev(host_i32(ids)), got, 1);
  EXPECT_EQ(rel_err(back(got), ref), 0.0);
}

TEST_P(CudaOps, ArgmaxAndRandomMatchCpu) {
  for (auto [R, V] : {std::pair<int64_t, int64_t>{1, 7}, {3, 50257}, {129, 1000}}) {
    Tensor logits = host_random({R, V}, -10, 10);
    logits.data<float>()[V - 1] = 20;  // a tie in row 0, broken towards the lower index
    logits.data<float>()[V / 2] = 20;
    Tensor ref = Tensor::empty(DType::I32, {R});
    cpu_->argmax(logits, ref);
    Tensor got = cuda_->alloc(DType::I32, {R});
    cuda_->argmax(dev(logits), got);
    Tensor g = back(got);
    for (int64_t r = 0; r < R; ++r) EXPECT_EQ(g.data<int32_t>()[r], ref.data<int32_t>()[r]) << "row " << r;
  }
  // The counter-based generator draws the same f32 numbers on both backends.
  Tensor a = cpu_->random_uniform(DType::F32, {1000, 3}, -2, 5, 99);
  Tensor b = back(cuda_->random_uniform(DType::F32, {1000, 3}, -2, 5, 99));
  EXPECT_EQ(rel_err(b, a), 0.0);
}

// Sampling on the device picks the CPU reference's token for the same uniform numbers, for every mix of
// temperature, top-k and top-p (the logits are rounded to the CUDA dtype first, so both see equal inputs).
TEST_P(CudaOps, SampleMatchesCpu) {
  const std::vector<SamplingParams> params = {{0.0f}, {1.0f}, {0.7f, 40}, {1.3f, 0, 0.9f}, {0.8f, 50, 0.95f},
                                              {1.0f, 1}, {2.0f, 0, 0.05f}, {1.0f, 100000}};
  for (auto [R, V] : {std::pair<int64_t, int64_t>{1, 13}, {17, 32000}, {5, 151936}}) {
    Tensor logits = host_random({R, V}, -8, 8);
    Tensor uniforms = Tensor::empty(DType::F32, {R});
    std::uniform_real_distribution<float> u(0, 1);
    for (const SamplingParams& p : params) {
      SCOPED_TRACE(testing::Message() << "R=" << R << " V=" << V << " T=" << p.temperature << " k=" << p.top_k
                                      << " p=" << p.top_p);
      for (int64_t r = 0; r < R; ++r) uniforms.data<float>()[r] = u(rng_);
      Tensor ref = Tensor::empty(DType::I32, {R});
      cpu_->sample(logits, p, uniforms, ref);
      Tensor got = cuda_->alloc(DType::I32, {R});
      cuda_->sample(dev(logits), p, cuda_->upload(uniforms, DType::F32), got);
      Tensor g = back(got);
      for (int64_t r = 0; r < R; ++r) EXPECT_EQ(g.data<int32_t>()[r], ref.data<int32_t>()[r]) << "row " << r;
    }
  }
}

// log-softmax at chosen rows: the targets' values, and the top n ids exactly (the inputs are the same
// rounded values on both backends; ties go to the lower id) with their values, for n = 1 up to the API's 20,
// over rows listed out of order; outputs poisoned first.
TEST_P(CudaOps, LogprobsMatchCpu) {
  for (auto [R, V, n] : {std::tuple<int64_t, int64_t, int64_t>{1, 7, 7}, {6, 32000, 5}, {4, 151936, 20}, {9, 1000, 1}}) {
    SCOPED_TRACE(testing::Message() << "R=" << R << " V=" << V << " n=" << n);
    Tensor logits = host_random({R, V}, -12, 12);
    logits.data<float>()[V - 1] = 15;  // a tie at the top of row 0, the lower id first
    logits.data<float>()[V / 2] = 15;
    std::vector<int32_t> rows = {static_cast<int32_t>(R - 1), 0}, targets = {static_cast<int32_t>(V / 3), 0};
    if (R > 2) rows.push_back(2), targets.push_back(static_cast<int32_t>(V - 1));
    const int64_t M = static_cast<int64_t>(rows.size());
    Tensor ref_lp = Tensor::empty(DType::F32, {M}), ref_ids = Tensor::empty(DType::I32, {M, n}),
           ref_top = Tensor::empty(DType::F32, {M, n});
    cpu_->logprobs(logits, host_i32(rows), host_i32(targets), ref_lp, ref_ids, ref_top);
    auto nan = [&](Shape shape) {
      Tensor t = Tensor::empty(DType::F32, shape);
      std::fill(t.data<float>(), t.data<float>() + t.numel(), std::numeric_limits<float>::quiet_NaN());
      return cuda_->upload(t, DType::F32);
    };
    Tensor lp = nan({M}), top = nan({M, n}), ids = cuda_->alloc(DType::I32, {M, n});
    cuda_->logprobs(dev(logits), dev(host_i32(rows)), dev(host_i32(targets)), lp, ids, top);
    const Tensor g_lp = back(lp), g_ids = back(ids), g_top = back(top);
    for (int64_t i = 0; i < M * n; ++i) EXPECT_EQ(g_ids.data<int32_t>()[i], ref_ids.data<int32_t>()[i]) << i;
    // fp32 log-sum-exp over V terms in another order (and the device's exp/log): error relative to the
    // values' magnitude.
    EXPECT_LE(rel_err(g_lp, ref_lp), 1e-5);
    EXPECT_LE(rel_err(g_top, ref_top), 1e-5);
  }
}

// A paged cache of S sequences with the given contexts (after this step's tokens), blocks scattered.
struct PagedCase {
  std::vector<int32_t> ctx;    // context of each sequence after the step
  std::vector<int32_t> chunk;  // tokens each sequence feeds in this step
  int64_t H, Hkv, dh, block_size = 16, window = 0;
};

TEST_P(CudaOps, RopeKvAppendAndAttentionMatchCpu) {
  const std::vector<PagedCase> cases = {
      // decode: one token per sequence
      {{1}, {1}, 8, 8, 64},
      {{97, 1, 50}, {1, 1, 1}, 8, 2, 128},
      {std::vector<int32_t>(17, 4099), std::vector<int32_t>(17, 1), 32, 8, 128},
      {std::vector<int32_t>(129, 97), std::vector<int32_t>(129, 1), 16, 2, 64},
      {{200, 33, 7, 1, 150}, {1, 1, 1, 1, 1}, 8, 1, 8},
      {{300, 45}, {1, 1}, 4, 4, 16},
      {{513, 64}, {1, 1}, 8, 2, 32},
      {{97, 260}, {1, 1}, 4, 1, 80},
      {{97, 260}, {1, 1}, 12, 4, 96},
      {{97, 260}, {1, 1}, 8, 1, 256},
      {{1000, 40}, {1, 1}, 8, 2, 64, 16, 100},  // sliding window
      {{4099}, {1}, 8, 8, 128, 7},              // block size that is not a power of two
      // prefill: chunks of different lengths after earlier context
      {{1, 17, 164}, {1, 17, 64}, 8, 2, 64},
      {{129}, {129}, 4, 4, 128},
      {{40, 90}, {40, 30}, 8, 8, 8},
      {{40, 90}, {33, 30}, 4, 2, 16},
      {{70, 20}, {70, 5}, 4, 1, 80},
      {{70, 20}, {64, 20}, 4, 2, 256},
      {{300}, {150}, 8, 2, 64, 16, 50},  // sliding window
  };
  int case_index = 0;
  for (const PagedCase& pc : cases) {
    const int64_t S = static_cast<int64_t>(pc.ctx.size()), H = pc.H, Hkv = pc.Hkv, dh = pc.dh, bs = pc.block_size;
    SCOPED_TRACE(testing::Message() << "S=" << S << " ctx0=" << pc.ctx[0] << " chunk0=" << pc.chunk[0] << " H=" << H
                                    << " Hkv=" << Hkv << " dh=" << dh << " window=" << pc.window);
    int64_t max_blocks = 0, total_blocks = 0, T = 0, max_ctx = 0, max_chunk = 0;
    for (int64_t s = 0; s < S; ++s) {
      max_blocks = std::max<int64_t>(max_blocks, (pc.ctx[s] + bs - 1) / bs);
      total_blocks += (pc.ctx[s] + bs - 1) / bs;
      T += pc.chunk[s];
      max_ctx = std::max<int64_t>(max_ctx, pc.ctx[s]);
      max_chunk = std::max<int64_t>(max_chunk, pc.chunk[s]);
    }
    // Scatter the blocks: a random permutation of physical blocks, plus spare ones nobody owns.
    std::vector<int32_t> perm(total_blocks + 3);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng_);
    std::vector<int32_t> tables(S * max_blocks, 0), pos, seq, slots, starts;
    int64_t next = 0;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t b = 0; b < (pc.ctx[s] + bs - 1) / bs; ++b) tables[s * max_blocks + b] = perm[next++];
      starts.push_back(static_cast<int32_t>(pos.size()));
      for (int32_t p = pc.ctx[s] - pc.chunk[s]; p < pc.ctx[s]; ++p) {
        pos.push_back(p);
        seq.push_back(static_cast<int32_t>(s));
        slots.push_back(static_cast<int32_t>(tables[s * max_blocks + p / bs] * bs + p % bs));
      }
    }
    starts.push_back(static_cast<int32_t>(T));
    const int64_t num_blocks = static_cast<int64_t>(perm.size());
    Tensor t_tables = Tensor::empty(DType::I32, {S, max_blocks});
    std::copy(tables.begin(), tables.end(), t_tables.data<int32_t>());
    StepLayout cpu_l{host_i32(pos), host_i32(seq), host_i32(slots), t_tables, host_i32(starts), bs, max_ctx, max_chunk, {}};
    StepLayout gpu_l{dev(cpu_l.positions), dev(cpu_l.token_seq), dev(cpu_l.slots), dev(t_tables),
                     dev(cpu_l.seq_starts), bs, max_ctx, max_chunk, {}};
    // Earlier context: random cache contents; this step's K/V go in through rope_kv_append.
    Tensor kc = host_random({num_blocks, Hkv, bs, dh}), vc = host_random({num_blocks, Hkv, bs, dh});
    KVLayer cpu_cache{kc, vc}, gpu_cache{dev(kc), dev(vc)};
    // Every third case without rotation (OPT's learned positions).
    const bool rotate = case_index++ % 3 != 2;
    Tensor qkv = host_random({T, H + 2 * Hkv, dh}, -2, 2);
    Tensor inv_freq;
    if (rotate) {
      inv_freq = Tensor::empty(DType::F32, {dh / 2});
      for (int64_t i = 0; i < dh / 2; ++i) inv_freq.data<float>()[i] = std::pow(10000.0f, -2.0f * i / dh);
    }
    Tensor q = Tensor::empty(DType::F32, {T, H, dh}), gq = poisoned({T, H, dh});
    cpu_->rope_kv_append(qkv, cpu_cache, cpu_l, inv_freq, q);
    cuda_->rope_kv_append(dev(qkv), gpu_cache, gpu_l, rotate ? cuda_->upload(inv_freq, DType::F32) : Tensor(), gq);
    EXPECT_LT(rel_err(back(gq), q), tol()) << "q, rotate " << rotate;
    EXPECT_LT(rel_err(back(gpu_cache.k), cpu_cache.k), tol()) << "K cache, rotate " << rotate;
    EXPECT_EQ(rel_err(back(gpu_cache.v), cpu_cache.v), 0.0) << "V cache";
    // Attention on identical inputs: the CPU reads the CUDA-rounded rotated q and cache.
    Tensor q_r = back(gq);
    KVLayer cache_r{back(gpu_cache.k), back(gpu_cache.v)};
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    Tensor ref = Tensor::empty(DType::F32, {T, H, dh}), got = poisoned({T, H, dh});
    cpu_->attention(q_r, cache_r, cpu_l, scale, pc.window, ref);
    cuda_->attention(gq, gpu_cache, gpu_l, scale, pc.window, got);
    EXPECT_LT(rel_err(back(got), ref), tol()) << "attention";
    if (max_chunk > 1) continue;
#ifdef POLAR_HAVE_CUDA
    // Every split plan the backend may time and pick for this decode step gives the same result.
    {
      int sms = 0;
      ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cuda_device(*cuda_)), cudaSuccess);
      cuda::PagedAttention a;
      a.q = gq.raw();
      a.k_cache = gpu_cache.k.raw();
      a.v_cache = gpu_cache.v.raw();
      a.positions = gpu_l.positions.data<int32_t>();
      a.token_seq = gpu_l.token_seq.data<int32_t>();
      a.block_tables = gpu_l.block_tables.data<int32_t>();
      a.seq_starts = gpu_l.seq_starts.data<int32_t>();
      a.T = static_cast<int>(T);
      a.S = static_cast<int>(S);
      a.H = static_cast<int>(H);
      a.Hkv = static_cast<int>(Hkv);
      a.dh = static_cast<int>(dh);
      a.block_size = static_cast<int>(bs);
      a.max_blocks = static_cast<int>(max_blocks);
      a.max_ctx = static_cast<int>(max_ctx);
      a.max_chunk = 1;
      a.window = static_cast<int>(pc.window);
      a.scale = scale;
      a.bf16 = dt() == DType::BF16;
      const std::vector<cuda::AttentionPlan> plans = cuda::attention_plans(a, sms);
      EXPECT_GE(plans.size(), 2u) << "decode steps have a model plan and fill plans";
      for (const cuda::AttentionPlan& plan : plans) {
        SCOPED_TRACE(testing::Message() << plan.splits << " splits of " << plan.keys_per_split << " keys");
        const size_t ws = cuda::attention_workspace_bytes(a, plan), n = cuda::attention_arrival_counters(a, plan);
        Tensor workspace = cuda_->upload(Tensor::zeros(DType::F32, {static_cast<int64_t>(ws / 4 + 1)}), DType::F32);
        Tensor arrivals = dev(Tensor::zeros(DType::I32, {static_cast<int64_t>(n + 1)}));
        Tensor out = poisoned({T, H, dh});
        a.out = out.raw();
        cuda::paged_attention(a, plan, workspace.raw(), ws, static_cast<unsigned*>(arrivals.raw()), n,
                              static_cast<cudaStream_t>(cuda_stream(*cuda_)));
        EXPECT_LT(rel_err(back(out), ref), tol()) << "attention";
        const Tensor left = cuda_->to_host_f32(arrivals);  // every launch leaves its counters at zero
        for (int64_t i = 0; i < left.numel(); ++i) EXPECT_EQ(left.data<int32_t>()[i], 0) << "arrival counter " << i;
      }
      // A plan whose splits do not cover the context is refused.
      if (max_ctx > 128) {
        Tensor out = poisoned({T, H, dh});
        a.out = out.raw();
        EXPECT_THROW(cuda::paged_attention(a, cuda::AttentionPlan{2, 64}, nullptr, 0, nullptr, 0,
                                           static_cast<cudaStream_t>(cuda_stream(*cuda_))),
                     Error);
      }
    }
#endif
    // Selective decode: a random, ascending set of k KV heads per token (k = 1 .. Hkv over the cases).
    const int64_t k = 1 + case_index % Hkv;
    Tensor kv = Tensor::empty(DType::I32, {T, k});
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> heads(Hkv);
      std::iota(heads.begin(), heads.end(), 0);
      std::shuffle(heads.begin(), heads.end(), rng_);
      std::sort(heads.begin(), heads.begin() + k);
      std::copy(heads.begin(), heads.begin() + k, kv.data<int32_t>() + t * k);
    }
    Tensor sref = Tensor::empty(DType::F32, {T, H, dh}), sgot = poisoned({T, H, dh});
    cpu_->attention(q_r, cache_r, cpu_l, scale, pc.window, sref, &kv);
    Tensor gkv = dev(kv);
    cuda_->attention(gq, gpu_cache, gpu_l, scale, pc.window, sgot, &gkv);
    Tensor sback = back(sgot);
    EXPECT_LT(rel_err(sback, sref), tol()) << "selective attention, k " << k << " of " << Hkv;
    int64_t nonzero_skipped = 0;  // skipped heads must be exactly zero
    for (int64_t i = 0; i < sref.numel(); ++i) nonzero_skipped += sref.data<float>()[i] == 0.0f && sback.data<float>()[i] != 0.0f;
    EXPECT_EQ(nonzero_skipped, 0);
    if (k == Hkv) continue;
    // The same selection padded with Hkv (a tensor-parallel rank's list, localize_indices): padding
    // launches nothing, and the result is the unpadded one.
    Tensor kvp = Tensor::empty(DType::I32, {T, k + 1});
    for (int64_t t = 0; t < T; ++t) {
      std::copy(kv.data<int32_t>() + t * k, kv.data<int32_t>() + (t + 1) * k, kvp.data<int32_t>() + t * (k + 1));
      kvp.data<int32_t>()[t * (k + 1) + k] = static_cast<int32_t>(Hkv);
    }
    Tensor pgot = poisoned({T, H, dh}), gkvp = dev(kvp);
    cuda_->attention(gq, gpu_cache, gpu_l, scale, pc.window, pgot, &gkvp);
    EXPECT_LT(rel_err(back(pgot), sref), tol()) << "padded selective attention, k " << k << " of " << Hkv;
    // Variable counts (adaptive selection's fixed-capacity lists, issue 19): token t keeps its first
    // 1 + t % Hkv heads of a shuffled order, the rest of its Hkv slots padding.
    Tensor var = Tensor::empty(DType::I32, {T, Hkv});
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> heads(Hkv);
      std::iota(heads.begin(), heads.end(), 0);
      std::shuffle(heads.begin(), heads.end(), rng_);
      const int64_t n = 1 + t % Hkv;
      std::sort(heads.begin(), heads.begin() + n);
      std::fill(heads.begin() + n, heads.end(), static_cast<int32_t>(Hkv));
      std::copy(heads.begin(), heads.end(), var.data<int32_t>() + t * Hkv);
    }
    Tensor vref = Tensor::empty(DType::F32, {T, H, dh}), vgot = poisoned({T, H, dh}), gvar = dev(var);
    cpu_->attention(q_r, cache_r, cpu_l, scale, pc.window, vref, &var);
    cuda_->attention(gq, gpu_cache, gpu_l, scale, pc.window, vgot, &gvar);
    Tensor vback = back(vgot);
    EXPECT_LT(rel_err(vback, vref), tol()) << "variable-count selective attention over " << Hkv << " KV heads";
    int64_t nonzero_padded = 0;  // heads of padding slots are exactly zero
    for (int64_t i = 0; i < vref.numel(); ++i) nonzero_padded += vref.data<float>()[i] == 0.0f && vback.data<float>()[i] != 0.0f;
    EXPECT_EQ(nonzero_padded, 0);
  }
}

// A tensor-parallel rank's part of ascending selections (localize_indices) is exact, and keep_heads skips
// its padding like the CPU.
TEST_P(CudaOps, LocalizeIndicesAndPaddingMatchCpu) {
  struct Case {
    int64_t R, k, D, first, count;
  };
  for (const Case& c : std::vector<Case>{{1, 8, 16, 0, 4}, {7, 5, 12, 3, 9}, {33, 300, 4096, 1000, 2000}, {2, 64, 64, 32, 32}}) {
    Tensor idx = Tensor::empty(DType::I32, {c.R, c.k});
    for (int64_t r = 0; r < c.R; ++r) {
      std::vector<int32_t> all(static_cast<size_t>(c.D));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng_);
      std::sort(all.begin(), all.begin() + c.k);
      std::copy(all.begin(), all.begin() + c.k, idx.data<int32_t>() + r * c.k);
    }
    const int64_t m = std::min(c.k, c.count);
    Tensor ref = Tensor::empty(DType::I32, {c.R, m});
    cpu_->localize_indices(idx, c.first, c.count, ref);
    Tensor got = cuda_->alloc(DType::I32, {c.R, m});
    cuda_->localize_indices(dev(idx), c.first, c.count, got);
    Tensor g = back(got);
    EXPECT_TRUE(std::equal(ref.data<int32_t>(), ref.data<int32_t>() + ref.numel(), g.data<int32_t>()))
        << "R " << c.R << " k " << c.k << " [" << c.first << ", " << c.first + c.count << ")";
    EXPECT_EQ(keep_heads_mismatches(host_random({c.R, c.count, 2}), ref, 1), 0);
  }
}

// Router selections are exact: the CPU reads the same (rounded) scores, so the index sets must be equal,
// ties and NaN included.
TEST_P(CudaOps, RouteHeadsAndNeuronsSelectLikeCpu) {
  struct HeadCase {
    int64_t R, H, group, k;
  };
  for (const HeadCase& c : std::vector<HeadCase>{{1, 8, 1, 1}, {5, 32, 1, 16}, {33, 32, 4, 5}, {130, 72, 1, 21},
                                                  {17, 28, 7, 2}, {3, 64, 8, 8}, {2, 1024, 1, 300}}) {
    Tensor scores = host_random({c.R, c.H}, -3, 3);
    // Ties (a repeated value) and a NaN, which ranks last.
    scores.data<float>()[0] = scores.data<float>()[c.H - 1];
    if (c.H > 2) scores.data<float>()[1] = std::numeric_limits<float>::quiet_NaN();
    Tensor ref = Tensor::empty(DType::I32, {c.R, c.k});
    cpu_->route_heads(scores, c.group, ref);
    Tensor got = cuda_->alloc(DType::I32, {c.R, c.k});
    cuda_->route_heads(dev(scores), c.group, got);
    Tensor g = back(got);
    EXPECT_TRUE(std::equal(ref.data<int32_t>(), ref.data<int32_t>() + ref.numel(), g.data<int32_t>()))
        << "R " << c.R << " H " << c.H << " group " << c.group << " k " << c.k;
  }
  struct NeuronCase {
    int64_t R, live, D, k;
  };
  // D = 16383 and 70001 leave a tail the 16-byte copies miss; 70000 and 70001 exceed the shared memory the
  // selection stages keys in (about 55k keys on Hopper) and read them from global memory. k = 12000 and
  // 50000 put the threshold among the zero scores, so only some of the tied keys are taken.
  for (const NeuronCase& c : std::vector<NeuronCase>{{1, 1, 64, 1},
                                                      {5, 5, 1000, 333},
                                                      {33, 20, 16384, 4096},
                                                      {130, 129, 3072, 3072},
                                                      {256, 256, 36864, 9216},
                                                      {4, 4, 100, 90},
                                                      {3, 3, 16383, 1664},
                                                      {3, 3, 16383, 12000},
                                                      {2, 2, 70000, 4760},
                                                      {5, 4, 70001, 50000}}) {
    // Mostly negative logits: many neurons score exactly 0 and the choice among them is by index.
    Tensor logits = host_random({c.R, c.D}, -4, 1);
    Tensor live = host_i32({static_cast<int32_t>(c.live)});
    Tensor ref = Tensor::empty(DType::I32, {c.k});
    cpu_->route_neurons(logits, live, ref);
    Tensor got = cuda_->alloc(DType::I32, {c.k});
    cuda_->route_neurons(dev(logits), dev(live), got);
    Tensor g = back(got);
    // fp32 sums in a different order can differ in the last bit, which may swap near-equal neurons at the
    // boundary: require the sets to agree but for such swaps.
    std::vector<int32_t> a(ref.data<int32_t>(), ref.data<int32_t>() + c.k), b(g.data<int32_t>(), g.data<int32_t>() + c.k);
    ASSERT_TRUE(std::is_sorted(b.begin(), b.end())) << "D " << c.D;
    std::vector<int32_t> diff;
    std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(diff));
    EXPECT_LE(diff.size(), 2u) << "R " << c.R << " D " << c.D << " k " << c.k;
  }
  // Every score 0 (all logits negative): every key is tied, in one histogram bin of every digit, and ties
  // go to the lowest indices — with the keys in shared memory (D = 40000) and in global memory (70001).
  for (int64_t D : {40000, 70001}) {
    Tensor negative = host_random({3, D}, -4, -1);
    Tensor tied = cuda_->alloc(DType::I32, {12345});
    cuda_->route_neurons(dev(negative), dev(host_i32({3})), tied);
    Tensor t = back(tied);
    for (int32_t i = 0; i < 12345; ++i) ASSERT_EQ(t.data<int32_t>()[i], i) << "D " << D;
  }
}

// The oracle's ops: row norms within the dtype's tolerance; keep_heads zeroes exactly the rows the CPU does
// and leaves the others bit-identical.
// Adaptive selection (issue 19): route_heads with a cutoff keeps the same units, pads the same slots and
// tallies the same counts as the CPU, for absolute thresholds and statistical top-k over odd shapes, kmin
// and kmax anywhere in their range, ties, a NaN, and tallies restricted to live, sparse rows. The CPU reads
// the same rounded scores and both compute stat-topk's threshold with the same fp64 operations, so the
// selections must be equal.
TEST_P(CudaOps, RouteHeadsWithCutoffSelectLikeCpu) {
  struct Case {
    int64_t R, H, group, k, kmin;
    float value;
    bool row_stat;
    int32_t live;
  };
  for (const Case& c : std::vector<Case>{{1, 8, 1, 8, 1, 0.0f, false, 1},
                                         {5, 32, 1, 16, 3, 0.5f, false, 4},
                                         {33, 32, 4, 8, 1, -0.2f, false, 33},
                                         {130, 72, 1, 21, 2, 0.3f, true, 100},
                                         {17, 28, 7, 4, 4, 1.0f, true, 17},
                                         {3, 64, 8, 5, 1, -0.5f, true, 2},
                                         {2, 1024, 1, 300, 7, 1.5f, true, 2},
                                         {9, 12, 3, 4, 1, -INFINITY, false, 9}}) {
    SCOPED_TRACE(::testing::Message() << "R " << c.R << " H " << c.H << " group " << c.group << " k " << c.k << " kmin "
                                      << c.kmin << " value " << c.value << " stat " << c.row_stat);
    Tensor scores = host_random({c.R, c.H}, -3, 3);
    scores.data<float>()[0] = scores.data<float>()[c.H - 1];
    if (c.H > 2) scores.data<float>()[1] = std::numeric_limits<float>::quiet_NaN();
    std::vector<int32_t> flags(static_cast<size_t>(c.R));
    for (size_t r = 0; r < flags.size(); ++r) flags[r] = r % 4 == 2;
    Tensor live = host_i32({c.live}), dense = host_i32(flags), tally = host_i32({5, 7});
    HeadCutoff cpu_cut{.kmin = c.kmin, .value = c.value, .row_stat = c.row_stat, .tally = &tally, .live_rows = &live,
                       .dense_rows = &dense};
    Tensor ref = Tensor::empty(DType::I32, {c.R, c.k});
    cpu_->route_heads(scores, c.group, ref, &cpu_cut);
    Tensor d_live = dev(live), d_dense = dev(dense), d_tally = dev(host_i32({5, 7}));
    HeadCutoff gpu_cut{.kmin = c.kmin, .value = c.value, .row_stat = c.row_stat, .tally = &d_tally,
                       .live_rows = &d_live, .dense_rows = &d_dense};
    Tensor got = cuda_->alloc(DType::I32, {c.R, c.k});
    cuda_->route_heads(dev(scores), c.group, got, &gpu_cut);
    Tensor g = back(got);
    EXPECT_TRUE(std::equal(ref.data<int32_t>(), ref.data<int32_t>() + ref.numel(), g.data<int32_t>()));
    Tensor gt = back(d_tally);
    EXPECT_EQ(gt.data<int32_t>()[0], tally.data<int32_t>()[0]) << "units tallied";
    EXPECT_EQ(gt.data<int32_t>()[1], tally.data<int32_t>()[1]) << "rows tallied";
    // Without live rows or flags, every row counts.
    Tensor d_all = dev(host_i32({0, 0}));
    HeadCutoff all_rows{.kmin = c.kmin, .value = c.value, .row_stat = c.row_stat, .tally = &d_all};
    cuda_->route_heads(dev(scores), c.group, got, &all_rows);
    EXPECT_EQ(back(d_all).data<int32_t>()[1], c.R);
  }
}

TEST_P(CudaOps, L2NormsAndKeepHeadsMatchCpu) {
  for (auto [R, n] : {std::pair<int64_t, int64_t>{1, 8}, {27, 64}, {129, 128}, {17, 384}, {3, 1000}}) {
    Tensor x = host_random({R, n});
    Tensor ref = Tensor::empty(DType::F32, {R});
    cpu_->l2_norms(x, ref);
    Tensor got = poisoned({R});
    cuda_->l2_norms(dev(x), got);
    EXPECT_LT(rel_err(back(got), ref), tol()) << "R " << R << " n " << n;
  }
  struct Case {
    int64_t T, H, group, dh, k;
  };
  for (const Case& c : std::vector<Case>{{1, 8, 1, 64, 3}, {5, 9, 3, 64, 2}, {17, 32, 4, 128, 5}, {3, 12, 1, 80, 12}}) {
    Tensor x = host_random({c.T, c.H, c.dh});
    const int64_t U = c.H / c.group;
    Tensor heads = Tensor::empty(DType::I32, {c.T, c.k});
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < c.k; ++j) heads.data<int32_t>()[t * c.k + j] = static_cast<int32_t>((t + j * (U / c.k)) % U);
    for (int64_t t = 0; t < c.T; ++t) std::sort(heads.data<int32_t>() + t * c.k, heads.data<int32_t>() + (t + 1) * c.k);
    EXPECT_EQ(keep_heads_mismatches(x, heads, c.group), 0) << "T " << c.T << " H " << c.H << " group " << c.group;
  }
}

// keep_heads at MLP width, as a scored pass masks each token's neurons ([T, D, 1], group 1): up to every one
// of D = 16384 or 49152 units kept per token (k = 1..D), odd token counts, tokens flagged dense untouched,
// and unit counts that are not a multiple of the bitmap's 32-bit words; exactly the CPU's zeroing. A unit
// id outside [0, H / group) is reported at the next synchronisation and writes nothing outside its row.
TEST_P(CudaOps, KeepHeadsAtMlpWidthMatchesCpu) {
  struct Case {
    int64_t T, H, group, dh;
    std::vector<int64_t> ks;
  };
  for (const Case& c : std::vector<Case>{{7, 16384, 1, 1, {1, 3, 1000, 8191, 16383, 16384}},
                                         {3, 49152, 1, 1, {12345}},
                                         {5, 4100, 4, 3, {1, 517, 1025}},
                                         {1, 33, 1, 5, {32}}}) {
    const int64_t U = c.H / c.group;
    std::vector<int32_t> units(static_cast<size_t>(U));
    std::iota(units.begin(), units.end(), 0);
    for (int64_t k : c.ks) {
      SCOPED_TRACE(testing::Message() << "T " << c.T << " H " << c.H << " group " << c.group << " dh " << c.dh
                                      << " k " << k);
      Tensor x = host_random({c.T, c.H, c.dh});
      Tensor heads = Tensor::empty(DType::I32, {c.T, k});
      for (int64_t t = 0; t < c.T; ++t) {
        std::shuffle(units.begin(), units.end(), rng_);
        std::sort(units.begin(), units.begin() + k);
        std::copy(units.begin(), units.begin() + k, heads.data<int32_t>() + t * k);
      }
      EXPECT_EQ(keep_heads_mismatches(x, heads, c.group), 0);
    }
  }
  // Ids past the end and negative, on a view of the first two tokens of three: the error is raised at the
  // next synchronisation, the third token (past the view) is untouched, and the backend stays usable.
  Tensor x = host_random({3, 64, 1});
  Tensor buffer = dev(x), first_two = buffer.view(0, {2, 64, 1});
  Tensor bad = Tensor::empty(DType::I32, {2, 2});
  const std::vector<int32_t> ids = {3, 64, -1, 5};
  std::copy(ids.begin(), ids.end(), bad.data<int32_t>());
  cuda_->keep_heads(first_two, dev(bad), 1, nullptr);
  EXPECT_THROW(cuda_->synchronize(), Error);
  Tensor after = back(buffer);
  EXPECT_TRUE(std::equal(x.data<float>() + 128, x.data<float>() + 192, after.data<float>() + 128));
  Tensor good = Tensor::empty(DType::I32, {3, 1});
  good.data<int32_t>()[0] = 3, good.data<int32_t>()[1] = 0, good.data<int32_t>()[2] = 63;
  EXPECT_EQ(keep_heads_mismatches(x, good, 1), 0);
  // One set [1, k] for every token, as a decode batch's MLP neurons in a mixed step.
  Tensor wide = host_random({9, 4100, 1});
  Tensor shared = Tensor::empty(DType::I32, {1, 517});
  for (int32_t j = 0; j < 517; ++j) shared.data<int32_t>()[j] = j * 7 + 3;
  EXPECT_EQ(keep_heads_mismatches(wide, shared, 1), 0);
}

// The sparse MLP projections on each of the CUDA backend's paths: the gather kernel, the dense GEMM with
// its column gather / scatter, and the faster of the two as timed per shape (the default).
TEST_P(CudaOps, GatherGemmsMatchCpu) {
  for (SparseMlpPath path : {SparseMlpPath::fastest, SparseMlpPath::gather_kernel, SparseMlpPath::dense_gemm}) {
    SCOPED_TRACE(static_cast<int>(path));
    cuda_ = make_backend("cuda", dt(), path);
    check_gather_gemms();
  }
}

void CudaOps::check_gather_gemms() {
  struct Case {
    int64_t R, d, D, k;
    bool bias = false;
  };
  // Odd k (down's x rows unaligned) and d (36: element loads), batches of every tile height (16, 32, 64,
  // 128, 256 rows; 300 = two 256-row tiles), and shapes whose K is split (small batch, large k or d) in
  // both directions.
  for (const Case& c : std::vector<Case>{{1, 64, 256, 1},          {5, 96, 512, 100},     {33, 128, 1000, 999},
                                         {130, 256, 2048, 512},    {17, 72, 300, 300},    {3, 4096, 16384, 1664, true},
                                         {4, 36, 90, 37, true},    {64, 40, 200, 64},     {65, 512, 4000, 2001, true},
                                         {8, 1024, 16384, 8192}, {256, 264, 1040, 520, true}, {100, 512, 3000, 1500},
                                         {300, 136, 700, 333, true}}) {
    Tensor x = host_random({c.R, c.d}), w = host_random({c.D, c.d}, -0.1f, 0.1f), b = host_random({c.D}, -0.1f, 0.1f);
    Tensor wt = host_random({c.D, c.d}, -0.1f, 0.1f), b2 = host_random({c.d}, -0.1f, 0.1f);
    std::vector<int32_t> all(c.D);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng_);
    std::vector<int32_t> pick(all.begin(), all.begin() + c.k);
    std::sort(pick.begin(), pick.end());
    Tensor idx = host_i32(pick);
    for (bool sparse : {false, true}) {
      const int64_t k = sparse ? c.k : c.D;
      const Tensor* hi = sparse ? &idx : nullptr;
      Tensor gidx = dev(idx);
      const Tensor* gi = sparse ? &gidx : nullptr;
      Tensor up_ref = Tensor::empty(DType::F32, {c.R, k}), up = poisoned({c.R, k});
      cpu_->gather_up_relu(x, w, c.bias ? &b : nullptr, hi, up_ref);
      Tensor gb = dev(b);
      cuda_->gather_up_relu(dev(x), dev(w), c.bias ? &gb : nullptr, gi, up);
      EXPECT_LT(rel_err(back(up), up_ref), tol()) << "up R " << c.R << " D " << c.D << " k " << k;
      // Down from the CPU's (rounded) activations, accumulating onto a residual.
      Tensor a = cuda_->to_host_f32(dev(up_ref));
      Tensor res = host_random({c.R, c.d}), down_ref = res, down = dev(res);
      cpu_->gather_down(a, wt, hi, c.bias ? &b2 : nullptr, down_ref, true);
      Tensor gb2 = dev(b2);
      cuda_->gather_down(dev(a), dev(wt), gi, c.bias ? &gb2 : nullptr, down, true);
      EXPECT_LT(rel_err(back(down), down_ref), tol()) << "down R " << c.R << " D " << c.D << " k " << k;
    }
  }
  // A neuron index outside the weight is reported at the next synchronisation; the backend stays usable.
  Tensor x = host_random({2, 64}), w = host_random({32, 64}), y = poisoned({2, 2});
  Tensor past_end = dev(host_i32({3, 32})), negative = dev(host_i32({-1, 5}));
  cuda_->gather_up_relu(dev(x), dev(w), nullptr, &past_end, y);
  EXPECT_THROW(cuda_->synchronize(), Error);
  Tensor a = host_random({2, 2}), z = poisoned({2, 64});
  cuda_->gather_down(dev(a), dev(w), &negative, nullptr, z, false);
  EXPECT_THROW(cuda_->synchronize(), Error);
  Tensor ref = Tensor::empty(DType::F32, {2, 2}), idx = host_i32({3, 31}), gidx = dev(idx);
  cpu_->gather_up_relu(x, w, nullptr, &idx, ref);
  cuda_->gather_up_relu(dev(x), dev(w), nullptr, &gidx, y);
  EXPECT_LT(rel_err(back(y), ref), tol());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::F16, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace polar
