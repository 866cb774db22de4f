// The CUDA backend (cuda_backend_impl.h): the device, memory, streams, graph capture, the bandwidth probes, and
// the ops that are one kernel each, after their argument checks.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#include "core/half.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_backend_impl.h"

namespace polar {

using cuda::cuda_check;
using cuda::DeviceAllocator;
using cuda::DeviceStorage;

namespace {

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

}  // namespace

CudaBackend::CudaBackend(int device, DType dtype, SparseMlpPath mlp_path)
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

CudaBackend::~CudaBackend() {
  cudaStreamSynchronize(stream_);
  gemms_.reset();
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  for (cudaEvent_t e : side_events_) cudaEventDestroy(e);
  cudaStreamDestroy(stream_);
  cudaStreamDestroy(side_stream_);
}

Tensor CudaBackend::alloc(DType dtype, Shape shape) {
  const size_t bytes = static_cast<size_t>(polar::numel(shape)) * dtype_size(dtype);
  auto storage = std::make_shared<DeviceStorage>(alloc_, bytes);
  if (capturing_) captured_.push_back(storage);  // the graph will own it
  return Tensor(storage, 0, dtype, std::move(shape));
}

void CudaBackend::copy_to_device(const Tensor& host, Tensor& dst) {
  expect_device(dst, "copy_to_device target");
  check(host.device() == Device::CPU && host.dtype() == dst.dtype() && host.numel() == dst.numel(),
        "copy_to_device: {} {} into {} {}", dtype_name(host.dtype()), shape_str(host.shape()), dtype_name(dst.dtype()),
        shape_str(dst.shape()));
  // Pageable source: the call returns once the bytes are staged, so `host` may be reused at once.
  cuda_check(cudaMemcpyAsync(dst.raw(), host.raw(), host.nbytes(), cudaMemcpyHostToDevice, stream_), "copy_to_device");
}

// Relaxed mode: allocations (cudaMalloc on an allocator miss) are legal while capturing.
void CudaBackend::begin_capture() {
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
void CudaBackend::begin_side_work() {
  if (!capturing_ || on_side_) return;
  cuda_check(cudaEventRecord(side_event(0), stream_), "side work fork");
  cuda_check(cudaStreamWaitEvent(side_stream_, side_event(0), 0), "side work fork");
  std::swap(stream_, side_stream_);
  std::swap(workspace_, side_workspace_);
  on_side_ = true;
}

int CudaBackend::end_side_work() {
  if (!on_side_) return 0;
  std::swap(stream_, side_stream_);
  std::swap(workspace_, side_workspace_);
  on_side_ = false;
  const int ticket = ++side_tickets_;
  cuda_check(cudaEventRecord(side_event(ticket), side_stream_), "side work join");
  return ticket;
}

void CudaBackend::wait_side_work(int ticket) {
  if (ticket <= 0 || !capturing_) return;
  cuda_check(cudaStreamWaitEvent(stream_, side_event(ticket), 0), "side work join");
}

// The event of side ticket t (0: the fork), created on first use; events are reused by later captures.
cudaEvent_t CudaBackend::side_event(int t) {
  while (static_cast<int>(side_events_.size()) <= t) {
    cudaEvent_t e = nullptr;
    cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    side_events_.push_back(e);
  }
  return side_events_[t];
}

std::unique_ptr<Graph> CudaBackend::end_capture() {
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

Tensor CudaBackend::upload(const Tensor& host, DType dtype) {
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

Tensor CudaBackend::to_host_f32(const Tensor& t) {
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

void CudaBackend::synchronize() {
  int32_t flag = 0;
  cuda_check(cudaMemcpyAsync(&flag, error_flag_.raw(), 4, cudaMemcpyDeviceToHost, stream_), "error flag");
  cuda_check(cudaStreamSynchronize(stream_), "synchronize");
  if (flag != 0) {
    cuda_check(cudaMemsetAsync(error_flag_.raw(), 0, 4, stream_), "error flag reset");
    if (flag & cuda::kErrorIdOutOfRange) fail("embedding: a token or row id was out of range of its table");
    if (flag & cuda::kErrorHeadOutOfRange) fail("keep_heads: a kept head id was out of range");
    if (flag & cuda::kErrorNeuronOutOfRange)
      fail("gather GEMM: a selected MLP neuron id was out of range of the weight");
    fail("kv_append: a cache slot was out of range (corrupt block table)");
  }
}

Tensor CudaBackend::random_uniform(DType dtype, Shape shape, float lo, float hi, uint64_t seed) {
  check(dtype == DType::F32 || dtype == dtype_, "cuda backend: random_uniform makes f32 or {} tensors, not {}",
        dtype_name(dtype_), dtype_name(dtype));
  Tensor t = alloc(dtype, std::move(shape));
  cuda::random_uniform(t.raw(), t.numel(), dtype == DType::F32, elem(), lo, hi, seed, stream_);
  return t;
}

void CudaBackend::embedding(const Tensor& table, const Tensor& ids, Tensor& out, int64_t id_offset) {
  expect_act(table, "embedding table");
  expect_act(out, "embedding output");
  expect_i32(ids, "embedding ids");
  const int64_t d = table.dim(1), n = ids.numel();
  check(out.numel() == n * d, "embedding: output shape {} for {} ids of width {}", shape_str(out.shape()), n, d);
  cuda::embedding(table.raw(), table.dim(0), d, ids.data<int32_t>(), n, id_offset, out.raw(),
                  error_flag_.data<int32_t>(), elem(), stream_);
}

void CudaBackend::route_heads(const Tensor& scores, int64_t group, Tensor& idx, const HeadCutoff* cutoff) {
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

void CudaBackend::route_neurons(const Tensor& logits, const Tensor& live_rows, Tensor& idx) {
  expect_act(logits, "route_neurons logits");
  expect_i32(live_rows, "route_neurons live rows");
  expect_i32(idx, "route_neurons output");
  const int64_t R = logits.dim(0), D = logits.dim(1), k = idx.numel();
  check(k >= 1 && k <= D, "route_neurons: {} of {} neurons", k, D);
  Tensor scratch = alloc(DType::I32, {cuda::route_neurons_scratch(D)});
  cuda::route_neurons(logits.raw(), R, D, live_rows.data<int32_t>(), k, scratch.data<int32_t>(), idx.data<int32_t>(),
                      elem(), stream_);
}

void CudaBackend::add(const Tensor& a, const Tensor& b, Tensor& out) {
  expect_act(a, "add input");
  expect_act(b, "add input");
  expect_act(out, "add output");
  check(a.numel() == b.numel() && a.numel() == out.numel(), "add: shapes {} and {} differ", shape_str(a.shape()),
        shape_str(b.shape()));
  cuda::add(a.raw(), b.raw(), out.raw(), a.numel(), elem(), stream_);
}

void CudaBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) {
  norm(x, w, &b, eps, out);
}

void CudaBackend::add_rms_norm(Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& out) {
  expect_act(delta, "add_rms_norm delta");
  check(delta.numel() == x.numel() && delta.raw() != x.raw() && delta.raw() != out.raw(),
        "add_rms_norm: delta {} must match x {} and be a buffer of its own", shape_str(delta.shape()),
        shape_str(x.shape()));
  norm(x, w, nullptr, eps, out, &delta);
}

void CudaBackend::rope_kv_append(const Tensor& qkv, KVLayer& cache, const StepLayout& layout, const Tensor& inv_freq,
                                 Tensor& q) {
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

void CudaBackend::localize_indices(const Tensor& idx, int64_t first, int64_t count, Tensor& out) {
  expect_i32(idx, "localize_indices idx");
  expect_i32(out, "localize_indices out");
  check(idx.ndim() == 2 && out.ndim() == 2 && out.dim(0) == idx.dim(0) && out.dim(1) >= std::min(idx.dim(1), count),
        "localize_indices: {} into {} for {} units", shape_str(idx.shape()), shape_str(out.shape()), count);
  cuda::localize_indices(idx.data<int32_t>(), idx.dim(0), idx.dim(1), first, count, out.data<int32_t>(), out.dim(1),
                         stream_);
}

void CudaBackend::keep_heads(Tensor& x, const Tensor& heads, int64_t group, const Tensor* dense_tokens) {
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
                   heads.dim(0) == 1 ? 0 : heads.dim(1), dense_tokens ? dense_tokens->data<int32_t>() : nullptr,
                   error_flag_.data<int32_t>(), elem(), stream_);
}

void CudaBackend::l2_norms(const Tensor& x, Tensor& out) {
  expect_act(x, "l2_norms input");
  expect_act(out, "l2_norms output");
  check(x.ndim() == 2 && out.numel() == x.dim(0), "l2_norms: input {} for {} rows", shape_str(x.shape()), out.numel());
  cuda::l2_norms(x.raw(), x.dim(0), x.dim(1), out.raw(), elem(), stream_);
}

void CudaBackend::silu_mul(const Tensor& gate_up, Tensor& out) {
  expect_act(gate_up, "silu_mul gate_up");
  expect_act(out, "silu_mul output");
  const int64_t T = out.dim(0), F = out.dim(1);
  check(gate_up.dim(0) == T && gate_up.dim(1) == 2 * F, "silu_mul: gate_up {} for output {}",
        shape_str(gate_up.shape()), shape_str(out.shape()));
  cuda::silu_mul(gate_up.raw(), out.raw(), T, F, elem(), stream_);
}

void CudaBackend::argmax(const Tensor& logits, Tensor& out) {
  expect_act(logits, "argmax input");
  expect_i32(out, "argmax output");
  check(logits.ndim() == 2 && out.numel() == logits.dim(0), "argmax: logits {} output {}", shape_str(logits.shape()),
        shape_str(out.shape()));
  cuda::argmax(logits.raw(), logits.dim(0), logits.dim(1), out.data<int32_t>(), elem(), stream_);
}

void CudaBackend::logprobs(const Tensor& logits, const Tensor& rows, const Tensor& targets, Tensor& target_lp,
                           Tensor& top_ids, Tensor& top_lp) {
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

void CudaBackend::sample(const Tensor& logits, const SamplingParams& p, const Tensor& uniforms, Tensor& out) {
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

// Runs `work` `passes` times on the stream, each between two events, and hands `done` the pass number
// and its milliseconds (the bandwidth probes).
template <typename Work, typename Done> void CudaBackend::timed_passes(int passes, Work work, Done done) {
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

std::pair<int64_t, int64_t> CudaBackend::memory_info() {
  size_t free_b = 0, total_b = 0;
  cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  // Blocks cached by the allocator are as good as free.
  return {static_cast<int64_t>(free_b + alloc_->cached_bytes()), static_cast<int64_t>(total_b)};
}

// A device-to-device copy of 1 GiB (a quarter of the free memory on smaller devices), timed by events,
// best of 5 after a warm-up; a copy reads and writes every byte once.
double CudaBackend::measure_memory_gbps() {
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
double CudaBackend::measure_read_gbps() {
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

int64_t CudaBackend::time_marker() {
  if (next_event_ == events_.size()) {
    cudaEvent_t e;
    cuda_check(cudaEventCreate(&e), "cudaEventCreate");
    events_.push_back(e);
  }
  cuda_check(cudaEventRecord(events_[next_event_], stream_), "cudaEventRecord");
  return static_cast<int64_t>(next_event_++);
}

double CudaBackend::marker_ms(int64_t from, int64_t to) {
  float ms = 0;
  cuda_check(cudaEventElapsedTime(&ms, events_.at(from), events_.at(to)), "cudaEventElapsedTime");
  return ms;
}

void CudaBackend::external_profiler_span(bool begin) {
  cuda_check(begin ? cudaProfilerStart() : cudaProfilerStop(), begin ? "cudaProfilerStart" : "cudaProfilerStop");
}

// delta: x += delta first (add_rms_norm), x written back.
void CudaBackend::norm(const Tensor& x, const Tensor& w, const Tensor* b, float eps, Tensor& out, const Tensor* delta) {
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
