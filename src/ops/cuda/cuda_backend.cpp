// The CUDA backend: fp16 or bf16 weights, activations and KV cache with fp32 accumulation. GEMMs go to
// cuBLASLt (cublaslt_gemm.h); everything else is polar's own kernels (the op families of kernels.h,
// attention.h, gather_gemm.h, selected_gemv.h: the selective o_proj at decode-sized m); memory comes from a
// caching allocator (device_allocator.h). All work is enqueued on one stream; host synchronisation happens
// only where the host needs data back (to_host_f32, synchronize).
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <compare>
#include <map>
#include <vector>

#include <fmt/format.h>

#include "core/half.h"
#include "ops/backend.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cublaslt_gemm.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/device_allocator.h"
#include "ops/cuda/gather_gemm.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/selected_gemv.h"
#include "ops/cuda/variant_timing.h"

namespace polar {

namespace {

using cuda::cuda_check;
using cuda::DeviceAllocator;
using cuda::DeviceStorage;

// A captured CUDA graph plus every device buffer allocated while it was captured.
class CudaGraph final : public Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream, std::vector<std::shared_ptr<Storage>> keep)
      : exec_(exec), stream_(stream), keep_(std::move(keep)) {}
  ~CudaGraph() override { cudaGraphExecDestroy(exec_); }
  void replay() override { cuda_check(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch"); }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  std::vector<std::shared_ptr<Storage>> keep_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType dtype, SparseMlpPath mlp_path)
      : device_(device), dtype_(dtype), mlp_path_(mlp_path) {
    check(dtype == DType::F16 || dtype == DType::BF16, "cuda backend: activations must be f16 or bf16, not {}",
          dtype_name(dtype));
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    name_ = fmt::format("cuda:{} ({})", device, prop.name);
    num_sms_ = prop.multiProcessorCount;
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    gemms_ = std::make_unique<cuda::GemmPlanner>(device, dtype);
    alloc_ = std::make_shared<DeviceAllocator>();
    workspace_ = alloc(DType::U8, {cuda::GemmPlanner::kWorkspaceBytes});
    side_workspace_ = alloc(DType::U8, {cuda::GemmPlanner::kWorkspaceBytes});
    error_flag_ = alloc(DType::I32, {1});
    cuda_check(cudaMemsetAsync(error_flag_.raw(), 0, 4, stream_), "cudaMemset");
    attention_arrivals(size_t(1) << 16);
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    gemms_.reset();
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    for (cudaEvent_t e : side_events_) cudaEventDestroy(e);
    cudaStreamDestroy(stream_);
    cudaStreamDestroy(side_stream_);
  }

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return name_; }
  DType activation_dtype() const override { return dtype_; }
  cudaStream_t stream() const { return stream_; }
  int device_index() const { return device_; }
  void bind_thread() override { cuda_check(cudaSetDevice(device_), "cudaSetDevice"); }

  Tensor alloc(DType dtype, Shape shape) override {
    const size_t bytes = static_cast<size_t>(polar::numel(shape)) * dtype_size(dtype);
    auto storage = std::make_shared<DeviceStorage>(alloc_, bytes);
    if (capturing_) captured_.push_back(storage);  // the graph will own it
    return Tensor(storage, 0, dtype, std::move(shape));
  }

  void copy_to_device(const Tensor& host, Tensor& dst) override {
    expect_device(dst, "copy_to_device target");
    check(host.device() == Device::CPU && host.dtype() == dst.dtype() && host.numel() == dst.numel(),
          "copy_to_device: {} {} into {} {}", dtype_name(host.dtype()), shape_str(host.shape()), dtype_name(dst.dtype()),
          shape_str(dst.shape()));
    // Pageable source: the call returns once the bytes are staged, so `host` may be reused at once.
    cuda_check(cudaMemcpyAsync(dst.raw(), host.raw(), host.nbytes(), cudaMemcpyHostToDevice, stream_), "copy_to_device");
  }

  bool supports_graphs() const override { return true; }

  // Relaxed mode: allocations (cudaMalloc on an allocator miss) are legal while capturing.
  void begin_capture() override {
    check(!capturing_, "cuda backend: a graph capture is already in progress");
    cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    capturing_ = true;
    side_tickets_ = 0;
  }

  // Side work (backend.h) forks to side_stream_ while a graph is captured: the graph then holds the side
  // ops as a branch that runs beside the main ones until the join. Outside capture it runs in order on the
  // main stream, because the caching allocator reuses freed buffers in stream order, which a second
  // stream would break (a capture keeps every buffer it allocates alive until the graph goes). The side
  // stream has its own cuBLASLt workspace; the other ops allocate theirs per call.
  void begin_side_work() override {
    if (!capturing_ || on_side_) return;
    cuda_check(cudaEventRecord(side_event(0), stream_), "side work fork");
    cuda_check(cudaStreamWaitEvent(side_stream_, side_event(0), 0), "side work fork");
    std::swap(stream_, side_stream_);
    std::swap(workspace_, side_workspace_);
    on_side_ = true;
  }

  int end_side_work() override {
    if (!on_side_) return 0;
    std::swap(stream_, side_stream_);
    std::swap(workspace_, side_workspace_);
    on_side_ = false;
    const int ticket = ++side_tickets_;
    cuda_check(cudaEventRecord(side_event(ticket), side_stream_), "side work join");
    return ticket;
  }

  void wait_side_work(int ticket) override {
    if (ticket <= 0 || !capturing_) return;
    cuda_check(cudaStreamWaitEvent(stream_, side_event(ticket), 0), "side work join");
  }

  // The event of side ticket t (0: the fork), created on first use; events are reused by later captures.
  cudaEvent_t side_event(int t) {
    while (static_cast<int>(side_events_.size()) <= t) {
      cudaEvent_t e = nullptr;
      cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
      side_events_.push_back(e);
    }
    return side_events_[t];
  }

  std::unique_ptr<Graph> end_capture() override {
    check(capturing_, "cuda backend: end_capture without begin_capture");
    // Side work not waited for (an error cut the step short) is joined, or the capture could not end. The
    // side stream runs its work in order, so its last ticket covers every earlier one.
    if (on_side_) end_side_work();
    wait_side_work(side_tickets_);
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    cuda_check(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    // Counters that grew during the capture were zeroed only inside the graph; zero them for eager use too.
    if (arrivals_grew_in_capture_) {
      cuda_check(cudaMemsetAsync(arrivals_.raw(), 0, arrivals_.nbytes(), stream_), "cudaMemset");
      arrivals_grew_in_capture_ = false;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    cuda_check(err, "cudaGraphInstantiate");
    return std::make_unique<CudaGraph>(exec, stream_, std::move(captured_));
  }

  Tensor upload(const Tensor& host, DType dtype) override {
    check(host.device() == Device::CPU, "cuda backend: upload takes a host tensor");
    Tensor staged = host;
    if (host.dtype() == DType::F32 && (dtype == DType::F16 || dtype == DType::BF16)) {
      staged = Tensor::empty(dtype, host.shape());
      const float* src = host.data<float>();
      uint16_t* dst = staged.data<uint16_t>();
      const int64_t n = host.numel();
      const bool bf16 = dtype == DType::BF16;
#pragma omp parallel for schedule(static) if (n > 65536)
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
    } else {
      check(host.dtype() == dtype, "cuda backend: upload cannot convert {} to {}", dtype_name(host.dtype()),
            dtype_name(dtype));
    }
    Tensor out = alloc(dtype, host.shape());
    cuda_check(cudaMemcpyAsync(out.raw(), staged.raw(), staged.nbytes(), cudaMemcpyHostToDevice, stream_), "upload");
    // `staged` may be a temporary: wait until the copy has read it.
    cuda_check(cudaStreamSynchronize(stream_), "upload");
    return out;
  }

  Tensor to_host_f32(const Tensor& t) override {
    expect_device(t, "to_host_f32 input");
    Tensor raw = Tensor::empty(t.dtype(), t.shape());
    cuda_check(cudaMemcpyAsync(raw.raw(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost, stream_), "to_host");
    synchronize();
    if (t.dtype() == DType::F32 || t.dtype() == DType::I32) return raw;
    check(t.dtype() == DType::F16 || t.dtype() == DType::BF16, "to_host_f32: cannot convert {}", dtype_name(t.dtype()));
    Tensor out = Tensor::empty(DType::F32, t.shape());
    const uint16_t* src = raw.data<uint16_t>();
    float* dst = out.data<float>();
    const bool bf16 = t.dtype() == DType::BF16;
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16 ? bf16_to_f32(src[i]) : f16_to_f32(src[i]);
    return out;
  }

  void synchronize() override {
    int32_t flag = 0;
    cuda_check(cudaMemcpyAsync(&flag, error_flag_.raw(), 4, cudaMemcpyDeviceToHost, stream_), "error flag");
    cuda_check(cudaStreamSynchronize(stream_), "synchronize");
    if (flag != 0) {
      cuda_check(cudaMemsetAsync(error_flag_.raw(), 0, 4, stream_), "error flag reset");
      if (flag & cuda::kErrorIdOutOfRange) fail("embedding: a token or row id was out of range of its table");
      if (flag & cuda::kErrorHeadOutOfRange) fail("keep_heads: a kept head id was out of range");
      if (flag & cuda::kErrorNeuronOutOfRange) fail("gather GEMM: a selected MLP neuron id was out of range of the weight");
      fail("kv_append: a cache slot was out of range (corrupt block table)");
    }
  }

  Tensor random_uniform(DType dtype, Shape shape, float lo, float hi, uint64_t seed) override {
    check(dtype == DType::F32 || dtype == dtype_, "cuda backend: random_uniform makes f32 or {} tensors, not {}",
          dtype_name(dtype_), dtype_name(dtype));
    Tensor t = alloc(dtype, std::move(shape));
    cuda::random_uniform(t.raw(), t.numel(), dtype == DType::F32, elem(), lo, hi, seed, stream_);
    return t;
  }

  void embedding(const Tensor& table, const Tensor& ids, Tensor& out, int64_t id_offset) override {
    expect_act(table, "embedding table");
    expect_act(out, "embedding output");
    expect_i32(ids, "embedding ids");
    const int64_t d = table.dim(1), n = ids.numel();
    check(out.numel() == n * d, "embedding: output shape {} for {} ids of width {}", shape_str(out.shape()), n, d);
    cuda::embedding(table.raw(), table.dim(0), d, ids.data<int32_t>(), n, id_offset, out.raw(),
                    error_flag_.data<int32_t>(), elem(), stream_);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, bool accumulate) override {
    expect_act(w, "linear weight");
    gemm(x, w, /*w_kn=*/false, bias, /*relu=*/false, y, accumulate, "linear");
  }

  // At T <= kSelectedGemvMaxRows the selected_gemv kernel, which reads only the selected units' weight
  // columns, or cuBLASLt's dense GEMM, whichever is faster for the shape (second_is_faster), timed with the
  // selection of the step that first meets it: for a decode batch size, the engine's op-by-op run before
  // its graph is recorded. Larger steps select nearly every unit anyway (the union of their tokens'
  // selections) and go to cuBLASLt.
  void linear_selected_inputs(const Tensor& a, const Tensor& w, const Tensor* bias, const Tensor& units,
                              int64_t width, const Tensor* dense_tokens, Tensor& y, bool accumulate) override {
    expect_act(w, "linear_selected_inputs weight");
    expect_i32(units, "linear_selected_inputs units");
    const GemmDims dims = gemm_dims(a, w, /*w_kn=*/false, bias, y, "linear_selected_inputs");
    check(width >= 1 && dims.k % width == 0 && dims.k / width <= cuda::kSelectedGemvMaxUnits && units.ndim() == 2 &&
              units.dim(0) == dims.m,
          "linear_selected_inputs: units {} of {} columns for a {} (at most {} units)", shape_str(units.shape()),
          width, shape_str(a.shape()), cuda::kSelectedGemvMaxUnits);
    if (dense_tokens) {
      expect_i32(*dense_tokens, "linear_selected_inputs dense tokens");
      check(dense_tokens->numel() == dims.m, "linear_selected_inputs: {} dense-token flags for {} tokens",
            dense_tokens->numel(), dims.m);
    }
    auto kernel = [&](Tensor& out) {
      cuda::SelectedGemv g;
      g.x = a.raw();
      g.ldx = dims.k;
      g.w = w.raw();
      g.bias = bias ? bias->raw() : nullptr;
      g.y = out.raw();
      g.ldy = dims.n;
      g.M = dims.m;
      g.N = dims.n;
      g.accumulate = accumulate;
      g.sel = units.data<int32_t>();
      g.sel_k = units.dim(1);
      g.dense_rows = dense_tokens ? dense_tokens->data<int32_t>() : nullptr;
      g.units = dims.k / width;
      g.width = width;
      cuda::selected_gemv(g, num_sms_, elem(), stream_);
    };
    auto dense = [&](Tensor& out) { linear(a, w, bias, out, accumulate); };
    if (dims.m >= 1 && dims.m <= cuda::kSelectedGemvMaxRows &&
        second_is_faster(selected_gemv_paths_,
                         {dims.m, dims.n, dims.k, width, bias != nullptr, accumulate, dense_tokens != nullptr}, y,
                         dense, kernel))
      return kernel(y);
    dense(y);
  }

  void gather_up_relu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* idx, Tensor& y) override {
    expect_act(w, "gather_up_relu weight");
    if (!idx) return gemm(x, w, false, bias, /*relu=*/true, y, false, "gather_up_relu");
    sparse_projection(x, w, *idx, bias, y, /*up=*/true, /*accumulate=*/false, "gather_up_relu");
  }

  void gather_down(const Tensor& a, const Tensor& wt, const Tensor* idx, const Tensor* bias, Tensor& y,
                   bool accumulate) override {
    expect_act(wt, "gather_down weight");
    if (!idx) return gemm(a, wt, /*w_kn=*/true, bias, false, y, accumulate, "gather_down");
    sparse_projection(a, wt, *idx, bias, y, /*up=*/false, accumulate, "gather_down");
  }

  void route_heads(const Tensor& scores, int64_t group, Tensor& idx, const HeadCutoff* cutoff) override {
    expect_act(scores, "route_heads scores");
    expect_i32(idx, "route_heads output");
    const int64_t R = scores.dim(0), H = scores.dim(1), k = idx.dim(1);
    check(group >= 1 && H % group == 0 && H / group <= 1024 && idx.dim(0) == R && k >= 1 && k <= H / group,
          "route_heads: {} scores per row in groups of {} cannot give idx {}", H, group, shape_str(idx.shape()));
    cuda::RowCutoff cut;
    if (cutoff) {
      check(cutoff->kmin >= 1 && cutoff->kmin <= k, "route_heads: kmin {} outside [1, {}] (the list's capacity)",
            cutoff->kmin, k);
      cut.mode = cutoff->row_stat ? cuda::RowCutoff::kRowStat : cuda::RowCutoff::kThreshold;
      cut.kmin = static_cast<int>(cutoff->kmin);
      cut.value = cutoff->value;
      if (cutoff->tally) {
        expect_i32(*cutoff->tally, "route_heads tally");
        check(cutoff->tally->numel() == 2, "route_heads: the tally must be I32 [2], not {}",
              shape_str(cutoff->tally->shape()));
        cut.tally = cutoff->tally->data<int32_t>();
      }
      if (cutoff->live_rows) {
        expect_i32(*cutoff->live_rows, "route_heads live rows");
        cut.live_rows = cutoff->live_rows->data<int32_t>();
      }
      if (cutoff->dense_rows) {
        expect_i32(*cutoff->dense_rows, "route_heads dense rows");
        check(cutoff->dense_rows->numel() == R, "route_heads: dense_rows {} for {} rows",
              shape_str(cutoff->dense_rows->shape()), R);
        cut.dense_rows = cutoff->dense_rows->data<int32_t>();
      }
    }
    cuda::route_heads(scores.raw(), R, H, group, k, cut, idx.data<int32_t>(), elem(), stream_);
  }

  void route_neurons(const Tensor& logits, const Tensor& live_rows, Tensor& idx) override {
    expect_act(logits, "route_neurons logits");
    expect_i32(live_rows, "route_neurons live rows");
    expect_i32(idx, "route_neurons output");
    const int64_t R = logits.dim(0), D = logits.dim(1), k = idx.numel();
    check(k >= 1 && k <= D, "route_neurons: {} of {} neurons", k, D);
    Tensor scratch = alloc(DType::I32, {cuda::route_neurons_scratch(D)});
    cuda::route_neurons(logits.raw(), R, D, live_rows.data<int32_t>(), k, scratch.data<int32_t>(), idx.data<int32_t>(),
                        elem(), stream_);
  }
  void add(const Tensor& a, const Tensor& b, Tensor& out) override {
    expect_act(a, "add input");
    expect_act(b, "add input");
    expect_act(out, "add output");
    check(a.numel() == b.numel() && a.numel() == out.numel(), "add: shapes {} and {} differ", shape_str(a.shape()),
          shape_str(b.shape()));
    cuda::add(a.raw(), b.raw(), out.raw(), a.numel(), elem(), stream_);
  }

  void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) override {
    norm(x, w, &b, eps, out);
  }
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override { norm(x, w, nullptr, eps, out); }
  void add_rms_norm(Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& out) override {
    expect_act(delta, "add_rms_norm delta");
    check(delta.numel() == x.numel() && delta.raw() != x.raw() && delta.raw() != out.raw(),
          "add_rms_norm: delta {} must match x {} and be a buffer of its own", shape_str(delta.shape()),
          shape_str(x.shape()));
    norm(x, w, nullptr, eps, out, &delta);
  }

  void rope_kv_append(const Tensor& qkv, KVLayer& cache, const StepLayout& layout, const Tensor& inv_freq,
                      Tensor& q) override {
    expect_act(qkv, "rope_kv_append qkv");
    expect_act(q, "rope_kv_append q");
    expect_act(cache.k, "K cache");
    expect_act(cache.v, "V cache");
    expect_i32(layout.slots, "kv_append slots");
    expect_i32(layout.positions, "rope positions");
    const int64_t T = qkv.dim(0), H = q.dim(1), dh = q.dim(2), Hkv = cache.k.dim(1), bs = cache.k.dim(2);
    check(qkv.dim(1) == H + 2 * Hkv && qkv.dim(2) == dh && q.dim(0) == T && cache.k.dim(3) == dh && dh % 2 == 0 &&
              cache.v.shape() == cache.k.shape() && layout.block_size == bs,
          "rope_kv_append: qkv {}, q {} and cache {} (block size {}) do not agree", shape_str(qkv.shape()),
          shape_str(q.shape()), shape_str(cache.k.shape()), layout.block_size);
    check(!inv_freq.defined() || (inv_freq.dtype() == DType::F32 && inv_freq.numel() * 2 == dh),
          "rope: {} f32 frequencies expected", dh / 2);
    check(layout.slots.numel() == T && layout.positions.numel() == T, "kv_append: {} slots for {} tokens",
          layout.slots.numel(), T);
    cuda::rope_kv_append(qkv.raw(), q.raw(), H, layout.positions.data<int32_t>(),
                         inv_freq.defined() ? inv_freq.data<float>() : nullptr, layout.slots.data<int32_t>(), T, Hkv,
                         dh, cache.k.raw(), cache.v.raw(), cache.k.dim(0) * bs, bs, error_flag_.data<int32_t>(),
                         elem(), stream_);
  }

  void attention(const Tensor& q, const KVLayer& cache, const StepLayout& layout, float scale, int64_t window,
                 Tensor& out, const Tensor* kv_heads, const Tensor* dense_tokens) override {
    expect_act(q, "attention q");
    expect_act(out, "attention output");
    expect_act(cache.k, "K cache");
    expect_act(cache.v, "V cache");
    cuda::PagedAttention a;
    a.T = static_cast<int>(q.dim(0));
    a.H = static_cast<int>(q.dim(1));
    a.dh = static_cast<int>(q.dim(2));
    a.Hkv = static_cast<int>(cache.k.dim(1));
    a.S = static_cast<int>(layout.block_tables.dim(0));
    check(cuda::attention_supports_head_dim(a.dh), "cuda attention: head_dim {} is not supported", a.dh);
    check(a.Hkv > 0 && a.H % a.Hkv == 0, "attention: {} query heads over {} KV heads", a.H, a.Hkv);
    check(cache.k.dim(3) == a.dh && cache.k.dim(2) == layout.block_size && out.numel() == q.numel(),
          "attention: q {} cache {} (block size {}) out {} do not agree", shape_str(q.shape()),
          shape_str(cache.k.shape()), layout.block_size, shape_str(out.shape()));
    check(layout.seq_starts.numel() == a.S + 1 && layout.max_chunk >= 1 && layout.max_ctx >= 1,
          "attention: step layout lacks seq_starts / max_chunk / max_ctx");
    // Selective decode steps launch only the selected KV heads; a prefill (or a step with dense tokens)
    // scored with per-token selections runs dense and zeroes the skipped heads, which is the same result
    // (the identity the tests pin), and scoring is not where the bandwidth matters.
    bool zero_after = false;
    if (kv_heads) {
      expect_i32(*kv_heads, "attention kv_heads");
      check(kv_heads->dim(0) == a.T && kv_heads->dim(1) >= 1 && kv_heads->dim(1) <= a.Hkv,
            "attention: kv_heads {} for {} tokens and {} KV heads", shape_str(kv_heads->shape()), a.T, a.Hkv);
      if (dense_tokens) {
        expect_i32(*dense_tokens, "attention dense_tokens");
        check(dense_tokens->numel() == a.T, "attention: dense_tokens {} for {} tokens", shape_str(dense_tokens->shape()),
              a.T);
      }
      zero_after = layout.max_chunk > 1 || dense_tokens;
      if (!zero_after) {
        a.kv_heads = kv_heads->data<int32_t>();
        a.kv_heads_per_token = static_cast<int>(kv_heads->dim(1));
      }
    }
    if (a.T == 0) return;
    a.q = q.raw();
    a.k_cache = cache.k.raw();
    a.v_cache = cache.v.raw();
    a.positions = layout.positions.data<int32_t>();
    a.token_seq = layout.token_seq.data<int32_t>();
    a.block_tables = layout.block_tables.data<int32_t>();
    a.seq_starts = layout.seq_starts.data<int32_t>();
    a.out = out.raw();
    a.block_size = static_cast<int>(layout.block_size);
    a.max_blocks = static_cast<int>(layout.block_tables.dim(1));
    a.max_ctx = static_cast<int>(layout.max_ctx);
    a.max_chunk = static_cast<int>(layout.max_chunk);
    a.window = static_cast<int>(window);
    a.scale = scale;
    a.bf16 = dtype_ == DType::BF16;
    const std::vector<cuda::AttentionPlan> plans = cuda::attention_plans(a, num_sms_);
    const cuda::AttentionPlan& plan = plans[attention_plan_choice(a, plans)];
    const size_t ws = cuda::attention_workspace_bytes(a, plan);
    Tensor workspace = alloc(DType::U8, {static_cast<int64_t>(std::max<size_t>(ws, 1))});
    const size_t arrivals = cuda::attention_arrival_counters(a, plan);
    cuda::paged_attention(a, plan, workspace.raw(), ws, attention_arrivals(arrivals), arrivals, stream_);
    if (zero_after) keep_heads(out, *kv_heads, a.H / a.Hkv, dense_tokens);
  }

  void localize_indices(const Tensor& idx, int64_t first, int64_t count, Tensor& out) override {
    expect_i32(idx, "localize_indices idx");
    expect_i32(out, "localize_indices out");
    check(idx.ndim() == 2 && out.ndim() == 2 && out.dim(0) == idx.dim(0) && out.dim(1) >= std::min(idx.dim(1), count),
          "localize_indices: {} into {} for {} units", shape_str(idx.shape()), shape_str(out.shape()), count);
    cuda::localize_indices(idx.data<int32_t>(), idx.dim(0), idx.dim(1), first, count, out.data<int32_t>(), out.dim(1),
                           stream_);
  }

  void keep_heads(Tensor& x, const Tensor& heads, int64_t group, const Tensor* dense_tokens) override {
    expect_act(x, "keep_heads input");
    expect_i32(heads, "keep_heads heads");
    check(x.ndim() == 3 && group >= 1 && x.dim(1) % group == 0 && heads.ndim() == 2 &&
              (heads.dim(0) == x.dim(0) || heads.dim(0) == 1) &&
              heads.dim(1) >= 1 && heads.dim(1) <= x.dim(1) / group,
          "keep_heads: heads {} for x {} in groups of {}", shape_str(heads.shape()), shape_str(x.shape()), group);
    if (dense_tokens) {
      expect_i32(*dense_tokens, "keep_heads dense_tokens");
      check(dense_tokens->numel() == x.dim(0), "keep_heads: dense_tokens {} for {} tokens",
            shape_str(dense_tokens->shape()), x.dim(0));
    }
    cuda::keep_heads(x.raw(), x.dim(0), x.dim(1), group, x.dim(2), heads.data<int32_t>(), heads.dim(1),
                     heads.dim(0) == 1 ? 0 : heads.dim(1), dense_tokens ? dense_tokens->data<int32_t>() : nullptr, error_flag_.data<int32_t>(), elem(),
                     stream_);
  }

  void l2_norms(const Tensor& x, Tensor& out) override {
    expect_act(x, "l2_norms input");
    expect_act(out, "l2_norms output");
    check(x.ndim() == 2 && out.numel() == x.dim(0), "l2_norms: input {} for {} rows", shape_str(x.shape()), out.numel());
    cuda::l2_norms(x.raw(), x.dim(0), x.dim(1), out.raw(), elem(), stream_);
  }

  void silu_mul(const Tensor& gate_up, Tensor& out) override {
    expect_act(gate_up, "silu_mul gate_up");
    expect_act(out, "silu_mul output");
    const int64_t T = out.dim(0), F = out.dim(1);
    check(gate_up.dim(0) == T && gate_up.dim(1) == 2 * F, "silu_mul: gate_up {} for output {}",
          shape_str(gate_up.shape()), shape_str(out.shape()));
    cuda::silu_mul(gate_up.raw(), out.raw(), T, F, elem(), stream_);
  }

  void argmax(const Tensor& logits, Tensor& out) override {
    expect_act(logits, "argmax input");
    expect_i32(out, "argmax output");
    check(logits.ndim() == 2 && out.numel() == logits.dim(0), "argmax: logits {} output {}", shape_str(logits.shape()),
          shape_str(out.shape()));
    cuda::argmax(logits.raw(), logits.dim(0), logits.dim(1), out.data<int32_t>(), elem(), stream_);
  }

  void logprobs(const Tensor& logits, const Tensor& rows, const Tensor& targets, Tensor& target_lp, Tensor& top_ids,
                Tensor& top_lp) override {
    expect_act(logits, "logprobs logits");
    expect_i32(rows, "logprobs rows");
    expect_i32(targets, "logprobs targets");
    expect_i32(top_ids, "logprobs top_ids");
    expect_device(target_lp, "logprobs target_lp");
    expect_device(top_lp, "logprobs top_lp");
    const int64_t M = rows.numel(), n = top_ids.ndim() == 2 ? top_ids.dim(1) : 0;
    check(logits.ndim() == 2 && targets.numel() == M && target_lp.dtype() == DType::F32 && target_lp.numel() == M &&
              top_ids.dim(0) == M && n >= 1 && n <= logits.dim(1) && top_lp.dtype() == DType::F32 &&
              top_lp.numel() == M * n,
          "logprobs: logits {}, {} rows, {} targets, outputs {} {} {}", shape_str(logits.shape()), M, targets.numel(),
          shape_str(target_lp.shape()), shape_str(top_ids.shape()), shape_str(top_lp.shape()));
    cuda::logprobs(logits.raw(), logits.dim(1), rows.data<int32_t>(), targets.data<int32_t>(), M, n,
                   target_lp.data<float>(), top_ids.data<int32_t>(), top_lp.data<float>(), elem(), stream_);
  }

  void sample(const Tensor& logits, const SamplingParams& p, const Tensor& uniforms, Tensor& out) override {
    validate(p);
    expect_act(logits, "sample logits");
    expect_i32(out, "sample output");
    expect_device(uniforms, "sample uniforms");
    check(logits.ndim() == 2 && uniforms.dtype() == DType::F32 && uniforms.numel() == logits.dim(0) &&
              out.numel() == logits.dim(0),
          "sample: logits {} uniforms {} output {}", shape_str(logits.shape()), shape_str(uniforms.shape()),
          shape_str(out.shape()));
    if (p.temperature == 0.0f) return argmax(logits, out);
    cuda::sample(logits.raw(), logits.dim(0), logits.dim(1), p.temperature, p.top_k, p.top_p, uniforms.data<float>(),
                 out.data<int32_t>(), elem(), stream_);
  }

  std::pair<int64_t, int64_t> memory_info() override {
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    // Blocks cached by the allocator are as good as free.
    return {static_cast<int64_t>(free_b + alloc_->cached_bytes()), static_cast<int64_t>(total_b)};
  }

  // A device-to-device copy of 1 GiB (a quarter of the free memory on smaller devices), timed by events,
  // best of 5 after a warm-up; a copy reads and writes every byte once.
  double measure_memory_gbps() override {
    const int64_t bytes = std::min<int64_t>(int64_t(1) << 30, memory_info().first / 4);
    // Random contents: never time on uninitialised or zero memory.
    Tensor src = random_uniform(DType::F32, {bytes / 4}, -1, 1, 7), dst = alloc(DType::F32, {bytes / 4});
    double best = 0;
    timed_passes(6, [&] {
      cuda_check(cudaMemcpyAsync(dst.raw(), src.raw(), bytes, cudaMemcpyDeviceToDevice, stream_), "bandwidth copy");
    }, [&](int rep, float ms) {
      if (rep > 0) best = std::max(best, 2.0 * bytes / (ms * 1e-3) / 1e9);
    });
    src = dst = Tensor();
    alloc_->release_cached();  // 2 GiB the allocator would otherwise keep
    return best;
  }

  // read_probe (bandwidth.cu) over 2 GiB (a quarter of the free memory on smaller devices), 40x the L2 of
  // an H100/H200, timed by events, best of 5 after a warm-up.
  double measure_read_gbps() override {
    const int64_t bytes = std::min<int64_t>(int64_t(2) << 30, memory_info().first / 4) / 16 * 16;
    Tensor data = random_uniform(DType::F32, {bytes / 4}, -1, 1, 11);
    Tensor word = alloc(DType::I32, {1});
    const int blocks = cuda::read_probe_blocks(device_);
    double best = 0;
    timed_passes(6, [&] {
      cuda_check(cudaMemsetAsync(word.raw(), 0, 4, stream_), "cudaMemset");
      cuda::read_probe(data.raw(), bytes, static_cast<uint32_t*>(word.raw()), blocks, stream_);
    }, [&](int rep, float ms) {
      if (rep > 0) best = std::max(best, bytes / (ms * 1e-3) / 1e9);
    });
    data = word = Tensor();
    alloc_->release_cached();
    return best;
  }

 protected:
  int64_t time_marker() override {
    if (next_event_ == events_.size()) {
      cudaEvent_t e;
      cuda_check(cudaEventCreate(&e), "cudaEventCreate");
      events_.push_back(e);
    }
    cuda_check(cudaEventRecord(events_[next_event_], stream_), "cudaEventRecord");
    return static_cast<int64_t>(next_event_++);
  }
  double marker_ms(int64_t from, int64_t to) override {
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, events_.at(from), events_.at(to)), "cudaEventElapsedTime");
    return ms;
  }
  void reset_markers() override { next_event_ = 0; }
  void external_profiler_span(bool begin) override {
    cuda_check(begin ? cudaProfilerStart() : cudaProfilerStop(), begin ? "cudaProfilerStart" : "cudaProfilerStop");
  }

