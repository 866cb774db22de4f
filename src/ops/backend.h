// The op interface. Model code is written once against Backend; the CPU backend (ops/cpu) is the plain
// fp32 reference and the oracle for the CUDA backend (ops/cuda). All tensors passed to a backend live on
// its device, are row-major and contiguous. Shapes below: T = tokens in the step (all sequences
// flattened), d = model width, H / Hkv = query / KV heads, dh = head dim, S = sequences in the step.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/sampling.h"

namespace polar {

// Paged KV cache of one layer: K and V as [num_blocks, Hkv, block_size, dh]. A sequence's token at
// position p lives in block block_table[seq][p / block_size], row p % block_size of each head's
// [block_size, dh] slab. Head-major blocks keep the rows one KV head's attention reads contiguous
// (block_size * dh elements), rather than dh-element rows Hkv * dh apart.
struct KVLayer {
  Tensor k;
  Tensor v;
};

// Where each token of a step sits, on the backend's device (all I32).
struct StepLayout {
  Tensor positions;    // [T] position of the token in its sequence
  Tensor token_seq;    // [T] row of its sequence in block_tables
  Tensor slots;        // [T] cache slot block * block_size + offset the token's K/V go to (in every head's slab)
  Tensor block_tables; // [S, max_blocks] physical block ids of each sequence
  Tensor seq_starts;   // [S + 1] chunk s is tokens [seq_starts[s], seq_starts[s + 1]) of the step
  int64_t block_size = 0;
  int64_t max_ctx = 0;    // upper bound on the context (position + 1) of any token in the step
  int64_t max_chunk = 0;  // upper bound on the tokens of any one chunk (1 in a pure decode step)
  Tensor live_tokens;     // [1]: tokens [0, live_tokens) are real, the rest pad a captured batch
};

// A recorded sequence of device work that can be run again (a CUDA graph). It owns the memory allocated
// while it was recorded, so the buffers it reads and writes stay valid as long as it lives.
class Graph {
 public:
  virtual ~Graph() = default;
  virtual void replay() = 0;
};

// Variable per-row unit counts for route_heads (issue 19). The list keeps its fixed shape [R, k] (graphs
// stay valid); what varies is how many of its entries are real.
struct HeadCutoff {
  int64_t kmin = 1;        // 1 <= kmin <= k
  float value = 0;         // the threshold, or with row_stat the c of mean + c · std
  bool row_stat = false;   // statistical top-k: the threshold from each row's own scores
  // Optional tally (the density reached): tally [2] I32 += (units kept, rows) over the rows r with
  // r < live_rows[0] (I32 [1]; undefined: every row) and dense_rows[r] == 0 (I32 [R]; undefined: none
  // flagged) — the rows whose selection a step uses. Integer sums, so the same on every backend.
  Tensor* tally = nullptr;
  const Tensor* live_rows = nullptr;
  const Tensor* dense_rows = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // Memory. alloc returns uninitialised memory; upload converts a host fp32/i32 tensor to `dtype`.
  virtual Tensor alloc(DType dtype, Shape shape) = 0;
  virtual Tensor upload(const Tensor& host, DType dtype) = 0;
  // Float tensors -> fp32 host copy, I32 -> I32 host copy (a view on CPU). Synchronises.
  virtual Tensor to_host_f32(const Tensor& t) = 0;
  virtual DType activation_dtype() const = 0;      // dtype of activations and weights on this backend
  virtual void synchronize() {}
  // Makes the backend's device current on the calling thread (CUDA): a thread other than the one that made
  // the backend (a tensor-parallel rank's worker) calls it before issuing work.
  virtual void bind_thread() {}

  // A new tensor of `shape` filled with uniform values in [lo, hi): element i gets
  // lo + (hi - lo) * uniform_hash(seed, i) (core/random.h), so every backend draws the same numbers.
  // Synthetic benchmark models and test inputs are made this way without a host copy.
  virtual Tensor random_uniform(DType dtype, Shape shape, float lo, float hi, uint64_t seed) = 0;

