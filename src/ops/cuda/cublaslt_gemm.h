// GEMMs of the CUDA backend (cuda_backend.cpp: linear, the unselected MLP projections, the dense path of the
// sparse MLP): one plan per shape, whose kernel is the fastest of cuBLASLt's candidates and their split-K
// variants, timed on the device when the shape is first met.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <compare>
#include <cstdint>
#include <map>
#include <vector>

#include "core/tensor.h"

namespace polar::cuda {

// y[m, n] = x[m, k] · W (+ bias[n]) (ReLU) (+ y), W = wᵀ for w [n, k] (w_kn false: a Linear's weight) or
// W = w for w [k, n] (w_kn true: neuron-major down-projection rows). Row-major y is column-major
// yᵀ [n, m] = W' · xᵀ, so cuBLASLt computes D = op(A)·B with A = w (column-major [k, n] transposed, or
// [n, k] as is) and B = x (column-major [k, m]).
// All operands in the planner's dtype (f16 or bf16), fp32 accumulation.
struct Gemm {
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;  // [n] or null
  void* y = nullptr;
  int64_t m = 0, n = 0, k = 0;
  bool w_kn = false, relu = false, accumulate = false;
};

class GemmPlanner {
 public:
  static constexpr int64_t kWorkspaceBytes = 32 << 20;  // cuBLASLt's scratch, one per stream that runs GEMMs
  GemmPlanner(int device, DType dtype);
  ~GemmPlanner();
  GemmPlanner(const GemmPlanner&) = delete;
  GemmPlanner& operator=(const GemmPlanner&) = delete;

  // Enqueues g on `stream` with `workspace` (kWorkspaceBytes). A shape met for the first time is planned
  // first: outside graph capture by timing the candidates on `stream` (which waits for them), during a
  // capture (nothing can be timed) with cuBLASLt's first pick.
  void run(const Gemm& g, cudaStream_t stream, void* workspace, bool capturing);

 private:
  // A cuBLASLt plan for one GEMM shape: descriptors plus the fastest of the heuristic's candidate algorithms
  // (fastest), cached so the per-call host cost is a descriptor attribute update and the launch.
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };

  // What a GEMM plan depends on: shape, epilogue, weight layout, beta, and the operands' alignments.
  struct Key {
    int64_t m, n, k;
    bool bias, relu, w_kn, accumulate;
    int align_x, align_w, align_y;
    auto operator<=>(const Key&) const = default;
  };

  static constexpr int kGemmCandidates = 16;  // cuBLASLt heuristic results timed per GEMM plan
  static constexpr size_t kSplitKBases = 4;   // heuristic picks that also get split-K variants
  // GEMMs of up to this many rows are tuned per multiple of 8 rows (every decode graph's batch is one, so
  // graphs get their exact m; at most 8 rows, per m), larger ones per power of two (row_bucket_key).
  static constexpr int64_t kFineBucketRows = 256;

  // Where a call runs: its stream and cuBLASLt workspace, and whether a graph is being captured there.
  struct Launch {
    cudaStream_t stream;
    void* workspace;
    bool capturing;
  };

  Plan& plan(const Key& key, const Gemm& g, const Launch& at);
  static Key row_bucket_key(Key key);
  void add_split_k_variants(const Plan& p, std::vector<cublasLtMatmulHeuristicResult_t>& results);
  void pick_fastest(Plan& p, const std::vector<cublasLtMatmulHeuristicResult_t>& results, const Gemm& g,
                    const Launch& at);
  cublasStatus_t matmul(const Plan& plan, const cublasLtMatmulAlgo_t& algo, const void* x, const void* w, void* y,
                        bool accumulate, const Launch& at);

  int device_;
  DType dtype_;
  cublasLtHandle_t lt_ = nullptr;
  std::map<Key, Plan> plans_;
  std::map<Key, cublasLtMatmulAlgo_t> tuned_for_rows_;  // by row_bucket_key: the algorithm tuned first there
};

}  // namespace polar::cuda