 private:
  // Runs `work` `passes` times on the stream, each between two events, and hands `done` the pass number
  // and its milliseconds (the bandwidth probes).
  template <typename Work, typename Done> void timed_passes(int passes, Work work, Done done) {
    cudaEvent_t start = nullptr, stop = nullptr;
    cuda_check(cudaEventCreate(&start), "cudaEventCreate");
    cuda_check(cudaEventCreate(&stop), "cudaEventCreate");
    for (int rep = 0; rep < passes; ++rep) {
      cuda_check(cudaEventRecord(start, stream_), "cudaEventRecord");
      work();
      cuda_check(cudaEventRecord(stop, stream_), "cudaEventRecord");
      cuda_check(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float ms = 0;
      cuda_check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      done(rep, ms);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }

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

  // delta: x += delta first (add_rms_norm), x written back.
  void norm(const Tensor& x, const Tensor& w, const Tensor* b, float eps, Tensor& out, const Tensor* delta = nullptr) {
    expect_act(x, "norm input");
    expect_act(w, "norm weight");
    expect_act(out, "norm output");
    if (b) expect_act(*b, "norm bias");
    const int64_t d = x.dim(-1);
    check(w.numel() == d && out.numel() == x.numel() && (!b || b->numel() == d), "norm: x {} weight {} do not agree",
          shape_str(x.shape()), shape_str(w.shape()));
    cuda::norm(x.raw(), delta ? delta->raw() : nullptr, w.raw(), b ? b->raw() : nullptr, eps, b == nullptr,
               x.numel() / std::max<int64_t>(d, 1), d, out.raw(), elem(), stream_);
  }

  // The sparse MLP projection over the neurons idx [k] of a neuron-major weight w [D, d]: up, y[R, k] =
  // ReLU(x[R, d]·w[idx]ᵀ + bias[idx]); down, y[R, d] (+)= x[R, k]·w[idx] + bias. Two ways compute the same
  // values: the gather kernel, which reads only the k selected rows, and cuBLASLt's dense GEMM over all D
  // neurons with the selected columns gathered from (up) or scattered into (down) full [R, D] activations.
  // The dense GEMM reads D / k times the bytes but streams them near copy bandwidth, while the gather
  // kernel's rate falls as the batch grows (H200, d 4096, D 16384: dense is faster from k ≈ 0.7·D at batch
  // <= 16 and from k ≈ 0.4·D at batch 256, at d 9216 and D 36864 only from k ≈ 0.6·D), so the faster one
  // is measured once per shape (dense_is_faster) unless mlp_path_ fixes it.
  void sparse_projection(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor* bias, Tensor& y, bool up,
                         bool accumulate, const char* what) {
    expect_act(x, what);
    expect_act(y, what);
    expect_i32(idx, what);
    check(w.ndim() == 2, "{}: weight {} is not a matrix", what, shape_str(w.shape()));
    const int64_t D = w.dim(0), d = w.dim(1), k = idx.numel(), R = x.numel() / std::max<int64_t>(up ? d : k, 1);
    check(x.numel() == R * (up ? d : k) && y.numel() == R * (up ? k : d), "{}: x {} w {} idx {} y {} do not agree",
          what, shape_str(x.shape()), shape_str(w.shape()), shape_str(idx.shape()), shape_str(y.shape()));
    if (bias) {
      expect_act(*bias, what);
      check(bias->numel() == (up ? D : d), "{}: bias {} for weight {}", what, shape_str(bias->shape()),
            shape_str(w.shape()));
    }
    if (R == 0) return;
    auto kernel = [&](Tensor& out) { gather_gemm(x, w, idx, bias, out, up, accumulate); };
    auto dense = [&](Tensor& out) {
      Tensor full = alloc(dtype_, {R, D});
      const int32_t* ids = idx.data<int32_t>();
      int32_t* flag = error_flag_.data<int32_t>();
      if (up) {
        gemm(x, w, false, bias, /*relu=*/true, full, false, what);
        cuda::move_columns(full.raw(), out.raw(), R, D, ids, k, /*gather=*/true, flag, elem(), stream_);
      } else {
        cuda_check(cudaMemsetAsync(full.raw(), 0, full.nbytes(), stream_), "zeroing the sparse MLP activations");
        cuda::move_columns(x.raw(), full.raw(), R, D, ids, k, /*gather=*/false, flag, elem(), stream_);
        gemm(full, w, /*w_kn=*/true, bias, false, out, accumulate, what);
      }
    };
    const SparseMlpKey key{up, R, k, d, D, bias != nullptr, accumulate};
    if (dense_is_faster(key, y, kernel, dense))
      dense(y);
    else
      kernel(y);
  }

  // What the sparse MLP path choice depends on, and the choices made (true: the dense GEMM).
  struct SparseMlpKey {
    bool up;
    int64_t R, k, d, D;
    bool bias, accumulate;
    auto operator<=>(const SparseMlpKey&) const = default;
  };

  // Whether the dense GEMM path beats the gather kernel for this shape (second_is_faster), unless mlp_path_
  // fixes the path.
  template <typename Kernel, typename Dense>
  bool dense_is_faster(const SparseMlpKey& key, const Tensor& y, const Kernel& kernel, const Dense& dense) {
    if (mlp_path_ != SparseMlpPath::fastest) return mlp_path_ == SparseMlpPath::dense_gemm;
    return second_is_faster(mlp_paths_, key, y, kernel, dense);
  }

  struct AttentionKey {
    int T, launched_kv_heads, H, Hkv, dh, block_size;
    unsigned ctx_bucket;  // max_ctx rounded up to a power of two
    int window;
    bool bf16;
    auto operator<=>(const AttentionKey&) const = default;
  };

  // Which of `plans` (cuda::attention_plans: the split-K plans of a decode step) the step runs. The first
  // time its sizes are met, every distinct plan is timed on the step's own inputs (time_variants: KV from
  // HBM; each run rewrites the output the chosen plan then writes again), and the fastest is remembered by
  // its index for these sizes with max_ctx rounded up to a power of two, so that eager steps and the graphs
  // of a context bucket share it. Met first while a graph is being captured: the cost model's plan ([0]).
  size_t attention_plan_choice(const cuda::PagedAttention& a, const std::vector<cuda::AttentionPlan>& plans) {
    if (std::all_of(plans.begin(), plans.end(), [&](const cuda::AttentionPlan& p) { return p == plans[0]; }))
      return 0;  // nothing to choose (large batches: every plan is one split)
    const AttentionKey key{a.T,         a.kv_heads ? a.kv_heads_per_token : a.Hkv,
                           a.H,         a.Hkv,
                           a.dh,        a.block_size,
                           std::bit_ceil(static_cast<unsigned>(a.max_ctx)), a.window,
                           a.bf16};
    if (auto it = attention_plans_.find(key); it != attention_plans_.end()) return it->second;
    if (capturing_) return 0;
    size_t ws = 0, counters = 0;
    for (const cuda::AttentionPlan& p : plans) {
      ws = std::max(ws, cuda::attention_workspace_bytes(a, p));
      counters = std::max(counters, cuda::attention_arrival_counters(a, p));
    }
    Tensor workspace = alloc(DType::U8, {static_cast<int64_t>(std::max<size_t>(ws, 1))});
    unsigned* arrivals = attention_arrivals(counters);
    const std::vector<float> ms = cuda::time_variants(device_, stream_, plans.size(), [&](size_t i) {
      if (std::find(plans.begin(), plans.begin() + i, plans[i]) != plans.begin() + i) return false;  // timed already
      cuda::paged_attention(a, plans[i], workspace.raw(), ws, arrivals, counters, stream_);
      return true;
    });
    size_t best = 0;
    for (size_t i = 1; i < ms.size(); ++i)
      if (ms[i] < ms[best]) best = i;
    attention_plans_.emplace(key, best);
    return best;
  }

  // Whether `second` beats `first`, two ways of computing the same output: each is timed (time_variants,
  // weights from HBM) into a scratch output shaped like y the first time `key` is seen, the answer cached in
  // `choices`. A key first met while a graph is being captured cannot be timed and takes `first` (the engine
  // runs each decode batch size op by op before recording its graph, so its shapes are timed by then).
  template <typename Key, typename First, typename Second>
  bool second_is_faster(std::map<Key, bool>& choices, const Key& key, const Tensor& y, const First& first,
                        const Second& second) {
    if (auto it = choices.find(key); it != choices.end()) return it->second;
    if (capturing_) return false;
    Tensor scratch = alloc(dtype_, y.shape());
    const std::vector<float> ms = cuda::time_variants(device_, stream_, 2, [&](size_t i) {
      i == 0 ? first(scratch) : second(scratch);
      return true;
    });
    const bool faster = ms.size() == 2 && ms[1] < ms[0];
    choices.emplace(key, faster);
    return faster;
  }

  // sparse_projection's gather kernel (gather_gemm.cu) on operands it checked.
  void gather_gemm(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor* bias, Tensor& y, bool gather_n,
                   bool accumulate) {
    const int64_t D = w.dim(0), d = w.dim(1), k = idx.numel(), R = x.numel() / std::max<int64_t>(gather_n ? d : k, 1);
    cuda::GatherGemm g;
    g.x = x.raw();
    g.ldx = gather_n ? d : k;
    g.w = w.raw();
    g.ldw = d;
    g.idx = idx.data<int32_t>();
    g.D = D;
    g.error_flag = error_flag_.data<int32_t>();
    g.bias = bias ? bias->raw() : nullptr;
    g.y = y.raw();
    g.ldy = gather_n ? k : d;
    g.M = R;
    g.N = gather_n ? k : d;
    g.K = gather_n ? d : k;
    g.gather_n = gather_n;
    g.relu = gather_n;
    g.accumulate = accumulate;
    const size_t ws = cuda::gather_gemm_workspace_bytes(g, num_sms_, elem());
    Tensor workspace = alloc(DType::U8, {static_cast<int64_t>(std::max<size_t>(ws, 1))});
    cuda::gather_gemm(g, workspace.raw(), ws, num_sms_, elem(), stream_);
  }

  // The m, n, k of y[m, n] = x[m, k] · W (+ bias) for W = wᵀ (w [n, k]) or w (w [k, n], w_kn), the operands checked.
  struct GemmDims {
    int64_t m, n, k;
  };
  GemmDims gemm_dims(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias, const Tensor& y,
                     const char* what) {
    expect_act(x, what);
    expect_act(y, what);
    check(w.ndim() == 2, "{}: weight {} is not a matrix", what, shape_str(w.shape()));
    const int64_t k = w_kn ? w.dim(0) : w.dim(1), n = w_kn ? w.dim(1) : w.dim(0);
    const int64_t m = x.numel() / std::max<int64_t>(k, 1);
    check(x.numel() == m * k && y.numel() == m * n, "{}: x {} w {} y {} do not agree", what, shape_str(x.shape()),
          shape_str(w.shape()), shape_str(y.shape()));
    if (bias) {
      expect_act(*bias, what);
      check(bias->numel() == n, "{}: bias of {} for {} outputs", what, bias->numel(), n);
    }
    return {m, n, k};
  }

  // cuda::Gemm's y = x · W (+ bias) (ReLU) (+ y), W = wᵀ for w [n, k] or w for w [k, n] (w_kn).
  void gemm(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias, bool relu, Tensor& y, bool accumulate,
            const char* what) {
    const auto [m, n, k] = gemm_dims(x, w, w_kn, bias, y, what);
    if (m == 0) return;
    cuda::Gemm g;
    g.x = x.raw();
    g.w = w.raw();
    g.bias = bias ? bias->raw() : nullptr;
    g.y = y.raw();
    g.m = m;
    g.n = n;
    g.k = k;
    g.w_kn = w_kn;
    g.relu = relu;
    g.accumulate = accumulate;
    gemms_->run(g, stream_, workspace_.raw(), capturing_);
  }

  // What the choice of linear_selected_inputs' path depends on, and the choices made (true: selected_gemv).
  // with_dense: some token of the step is a prompt token and selects every unit (the engine passes
  // dense_tokens only then), so steps with prompt tokens are timed apart from pure decode steps.
  struct SelectedGemvKey {
    int64_t m, n, k, width;
    bool bias, accumulate, with_dense;
    auto operator<=>(const SelectedGemvKey&) const = default;
  };

  // The decode attention's split-K arrival counters (attention.h), at least `need` of them: zero between
  // launches, so one buffer serves every launch on stream_. A buffer outgrown is kept, not freed: graphs
  // captured with it still use it.
  unsigned* attention_arrivals(size_t need) {
    if (need > arrivals_capacity_) {
      if (arrivals_capacity_ > 0) retired_arrivals_.push_back(arrivals_);
      arrivals_capacity_ = std::max(need, 2 * arrivals_capacity_);
      arrivals_ = alloc(DType::I32, {static_cast<int64_t>(arrivals_capacity_)});
      cuda_check(cudaMemsetAsync(arrivals_.raw(), 0, arrivals_.nbytes(), stream_), "cudaMemset");
      arrivals_grew_in_capture_ = capturing_;
    }
    return static_cast<unsigned*>(arrivals_.raw());
  }

  int device_;
  DType dtype_;
  std::string name_;
  int num_sms_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::GemmPlanner> gemms_;
  std::shared_ptr<DeviceAllocator> alloc_;
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

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, DType dtype, SparseMlpPath mlp_path) {
  return std::make_unique<CudaBackend>(device, dtype, mlp_path);
}

int cuda_device(const Backend& backend) { return dynamic_cast<const CudaBackend&>(backend).device_index(); }
void* cuda_stream(const Backend& backend) { return dynamic_cast<const CudaBackend&>(backend).stream(); }

#ifndef POLAR_HAVE_NCCL
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<Backend*>&) {
  fail("tensor parallelism on CUDA needs NCCL, and this build of polar has none (nccl.h was not found when it was "
       "configured)");
}
#endif

}  // namespace polar
