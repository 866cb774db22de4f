// The CUDA backend's GEMMs and sparse projections (cuda_backend_impl.h): cuBLASLt, the selective o_proj's
// GEMV and the gather GEMMs, and the choices between them, made by timing once per shape.
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <vector>

#include "ops/cuda/cuda_backend_impl.h"
#include "ops/cuda/gather_gemm.h"
#include "ops/cuda/selected_gemv.h"
#include "ops/cuda/variant_timing.h"

namespace polar {

using cuda::cuda_check;

void CudaBackend::linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, bool accumulate) {
  expect_act(w, "linear weight");
  gemm(x, w, /*w_kn=*/false, bias, /*relu=*/false, y, accumulate, "linear");
}

// At T <= kSelectedGemvMaxRows the selected_gemv kernel, which reads only the selected units' weight
// columns, or cuBLASLt's dense GEMM, whichever is faster for the shape (second_is_faster), timed with the
// selection of the step that first meets it: for a decode batch size, the engine's op-by-op run before
// its graph is recorded. Larger steps select nearly every unit anyway (the union of their tokens'
// selections) and go to cuBLASLt.
void CudaBackend::linear_selected_inputs(const Tensor& a, const Tensor& w, const Tensor* bias, const Tensor& units,
                                         int64_t width, const Tensor* dense_tokens, Tensor& y, bool accumulate) {
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

void CudaBackend::gather_up_relu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* idx, Tensor& y) {
  expect_act(w, "gather_up_relu weight");
  if (!idx) return gemm(x, w, false, bias, /*relu=*/true, y, false, "gather_up_relu");
  sparse_projection(x, w, *idx, bias, y, /*up=*/true, /*accumulate=*/false, "gather_up_relu");
}

void CudaBackend::gather_down(const Tensor& a, const Tensor& wt, const Tensor* idx, const Tensor* bias, Tensor& y,
                              bool accumulate) {
  expect_act(wt, "gather_down weight");
  if (!idx) return gemm(a, wt, /*w_kn=*/true, bias, false, y, accumulate, "gather_down");
  sparse_projection(a, wt, *idx, bias, y, /*up=*/false, accumulate, "gather_down");
}

// The sparse MLP projection over the neurons idx [k] of a neuron-major weight w [D, d]: up, y[R, k] =
// ReLU(x[R, d]·w[idx]ᵀ + bias[idx]); down, y[R, d] (+)= x[R, k]·w[idx] + bias. Two ways compute the same
// values: the gather kernel, which reads only the k selected rows, and cuBLASLt's dense GEMM over all D
// neurons with the selected columns gathered from (up) or scattered into (down) full [R, D] activations.
// The dense GEMM reads D / k times the bytes but streams them near copy bandwidth, while the gather
// kernel's rate falls as the batch grows (H200, d 4096, D 16384: dense is faster from k ≈ 0.7·D at batch
// <= 16 and from k ≈ 0.4·D at batch 256, at d 9216 and D 36864 only from k ≈ 0.6·D), so the faster one
// is measured once per shape (dense_is_faster) unless mlp_path_ fixes it.
void CudaBackend::sparse_projection(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor* bias, Tensor& y,
                                    bool up, bool accumulate, const char* what) {
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

// Whether the dense GEMM path beats the gather kernel for this shape (second_is_faster), unless mlp_path_
// fixes the path.
template <typename Kernel, typename Dense>
bool CudaBackend::dense_is_faster(const SparseMlpKey& key, const Tensor& y, const Kernel& kernel, const Dense& dense) {
  if (mlp_path_ != SparseMlpPath::fastest) return mlp_path_ == SparseMlpPath::dense_gemm;
  return second_is_faster(mlp_paths_, key, y, kernel, dense);
}

// Whether `second` beats `first`, two ways of computing the same output: each is timed (time_variants,
// weights from HBM) into a scratch output shaped like y the first time `key` is seen, the answer cached in
// `choices`. A key first met while a graph is being captured cannot be timed and takes `first` (the engine
// runs each decode batch size op by op before recording its graph, so its shapes are timed by then).
template <typename Key, typename First, typename Second>
bool CudaBackend::second_is_faster(std::map<Key, bool>& choices, const Key& key, const Tensor& y, const First& first,
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
void CudaBackend::gather_gemm(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor* bias, Tensor& y,
                              bool gather_n, bool accumulate) {
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

CudaBackend::GemmDims CudaBackend::gemm_dims(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias,
                                             const Tensor& y, const char* what) {
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
void CudaBackend::gemm(const Tensor& x, const Tensor& w, bool w_kn, const Tensor* bias, bool relu, Tensor& y,
                       bool accumulate, const char* what) {
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

}  // namespace polar
