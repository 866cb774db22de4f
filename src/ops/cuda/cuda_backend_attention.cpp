// The CUDA backend's paged attention (cuda_backend_impl.h): argument checks, the split-K plan of a decode step
// (chosen by timing the first time its sizes are met) and the arrival counters the split CTAs share.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <vector>

#include "ops/cuda/cuda_backend_impl.h"
#include "ops/cuda/variant_timing.h"

namespace polar {

using cuda::cuda_check;

void CudaBackend::attention(const Tensor& q, const KVLayer& cache, const StepLayout& layout, float scale,
                            int64_t window, Tensor& out, const Tensor* kv_heads, const Tensor* dense_tokens) {
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

// Which of `plans` (cuda::attention_plans: the split-K plans of a decode step) the step runs. The first
// time its sizes are met, every distinct plan is timed on the step's own inputs (time_variants: KV from
// HBM; each run rewrites the output the chosen plan then writes again), and the fastest is remembered by
// its index for these sizes with max_ctx rounded up to a power of two, so that eager steps and the graphs
// of a context bucket share it. Met first while a graph is being captured: the cost model's plan ([0]).
size_t CudaBackend::attention_plan_choice(const cuda::PagedAttention& a,
                                          const std::vector<cuda::AttentionPlan>& plans) {
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

// The decode attention's split-K arrival counters (attention.h), at least `need` of them: zero between
// launches, so one buffer serves every launch on stream_. A buffer outgrown is kept, not freed: graphs
// captured with it still use it.
unsigned* CudaBackend::attention_arrivals(size_t need) {
  if (need > arrivals_capacity_) {
    if (arrivals_capacity_ > 0) retired_arrivals_.push_back(arrivals_);
    arrivals_capacity_ = std::max(need, 2 * arrivals_capacity_);
    arrivals_ = alloc(DType::I32, {static_cast<int64_t>(arrivals_capacity_)});
    cuda_check(cudaMemsetAsync(arrivals_.raw(), 0, arrivals_.nbytes(), stream_), "cudaMemset");
    arrivals_grew_in_capture_ = capturing_;
  }
  return static_cast<unsigned*>(arrivals_.raw());
}

}  // namespace polar
