// The speed benchmark behind `polar bench`: batched decode over a sweep of batch sizes and context
// lengths, each point next to its floor, and optionally the prefill of one prompt. Decode is memory-bound,
// so its floor is the bytes a step must read (the weights in full + every sequence's KV cache) over the
// device's measured memory rates (bench/memory_rates.h: the copy rate, and the streaming read rate that is
// the true limit of a step that only reads); prefill is compute-bound, so its floor is its FLOPs over the
// GEMM rate measured at its shape.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bench/memory_rates.h"
#include "model/model.h"
#include "sparse/router_sparsity.h"

namespace polar {

// Untimed decode steps at each point before the profiled and the timed ones (CUDA graphs are captured here).
constexpr int64_t kWarmupSteps = 3;

struct DecodeSweepOptions {
  std::vector<int64_t> batches = {1, 8};
  std::vector<int64_t> contexts = {512};
  int64_t steps = 20;  // timed decode steps per point
  uint64_t seed = 0;   // first tokens and KV cache contents
  // Sparse decode steps (null = dense) and the head density they were made with, for the table.
  RouterSparsity* sparsity = nullptr;
  double density = 1.0;
};

// One point of the sweep: `batch` sequences, all at the same context. Each starts from ctx - (warm-up +
// profiled + timed steps) positions of random KV cache, so the last timed step attends over ctx positions.
struct DecodePoint {
  int64_t batch = 0;
  int64_t ctx = 0;
  double density = 1.0;   // share of attention heads (KV groups) a sequence keeps (1.0 = dense)
  double step_ms = 0;     // median host wall time of a timed step: forward, argmax, the new ids on the host
  double tokens_per_s = 0;
  double floor_ms = 0;    // (weight bytes read + KV bytes read) / measured copy rate; sparse steps count
                          // the selected MLP rows, the routers and the selected heads' KV only
  double x_floor = 0;     // step_ms / floor_ms
  double gb_per_s = 0;    // the floor's bytes / step_ms
  double read_floor_ms = 0;  // the same bytes / measured streaming read rate: the step's physical limit
  double x_read = 0;         // step_ms / read_floor_ms
  // Device time per region of one profiled step, run op by op (no graph): they add up to profiled_ms,
  // which is why they can add up to more than step_ms. "other": norms, embeddings, lm_head, argmax, inputs.
  double attention_ms = 0, qkv_o_ms = 0, mlp_ms = 0, other_ms = 0;
  double profiled_ms = 0;  // host wall time of the profiled step
};

struct SkippedPoint {
  int64_t batch = 0;
  int64_t ctx = 0;
  std::string reason;
};

struct DecodeSweep {
  std::vector<DecodePoint> points;
  std::vector<SkippedPoint> skipped;
};

// K and V of one token over all layers, in the cache's dtype.
int64_t kv_bytes_per_token(const ModelConfig& c, DType dtype);
// Device bytes a point needs besides the resident weights: its KV cache in whole blocks, plus the step's
// activations (logits twice over, with a margin).
int64_t decode_point_bytes(const ModelConfig& c, DType dtype, int64_t batch, int64_t ctx);
// Why the point cannot run with free_bytes of device memory left, or "" when it can.
std::string decode_skip_reason(const ModelConfig& c, DType dtype, int64_t batch, int64_t ctx, int64_t free_bytes);

// Runs every (ctx, batch) point on the model's backend, contexts outermost; points that do not fit are
// skipped. Progress and skips go to `log`. A context shorter than the steps a point runs is a polar::Error.
DecodeSweep run_decode_sweep(Model& model, const DecodeSweepOptions& options, const MemoryRates& rates,
                             const std::function<void(const std::string&)>& log = {});

// Best rate of y[m, n] = x[m, k] · w[n, k]ᵀ on the backend, in its activation dtype.
double measure_gemm_gflops(Backend& backend, int64_t m, int64_t n, int64_t k);

struct PrefillResult {
  int64_t prompt_len = 0;
  double ms = 0;  // median over the repetitions, after one warm-up
  double tokens_per_s = 0;
  double floor_ms = 0;  // FLOPs / gemm_gflops
  double x_floor = 0;
  double gflop_per_s = 0;
};
// Prefill of one random prompt of prompt_len tokens into a fresh cache.
PrefillResult run_prefill(Model& model, int64_t prompt_len, int64_t reps, double gemm_gflops, uint64_t seed);

}  // namespace polar
