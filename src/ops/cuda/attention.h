// Paged attention kernels of the CUDA backend (attention.cu). Raw pointers, shapes and strides only; the
// backend (cuda_backend.cu) validates tensors and picks the kernel. Layouts:
//   q, out        [T, H, dh]                          activation dtype (f16 or bf16), row-major
//   k/v cache     [num_blocks, Hkv, block_size, dh]   same dtype; token p of sequence s lives in block
//                 block_tables[s * max_blocks + p / block_size], row p % block_size of each head's slab
//                 (Hkv * block_size * dh < 2^31)
//   positions     [T]    position of each query token in its sequence (its context is positions[t] + 1)
//   token_seq     [T]    row of the token's sequence in block_tables
//   seq_starts    [S+1]  chunk s is tokens [seq_starts[s], seq_starts[s+1]) and has consecutive positions
// Query token t attends causally to keys [max(0, positions[t] - window + 1), positions[t]] of its own
// sequence (window 0 = unlimited); query head h reads KV head h / (H / Hkv). Softmax in fp32.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace polar::cuda {

struct PagedAttention {
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* token_seq = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* seq_starts = nullptr;
  void* out = nullptr;
  // Selective decode: kv_heads [T, kv_heads_per_token] lists the KV heads each token attends with; the
  // rows of the other heads in out are zeroed. nullptr: every KV head.
  const int32_t* kv_heads = nullptr;
  int kv_heads_per_token = 0;
  int T = 0, S = 0, H = 0, Hkv = 0, dh = 0;
  int block_size = 0, max_blocks = 0;
  int max_ctx = 0;    // upper bound on positions[t] + 1 over the step (sizes the split-K grid)
  int max_chunk = 0;  // upper bound on seq_starts[s+1] - seq_starts[s] (sizes the prefill grid)
  int window = 0;
  float scale = 1.0f;
  bool bf16 = false;  // element type of q, caches and out: false = f16
};

// Head dims the kernels are built for; others are rejected by the backend with a clear error.
bool attention_supports_head_dim(int dh);

// How a decode step splits each row's keys (split-K): `splits` CTAs per (token, launched KV head, head
// chunk), each over keys_per_split keys (a multiple of lcm(64, block_size)), and the last to finish merges
// them. One split: no partials (keys_per_split unused); prefill steps always run one.
struct AttentionPlan {
  int splits = 1;
  int keys_per_split = 0;
  bool operator==(const AttentionPlan& o) const { return splits == o.splits && keys_per_split == o.keys_per_split; }
};

// The split plans worth timing for these arguments on a device with `num_sms` SMs, always in this order
// (a choice made for one context can be made again by index for another): [0] the cost model's (waves of
// the CTAs the GPU holds at once, a fixed cost per CTA and per split), then for c = 1 .. the decode CTAs
// an SM holds, the most splits whose CTAs fit c per SM in one wave (at batch 1 the model's choice leaves
// latency on the table: docs/benchmarks.md). Entries may repeat. Prefill steps and decode steps without a
// context: the single plan of one split. Functions of the sizes and the device only, never of the data.
std::vector<AttentionPlan> attention_plans(const PagedAttention& a, int num_sms);

// Scratch bytes paged_attention needs for `plan` (split-K partial results; 0 for one split).
size_t attention_workspace_bytes(const PagedAttention& a, const AttentionPlan& plan);

// Arrival counters (uint32) paged_attention needs for `plan`: one per (token, launched KV head, head chunk)
// of a split decode step, where the last split to finish merges the others; 0 without splits. They must be
// zero before the first launch, and every launch leaves them zero, so one buffer serves every launch on a
// stream, graph replays included.
size_t attention_arrival_counters(const PagedAttention& a, const AttentionPlan& plan);

// Enqueues the attention on `stream` with `plan` (one of attention_plans(a, ...), or any plan whose splits
// cover max_ctx; anything else is rejected). Every launch shape is a function of the arguments' sizes and
// the plan, never of data on the device, so the call can be captured in a CUDA graph and replayed with new
// positions and block tables (as long as max_ctx and max_chunk still bound them). Decode steps (max_chunk ==
// 1) run the split-K flash-decoding kernel; steps with longer chunks run the tiled causal prefill kernel.
void paged_attention(const PagedAttention& a, const AttentionPlan& plan, void* workspace, size_t workspace_bytes,
                     unsigned* arrivals, size_t num_arrivals, cudaStream_t stream);

}  // namespace polar::cuda
