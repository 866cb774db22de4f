#include "ops/cuda/cublaslt_gemm.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/variant_timing.h"

namespace polar::cuda {

namespace {

void lt_check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error in {}: status {}", what, static_cast<int>(st));
}

int alignment_of(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  for (int a : {256, 128, 64, 32, 16, 8, 4}) if (v % a == 0) return a;
  return 2;
}

}  // namespace

GemmPlanner::GemmPlanner(int device, DType dtype) : device_(device), dtype_(dtype) {
  lt_check(cublasLtCreate(&lt_), "cublasLtCreate");
}

GemmPlanner::~GemmPlanner() {
  for (auto& [key, plan] : plans_) {
    cublasLtMatrixLayoutDestroy(plan.a);
    cublasLtMatrixLayoutDestroy(plan.b);
    cublasLtMatrixLayoutDestroy(plan.c);
    cublasLtMatmulDescDestroy(plan.desc);
  }
  cublasLtDestroy(lt_);
}

void GemmPlanner::run(const Gemm& g, cudaStream_t stream, void* workspace, bool capturing) {
  const Launch at{stream, workspace, capturing};
  Plan& p = plan({g.m, g.n, g.k, g.bias != nullptr, g.relu, g.w_kn, g.accumulate, alignment_of(g.x),
                  alignment_of(g.w), alignment_of(g.y)},
                 g, at);
  if (g.bias)
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
             "bias");
  lt_check(matmul(p, p.algo, g.x, g.w, g.y, g.accumulate, at), "cublasLtMatmul");
}

cublasStatus_t GemmPlanner::matmul(const Plan& plan, const cublasLtMatmulAlgo_t& algo, const void* x, const void* w,
                                   void* y, bool accumulate, const Launch& at) {
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  return cublasLtMatmul(lt_, plan.desc, &alpha, w, plan.a, x, plan.b, &beta, y, plan.c, y, plan.c, &algo,
                        at.workspace, kWorkspaceBytes, at.stream);
}

GemmPlanner::Plan& GemmPlanner::plan(const Key& key, const Gemm& g, const Launch& at) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  const int64_t m = key.m, n = key.n, k = key.k;
  const cudaDataType_t t = dtype_ == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  Plan p;
  lt_check(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
  const cublasOperation_t trans_a = key.w_kn ? CUBLAS_OP_N : CUBLAS_OP_T, no_trans = CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), "transa");
  lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &no_trans, sizeof(no_trans)), "transb");
  const cublasLtEpilogue_t epi = key.relu ? (key.bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU)
                                          : (key.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
  lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)), "epilogue");
  if (g.bias)
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
             "bias");
  if (key.w_kn)
    lt_check(cublasLtMatrixLayoutCreate(&p.a, t, n, k, n), "layout a");
  else
    lt_check(cublasLtMatrixLayoutCreate(&p.a, t, k, n, k), "layout a");
  lt_check(cublasLtMatrixLayoutCreate(&p.b, t, k, m, k), "layout b");
  lt_check(cublasLtMatrixLayoutCreate(&p.c, t, n, m, n), "layout c");
  // GEMMs whose m is not tuned exactly (prefill and mixed steps, whose m changes with every prompt chunk)
  // reuse the algorithm tuned for the first m of their row bucket, when cuBLASLt accepts it for this m:
  // tuning times some 30 candidates, tens of milliseconds per shape, which would land on the step (with
  // prefix caching a server meets most token counts below kFineBucketRows too).
  const Key bucket = row_bucket_key(key);
  if (bucket.m != m && !at.capturing) {
    const auto tuned = tuned_for_rows_.find(bucket);
    cublasLtMatmulHeuristicResult_t r{};
    if (tuned != tuned_for_rows_.end() &&
        cublasLtMatmulAlgoCheck(lt_, p.desc, p.a, p.b, p.c, p.c, &tuned->second, &r) == CUBLAS_STATUS_SUCCESS &&
        r.workspaceSize <= static_cast<size_t>(kWorkspaceBytes)) {
      p.algo = tuned->second;
      return plans_.emplace(key, p).first->second;
    }
  }
  cublasLtMatmulPreference_t pref;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "preference");
  const uint64_t ws = kWorkspaceBytes;
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), "ws");
  const uint32_t aw = key.align_w, ax = key.align_x, ay = key.align_y;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw, sizeof(aw));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax, sizeof(ax));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ay, sizeof(ay));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ay, sizeof(ay));
  std::vector<cublasLtMatmulHeuristicResult_t> results(kGemmCandidates);
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(lt_, p.desc, p.a, p.b, p.c, p.c, pref, kGemmCandidates, results.data(), &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    fail("cuBLASLt has no algorithm for a {} GEMM of m={} n={} k={}", dtype_name(dtype_), m, n, k);
  results.resize(found);
  p.algo = results[0].algo;
  if (!at.capturing) {
    add_split_k_variants(p, results);
    pick_fastest(p, results, g, at);
  }
  if (!at.capturing) tuned_for_rows_.emplace(bucket, p.algo);
  return plans_.emplace(key, p).first->second;
}