  // out[T, d] = table[ids[t] + id_offset, :] (also used to gather rows of activations). Ids outside the
  // table are a polar::Error.
  virtual void embedding(const Tensor& table, const Tensor& ids, Tensor& out, int64_t id_offset = 0) = 0;
  // y[T, n] = x[T, k] · w[n, k]ᵀ (+ bias[n]) (+ y if accumulate)
  virtual void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, bool accumulate = false) = 0;
  // The output projection of selective attention, linear(a, w, bias, y, accumulate) for an a [T, U·width] whose
  // column block u (width columns: KV group u's query heads) is zero in every token that did not select u, as
  // the attention op leaves it: units [T, k] (I32) are the kv_heads the attention op got (entries outside [0,
  // U): padding), tokens flagged 1 in dense_tokens [T] (optional) select every unit. The same values as
  // linear; a backend may read only the weight columns of units some token selected (CUDA at decode-sized T:
  // at batch 1 and density 0.5 half of o_proj's weight bytes). The CPU reference computes linear.
  virtual void linear_selected_inputs(const Tensor& a, const Tensor& w, const Tensor* bias,
                                      [[maybe_unused]] const Tensor& units, [[maybe_unused]] int64_t width,
                                      [[maybe_unused]] const Tensor* dense_tokens, Tensor& y, bool accumulate = false) {
    linear(a, w, bias, y, accumulate);
  }
  // out = a + b, elementwise over equal shapes; out may alias a or b.
  virtual void add(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  // Row-wise norms over the last dim d: LayerNorm (weight, bias) and RMSNorm (weight). out may alias x.
  virtual void layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) = 0;
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) = 0;
  // The residual add fused into the next norm: x += delta (stored in x's dtype), then out = RMSNorm(x).
  // A projection writes delta instead of accumulating into x, whose GEMM epilogue (beta = 1) runs at ~60% of
  // the read rate where the plain one runs at ~85% (m = 1, cuBLASLt on an H100: docs/benchmarks.md).
  // out may alias x; delta must not.
  virtual void add_rms_norm(Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& out) = 0;
  // qkv [T, H + 2·Hkv, dh], the fused q/k/v projection's output (query heads, then key heads, then value
  // heads) -> q [T, H, dh], the query heads rotated; the key heads rotated and the value heads go to the
  // cache rows layout.slots. Rotation: rotate-half RoPE, (x[i], x[i + dh/2]) turned by
  // layout.positions[t] · inv_freq[i] (F32 [dh/2]); an undefined inv_freq means none (learned positions).
  // One pass over qkv; a slot outside the cache is a polar::Error.
  virtual void rope_kv_append(const Tensor& qkv, KVLayer& cache, const StepLayout& layout, const Tensor& inv_freq,
                              Tensor& q) = 0;
  // Causal attention of q[T, H, dh] over each token's own sequence in the cache, keys at positions
  // [max(0, pos - window + 1), pos] (window 0 = unlimited). GQA: query head h reads KV head h / (H / Hkv).
  // out[T, H, dh] = softmax(q·kᵀ · scale) · v.
  // Selective attention (sparse steps): with kv_heads [T, k] (I32, ascending, distinct, < Hkv) token t
  // attends only with the query heads of KV heads kv_heads[t] — each selected KV head's cache read once
  // for all its query heads — and the other heads' output rows are exactly zero. An entry equal to Hkv is
  // padding and selects nothing (a tensor-parallel rank owns only some of a token's heads:
  // localize_indices). dense_tokens [T] (I32, optional): tokens flagged 1 ignore kv_heads and attend with every head (a prefill whose later tokens
  // are scored as sparse decode steps would process them).
  virtual void attention(const Tensor& q, const KVLayer& cache, const StepLayout& layout, float scale, int64_t window,
                         Tensor& out, const Tensor* kv_heads = nullptr, const Tensor* dense_tokens = nullptr) = 0;
  // out[T, F] = silu(gate_up[:, :F]) * gate_up[:, F:], for the fused gate/up projection's output [T, 2F].
  virtual void silu_mul(const Tensor& gate_up, Tensor& out) = 0;
  // out[R] (I32) = index of the largest of each row of logits [R, V] (the first one on ties).
  virtual void argmax(const Tensor& logits, Tensor& out) = 0;
  // Log-probabilities (log-softmax) of some rows of logits [R, V], for the API's logprobs: for m < M,
  // row = rows[m] (I32 [M]) and lse = log Σ_v exp(logits[row, v]):
  //   target_lp[m] (F32 [M]) = logits[row, targets[m]] - lse (targets I32 [M]: the token each row scores);
  //   top_ids[m, :] (I32 [M, n], n >= 1) = the row's n largest logits' token ids, descending, the lower id
  //   first among equal logits; top_lp[m, :] (F32 [M, n]) their logits - lse.
  // Only the listed rows are read, so rows that ask for nothing cost nothing.
  virtual void logprobs(const Tensor& logits, const Tensor& rows, const Tensor& targets, Tensor& target_lp,
                        Tensor& top_ids, Tensor& top_lp) = 0;

  // ---- Sparse decoding (polar-method.md §3, §5). Selections are index lists in ascending order; among
  // equal scores the lower index wins, so every backend selects the same set.
  // Attention router selection: scores [R, H] per query head; with group > 1 (GQA) a KV group's score is
  // the max over its `group` consecutive heads. idx [R, k] (I32) = each row's k best heads (group == 1) or
  // KV groups, k = idx.dim(1) <= H / group.
  // With a cutoff (adaptive selection, issue 19), k is a capacity: row r keeps its units whose pooled score
  // is >= its threshold, but at least cutoff->kmin and at most k of them, the best by the order above (so
  // the kept units are always a prefix of that order); its other entries are padding, H / group, which the
  // attention op and keep_heads skip. The row's threshold is cutoff->value, or, with cutoff->row_stat
  // (statistical top-k), mean + value · std of the row's H / group pooled scores (population std, in fp64;
  // a NaN threshold keeps kmin).
  virtual void route_heads(const Tensor& scores, int64_t group, Tensor& idx, const HeadCutoff* cutoff = nullptr) = 0;
  // out[R] = the L2 norm of each row of x [R, n] (accumulated in fp32 or wider): per-head norms of an attention output
  // [T, H, dh] viewed as [T·H, dh] (a KV group's as [T·Hkv, group·dh]), as calibration measures them.
  virtual void l2_norms(const Tensor& x, Tensor& out) = 0;
  // Zeroes the rows of x [T, H, dh] whose head h is not kept, h / group not among heads[t] ([T, k] I32, < H /
  // group; or [1, k]: one set for every token, as a decode batch's MLP neurons in a mixed step): group 1
  // selects query heads, group H / Hkv KV groups. Tokens flagged 1 in dense_tokens [T] (optional) keep every
  // head. Selections that cannot go to the attention op as kv_heads (per query head,
  // or made from the attention output itself) are applied this way. An entry equal to H / group is padding
  // (localize_indices) and keeps nothing.
  virtual void keep_heads(Tensor& x, const Tensor& heads, int64_t group, const Tensor* dense_tokens) = 0;
  // MLP router selection for the whole batch: score[j] = Σ_r max(logits[r, j], 0) over logits [R, D];
  // idx [k] (I32) = the k best neurons, k = idx.numel() <= D.
  // Only rows r < live_rows[0] (I32 [1]) count: padding rows of a captured batch must not steer the choice.
  virtual void route_neurons(const Tensor& logits, const Tensor& live_rows, Tensor& idx) = 0;
  // ReLU MLP up-projection over the selected neurons: y[R, k] = max(x[R, d] · w[idx]ᵀ + bias[idx], 0) for a
  // neuron-major w [D, d] (fc1 as stored) and bias [D] (optional). idx == nullptr: every neuron, k = D.
  virtual void gather_up_relu(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* idx, Tensor& y) = 0;
  // ReLU MLP down-projection from the selected neurons: y[R, d] (+)= a[R, k] · wt[idx] (+ bias[d]) for the
  // transposed, neuron-major wt [D, d] (fc2ᵀ, so a neuron's weights are one contiguous row). idx ==
  // nullptr: every neuron, k = D. accumulate adds to y (the residual).
  virtual void gather_down(const Tensor& a, const Tensor& wt, const Tensor* idx, const Tensor* bias, Tensor& y,
                           bool accumulate) = 0;

  // Tensor parallelism: a rank's part of a selection. idx [R, k] (I32, rows ascending) names units (heads,
  // KV groups, MLP neurons) of the whole model; out [R, m] (I32) gets, per row, the entries in [first,
  // first + count) renumbered from 0 (in order), then `count` in the places left: padding, which the
  // attention op's kv_heads and keep_heads skip and a gathered MLP projection reads as the rank's zero
  // neuron, so the shape stays fixed (graphs) while the number a rank owns varies. m >= min(k, count).
  virtual void localize_indices(const Tensor& idx, int64_t first, int64_t count, Tensor& out) = 0;

  // Copies a host tensor into an existing device tensor of the same dtype and size (no allocation, so
  // buffers a graph reads can be refilled between replays).
  virtual void copy_to_device(const Tensor& host, Tensor& dst) = 0;

  // Graph capture: work issued between begin_capture() and end_capture() is recorded, not run; replaying
  // the graph runs it again with whatever the recorded buffers hold then. Backends without graphs say so.
  virtual bool supports_graphs() const { return false; }
  virtual void begin_capture();
  virtual std::unique_ptr<Graph> end_capture();
  // Side work: ops issued between begin_side_work() and end_side_work() need not be ordered before the ops
  // that follow, up to wait_side_work(ticket) with the ticket end_side_work() returned; a backend may run
  // them concurrently there (the CUDA backend does inside a captured graph). The routers use it: small,
  // latency-bound launches that can hide behind the QKV projection instead of preceding it. The inputs of
  // side work must not be overwritten before its wait. By default everything runs in order.
  virtual void begin_side_work() {}
  virtual int end_side_work() { return 0; }
  virtual void wait_side_work(int /*ticket*/) {}

  // out[r] (I32) = the token the rule of ops/sampling.h picks from row r of logits [R, V] with the
  // uniform number uniforms[r] (F32 [R]); no host synchronisation.
  virtual void sample(const Tensor& logits, const SamplingParams& p, const Tensor& uniforms, Tensor& out) = 0;

  // Device memory: bytes free now and in total (host RAM for the CPU backend).
  virtual std::pair<int64_t, int64_t> memory_info() = 0;
  // The memory bandwidth the device reaches now, in GB/s (1e9 bytes/s), measured with buffers far larger
  // than any cache, best of several passes: on CUDA a device-to-device copy (bytes read + bytes written
  // per second), on the CPU a parallel streaming read. Decode's byte floor is the bytes a step must move
  // over this. Takes up to about a second; its buffers are released before it returns.
  virtual double measure_memory_gbps() = 0;
  // The device's streaming read rate in GB/s: a kernel that only reads a buffer far larger than any cache
  // (16-byte loads, many in flight), best of several passes. A decode step reads its weights and KV and
  // writes next to nothing, so this, not the copy rate, is its physical limit (the CPU's probe above is
  // already a read, and returns the same). Takes up to about a second.
  virtual double measure_read_gbps() = 0;

  // Profiling by region. Model code names the part of the step its next ops belong to ("attention",
  // "qkv_o", "mlp", "other"); while profiling is on, the backend attributes the time from one region mark
  // to the next to the earlier region (device events on CUDA, the host clock on CPU, whose ops are
  // synchronous). take_profile() synchronises and returns milliseconds per region since the last call.
  void region(const char* name);
  void set_profiling(bool on);
  bool profiling() const { return profiling_; }
  std::map<std::string, double> take_profile();

 protected:
  // A point in the backend's stream of work, and the milliseconds between two such points once reached.
  virtual int64_t time_marker() = 0;
  virtual double marker_ms(int64_t from, int64_t to) = 0;
  virtual void reset_markers() {}
  // Where profiling turns on and off: the span an external profiler started with its capture off records
  // (CUDA: cudaProfilerStart/Stop, for `ncu --profile-from-start off`: one decode step's kernels, or a
  // kernel benchmark's timed replays, without the set-up around them).
  virtual void external_profiler_span(bool /*begin*/) {}

 private:
  bool profiling_ = false;
  std::vector<std::pair<std::string, int64_t>> marks_;
};

// share: how many CPU backends run at once (tensor-parallel ranks); each then uses 1/share of OpenMP's threads.
std::unique_ptr<Backend> make_cpu_backend(int share = 1);
// How the CUDA backend runs the sparse MLP projections (gather_up_relu, gather_down with neuron ids), which
// it can compute two ways with the same values: by the faster of its gather kernel and a dense GEMM,
// measured once per shape (the default), or always by one of them (tests, benchmarks). The CPU ignores it.
enum class SparseMlpPath { fastest, gather_kernel, dense_gemm };
// "cpu" or "cuda[:N]"; a CUDA device on a build or machine without one is a polar::Error. `dtype` is the
// CUDA backend's weight/activation/KV type (F16 or BF16); the CPU reference always computes in F32.
std::unique_ptr<Backend> make_backend(const std::string& device, DType dtype = DType::F16,
                                      SparseMlpPath mlp_path = SparseMlpPath::fastest);

}  // namespace polar
