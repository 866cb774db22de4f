// The CUDA backend object (make_cuda_backend in cuda_backend.h makes it), for the three files that define
// its members, one per family: cuda_backend.cpp (the device, memory, streams, graph capture, the bandwidth
// probes, and the ops that are one kernel each: norms, RoPE + KV append, routing, sampling, ...),
// cuda_backend_linear.cpp (GEMMs and the sparse projections, with the choices between their paths) and
// cuda_backend_attention.cpp (paged attention and its split-K plans). Internal: nothing outside
// src/ops/cuda/ includes it.
//
// fp16 or bf16 weights, activations and KV cache with fp32 accumulation. GEMMs go to cuBLASLt
// (cublaslt_gemm.h); everything else is polar's own kernels (the op families of kernels.h, attention.h,
// gather_gemm.h, selected_gemv.h: the selective o_proj at decode-sized m); memory comes from a caching
// allocator (device_allocator.h). All work is enqueued on one stream; host synchronisation happens only where
// the host needs data back (to_host_f32, synchronize).
#pragma once
#include <cuda_runtime.h>

#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ops/backend.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/cublaslt_gemm.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/device_allocator.h"
#include "ops/cuda/kernels.h"

namespace polar {

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType dtype, SparseMlpPath mlp_path);
  ~CudaBackend() override;

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return name_; }
  DType activation_dtype() const override { return dtype_; }
  cudaStream_t stream() const { return stream_; }
  int device_index() const { return device_; }
  void bind_thread() override { cuda::cuda_check(cudaSetDevice(device_), "cudaSetDevice"); }

  // Memory, graphs and side work (cuda_backend.cpp).
  Tensor alloc(DType dtype, Shape shape) override;
  void copy_to_device(const Tensor& host, Tensor& dst) override;
  bool supports_graphs() const override { return true; }
  void begin_capture() override;
  void begin_side_work() override;
  int end_side_work() override;
  void wait_side_work(int ticket) override;
  std::unique_ptr<Graph> end_capture() override;
  Tensor upload(const Tensor& host, DType dtype) override;
  Tensor to_host_f32(const Tensor& t) override;
  void synchronize() override;
  std::pair<int64_t, int64_t> memory_info() override;
  double measure_memory_gbps() override;
  double measure_read_gbps() override;

  // GEMMs and the sparse projections (cuda_backend_linear.cpp).
  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, bool accumulate) override;
  void linear_selected_inputs(const Tensor& a, const Tensor& w, const Tensor* bias, const Tensor& units,
                              int64_t width, const Tensor* dense_tokens, Tensor& y, bool accumulate) override;
  void gather_up_relu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* idx, Tensor& y) override;
  void gather_down(const Tensor& a, const Tensor& wt, const Tensor* idx, const Tensor* bias, Tensor& y,
                   bool accumulate) override;

  // Attention (cuda_backend_attention.cpp).
  void attention(const Tensor& q, const KVLayer& cache, const StepLayout& layout, float scale, int64_t window,
                 Tensor& out, const Tensor* kv_heads, const Tensor* dense_tokens) override;

  // One kernel each (cuda_backend.cpp).
  Tensor random_uniform(DType dtype, Shape shape, float lo, float hi, uint64_t seed) override;
  void embedding(const Tensor& table, const Tensor& ids, Tensor& out, int64_t id_offset) override;
  void route_heads(const Tensor& scores, int64_t group, Tensor& idx, const HeadCutoff* cutoff) override;
  void route_neurons(const Tensor& logits, const Tensor& live_rows, Tensor& idx) override;
  void add(const Tensor& a, const Tensor& b, Tensor& out) override;
  void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override { norm(x, w, nullptr, eps, out); }
  void add_rms_norm(Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& out) override;
  void rope_kv_append(const Tensor& qkv, KVLayer& cache, const StepLayout& layout, const Tensor& inv_freq,
                      Tensor& q) override;
  void localize_indices(const Tensor& idx, int64_t first, int64_t count, Tensor& out) override;
  void keep_heads(Tensor& x, const Tensor& heads, int64_t group, const Tensor* dense_tokens) override;
  void l2_norms(const Tensor& x, Tensor& out) override;
  void silu_mul(const Tensor& gate_up, Tensor& out) override;
  void argmax(const Tensor& logits, Tensor& out) override;
  void logprobs(const Tensor& logits, const Tensor& rows, const Tensor& targets, Tensor& target_lp, Tensor& top_ids,
                Tensor& top_lp) override;
  void sample(const Tensor& logits, const SamplingParams& p, const Tensor& uniforms, Tensor& out) override;

 protected:
  int64_t time_marker() override;
  double marker_ms(int64_t from, int64_t to) override;
  void reset_markers() override { next_event_ = 0; }
  void external_profiler_span(bool begin) override;

 private:
  cuda::Elem elem() const { return dtype_ == DType::BF16 ? cuda::Elem::BF16 : cuda::Elem::F16; }
  void expect_device(const Tensor& t, const char* what) const {
    check(t.defined() && t.device() == Device::CUDA, "cuda backend: {} is not a CUDA tensor", what);
  }
  void expect_act(const Tensor& t, const char* what) const {
    expect_device(t, what);
    check(t.dtype() == dtype_, "cuda backend: {} must be {}, got {}", what, dtype_name(dtype_), dtype_name(t.dtype()));
  }
  void expect_i32(const Tensor& t, const char* what) const {
    expect_device(t, what);
    check(t.dtype() == DType::I32, "cuda backend: {} must be i32, got {}", what, dtype_name(t.dtype()));
  }

  // cuda_backend.cpp
  cudaEvent_t side_event(int t);
  template <typename Work, typename Done> void timed_passes(int passes, Work work, Done done);
  void norm(const Tensor& x, const Tensor& w, const Tensor* b, float eps, Tensor& out, const Tensor* delta = nullptr);

  // cuda_backend_linear.cpp
  // The m, n, k of y[m, n] = x[m, k] · W (+ bias) for W = wᵀ (w [n, k]) or w (w [k, n], w_kn), the operands checked.
  struct GemmDims {
    int64_t m, n, k;
  };
  GemmDims gemm_dims(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias, const Tensor& y,
                     const char* what);
  void gemm(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias, bool relu, Tensor& y, bool accumulate,
            const char* what);
  void gather_gemm(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor* bias, Tensor& y, bool gather_n,
                   bool accumulate);
  void sparse_projection(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor* bias, Tensor& y, bool up,
                         bool accumulate, const char* what);
  // What the sparse MLP path choice depends on, and the choices made (true: the dense GEMM).
  struct SparseMlpKey {
    bool up;
    int64_t R, k, d, D;
    bool bias, accumulate;
    auto operator<=>(const SparseMlpKey&) const = default;
  };
  // What the choice of linear_selected_inputs' path depends on, and the choices made (true: selected_gemv).
  // with_dense: some token of the step is a prompt token and selects every unit (the engine passes
  // dense_tokens only then), so steps with prompt tokens are timed apart from pure decode steps.
  struct SelectedGemvKey {
    int64_t m, n, k, width;
    bool bias, accumulate, with_dense;
    auto operator<=>(const SelectedGemvKey&) const = default;
  };
  template <typename Kernel, typename Dense>
  bool dense_is_faster(const SparseMlpKey& key, const Tensor& y, const Kernel& kernel, const Dense& dense);
  template <typename Key, typename First, typename Second>
  bool second_is_faster(std::map<Key, bool>& choices, const Key& key, const Tensor& y, const First& first,
                        const Second& second);

  // cuda_backend_attention.cpp
  // What a decode step's split plan choice depends on.
  struct AttentionKey {
    int T, launched_kv_heads, H, Hkv, dh, block_size;
    unsigned ctx_bucket;  // max_ctx rounded up to a power of two
    int window;
    bool bf16;
    auto operator<=>(const AttentionKey&) const = default;
  };
  size_t attention_plan_choice(const cuda::PagedAttention& a, const std::vector<cuda::AttentionPlan>& plans);
  unsigned* attention_arrivals(size_t need);

  int device_;
  DType dtype_;
  std::string name_;
  int num_sms_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::GemmPlanner> gemms_;
  std::shared_ptr<cuda::DeviceAllocator> alloc_;
  Tensor workspace_, error_flag_;
  Tensor arrivals_;
  size_t arrivals_capacity_ = 0;
  std::vector<Tensor> retired_arrivals_;
  bool arrivals_grew_in_capture_ = false;
  std::vector<cudaEvent_t> events_;
  size_t next_event_ = 0;
  bool capturing_ = false;
  std::vector<std::shared_ptr<Storage>> captured_;
  cudaStream_t side_stream_ = nullptr;
  Tensor side_workspace_;
  std::vector<cudaEvent_t> side_events_;  // [0] forks, [t] joins side ticket t of the current capture
  int side_tickets_ = 0;
  bool on_side_ = false;
  SparseMlpPath mlp_path_;
  std::map<SparseMlpKey, bool> mlp_paths_;
  std::map<SelectedGemvKey, bool> selected_gemv_paths_;
  std::map<AttentionKey, size_t> attention_plans_;
};

}  // namespace polar