// The key a GEMM's tuned algorithm is kept under: m itself up to 8, else m rounded up to a multiple of 8 up
// to kFineBucketRows (every decode graph's batch is such a multiple, so graphs get their exact m) and to a
// power of two above (the operands' alignments stay in the key: the algorithm was chosen for them).
GemmPlanner::Key GemmPlanner::row_bucket_key(Key key) {
  if (key.m <= 8) return key;
  if (key.m <= kFineBucketRows) {
    key.m = (key.m + 7) / 8 * 8;
    return key;
  }
  int64_t bucket = kFineBucketRows;
  while (bucket < key.m) bucket *= 2;
  key.m = bucket;
  return key;
}

// Split-K variants (2, 4, 8 splits of k, partial sums reduced in fp32 in the workspace) of the heuristic's
// first kSplitKBases picks, where the algorithm supports it and cuBLASLt accepts the configuration: at
// decode batch sizes a [n, k] weight with n = 4096 gives too few output tiles to keep every SM streaming.
void GemmPlanner::add_split_k_variants(const Plan& p, std::vector<cublasLtMatmulHeuristicResult_t>& results) {
  const size_t bases = std::min<size_t>(results.size(), kSplitKBases);
  for (size_t i = 0; i < bases; ++i) {
    int32_t supported = 0, current = 1;
    uint32_t schemes = 0;
    size_t written = 0;
    const cublasLtMatmulAlgo_t& base = results[i].algo;
    if (cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &supported, sizeof(supported),
                                          &written) != CUBLAS_STATUS_SUCCESS || !supported)
      continue;
    cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes),
                                      &written);
    cublasLtMatmulAlgoConfigGetAttribute(&base, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &current, sizeof(current), &written);
    if (current > 1 || !(schemes & CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)) continue;
    for (int32_t splits : {2, 4, 8}) {
      cublasLtMatmulHeuristicResult_t r{};
      r.algo = base;
      const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      cublasLtMatmulAlgoConfigSetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits));
      cublasLtMatmulAlgoConfigSetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme));
      if (cublasLtMatmulAlgoCheck(lt_, p.desc, p.a, p.b, p.c, p.c, &r.algo, &r) == CUBLAS_STATUS_SUCCESS &&
          r.workspaceSize <= static_cast<size_t>(kWorkspaceBytes))
        results.push_back(r);
    }
  }
}

// The fastest of cuBLASLt's candidate algorithms for a plan: the heuristic's first pick is made for
// throughput-sized problems and leaves much of the bandwidth unused on some decode shapes (on an H200,
// m <= 256 x n = k = 4096 ran at 61% of copy bandwidth). Each candidate is timed (time_variants) into a
// scratch output; without memory for the scratch (a cache filling the device) the first pick stays.
void GemmPlanner::pick_fastest(Plan& p, const std::vector<cublasLtMatmulHeuristicResult_t>& results, const Gemm& g,
                               const Launch& at) {
  if (results.size() == 1) return;
  void* y = nullptr;
  if (cudaMalloc(&y, static_cast<size_t>(g.m * g.n) * 2) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  const std::vector<float> ms = time_variants(device_, at.stream, results.size(), [&](size_t i) {
    return matmul(p, results[i].algo, g.x, g.w, y, g.accumulate, at) == CUBLAS_STATUS_SUCCESS;
  });
  cuda_check(cudaFree(y), "cudaFree");
  if (ms.empty()) return;
  p.algo = results[std::min_element(ms.begin(), ms.end()) - ms.begin()].algo;
}

}  // namespace polar::cuda
