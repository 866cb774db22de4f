// The CUDA backend's elementwise, normalisation, RoPE, KV-cache and reduction kernels (kernels.cu).
// Raw pointers and sizes only; the backend (cuda_backend.cpp) validates tensors before it calls these.
// `Elem` names the activation dtype of the tensors behind void pointers: all activations, weights and KV
// of one backend share it; arithmetic is fp32. Every launcher enqueues on `stream` and checks the launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace polar::cuda {

enum class Elem { F16, BF16 };

// Any kernel that meets bad data it cannot reject on the host (an id outside a table) ORs a bit into a
// device-side flag, which the backend reads back at its next synchronisation.
enum ErrorBit : int32_t {
  kErrorIdOutOfRange = 1,
  kErrorSlotOutOfRange = 2,
  kErrorHeadOutOfRange = 4,
  kErrorNeuronOutOfRange = 8,
};

// out[i] = lo + (hi - lo) * uniform_hash(seed, i) for i < n; dtype F32 (f32 = true) or `e`.
void random_uniform(void* out, int64_t n, bool f32, Elem e, float lo, float hi, uint64_t seed, cudaStream_t stream);
// Converts n values between fp32 and the activation dtype.
void to_f32(const void* in, float* out, int64_t n, Elem e, cudaStream_t stream);
void from_f32(const float* in, void* out, int64_t n, Elem e, cudaStream_t stream);

// out[t, :] = table[ids[t] + id_offset, :]; table [rows, d], out [n, d]. Ids outside [0, rows) write zeros
// and raise kErrorIdOutOfRange.
void embedding(const void* table, int64_t rows, int64_t d, const int32_t* ids, int64_t n, int64_t id_offset, void* out,
               int32_t* error_flag, Elem e, cudaStream_t stream);
// out = a + b over n elements.
void add(const void* a, const void* b, void* out, int64_t n, Elem e, cudaStream_t stream);
// x[rows, d] -> out[rows, d] (out may alias x). LayerNorm: (x - mean) / sqrt(var + eps) * w + b;
// RMSNorm (b == nullptr and rms): x / sqrt(mean(x²) + eps) * w. One CTA per row, fp32 statistics.
void norm(const void* x, const void* w, const void* b, float eps, bool rms, int64_t rows, int64_t d, void* out, Elem e,
          cudaStream_t stream);
// qkv [T, H + 2·Hkv, dh] (query, key, value heads) -> q [T, H, dh] and slot slots[t] of the caches
// [num_slots / block_size, Hkv, block_size, dh] (row slot % block_size of block slot / block_size, in
// every head's slab), all in one pass (the decode step's prologue). With inv_freq (fp32 [dh/2], any
// llama3 / linear scaling folded in) query and key heads are rotated by rotate-half RoPE at positions[t];
// without it (nullptr) they are copied. A slot outside [0, num_slots) sets kErrorSlotOutOfRange.
void rope_kv_append(const void* qkv, void* q, int64_t H, const int32_t* positions, const float* inv_freq,
                    const int32_t* slots, int64_t T, int64_t Hkv, int64_t dh, void* k_cache, void* v_cache,
                    int64_t num_slots, int64_t block_size, int32_t* error_flag, Elem e, cudaStream_t stream);
// out[T, F] = silu(gate_up[:, :F]) * gate_up[:, F:] (gate_up [T, 2F]).
void silu_mul(const void* gate_up, void* out, int64_t T, int64_t F, Elem e, cudaStream_t stream);
// Sparse selection (backend.h: route_heads, route_neurons). Keys order scores higher first, NaN as -inf,
// the lower index first among equals; selections are written in ascending index order.
// idx[R, k] = the k best of each row's H / group pooled scores (max over `group` consecutive heads).
// One CTA per row; H / group <= 1024.
void route_heads(const void* scores, int64_t R, int64_t H, int64_t group, int64_t k, int32_t* idx, Elem e,
                 cudaStream_t stream);
// idx[k] = the k best j by Σ_{r < live_rows[0]} max(logits[r, j], 0) over logits [R, D]; scratch holds
// route_neurons_scratch(D) ints.
inline int64_t route_neurons_scratch(int64_t D) { return D + 2048; }
void route_neurons(const void* logits, int64_t R, int64_t D, const int32_t* live_rows, int64_t k, int32_t* scratch,
                   int32_t* idx, Elem e, cudaStream_t stream);
// Zeroes the rows of out [T, H, dh] whose head h is not kept, h / group not among heads[t · heads_stride +
// 0:k] (heads_stride k: a set per token; 0: one set for all), except for tokens with dense_tokens[t] != 0 (nullptr: none) (backend.h: keep_heads). One CTA per token, O(H·dh + k)
// each; H / group <= 393216 (a shared-memory bitmap). An id H / group is padding; one outside [0, H / group] sets
// kErrorHeadOutOfRange.
void keep_heads(void* out, int64_t T, int64_t H, int64_t group, int64_t dh, const int32_t* heads, int64_t k,
                int64_t heads_stride, const int32_t* dense_tokens, int32_t* error_flag, Elem e, cudaStream_t stream);
// The selected columns idx[k] (ascending, < D) of M rows moved between full [M, D] and compact [M, k]
// activations: gather (full src -> compact dst) or scatter (compact src -> full dst, whose other columns are
// left as they are). An id outside [0, D) raises kErrorNeuronOutOfRange (a gathered column reads as zero).
// out [R, m] = each ascending row of idx [R, k] restricted to [first, first + count), renumbered from 0, then
// padded with count (backend.h: localize_indices).
void localize_indices(const int32_t* idx, int64_t R, int64_t k, int64_t first, int64_t count, int32_t* out, int64_t m,
                      cudaStream_t stream);
void move_columns(const void* src, void* dst, int64_t M, int64_t D, const int32_t* idx, int64_t k, bool gather,
                  int32_t* error_flag, Elem e, cudaStream_t stream);
// out[r] = the L2 norm of row r of x [R, n], fp32 accumulation; one CTA per row.
void l2_norms(const void* x, int64_t R, int64_t n, void* out, Elem e, cudaStream_t stream);
// out[r] = argmax of logits[r, 0:V] (lowest index on ties); one CTA per row.
void argmax(const void* logits, int64_t R, int64_t V, int32_t* out, Elem e, cudaStream_t stream);
// For m < M, row rows[m] of logits [*, V]: target_lp[m] = its log-softmax at targets[m]; top_ids / top_lp
// [M, n] = its n largest logits' ids (descending, lower id first on ties) and log-softmax values (backend.h:
// logprobs). One CTA per listed row, n + 1 passes over it.
void logprobs(const void* logits, int64_t V, const int32_t* rows, const int32_t* targets, int64_t M, int64_t n,
              float* target_lp, int32_t* top_ids, float* top_lp, Elem e, cudaStream_t stream);
// out[r] = the token the rule of ops/sampling.h picks from logits[r, 0:V] with uniforms[r] (temperature
// > 0; greedy rows use argmax). One CTA per row.
void sample(const void* logits, int64_t R, int64_t V, float temperature, int64_t top_k, float top_p,
            const float* uniforms, int32_t* out, Elem e, cudaStream_t stream);

}  // namespace polar::cuda
