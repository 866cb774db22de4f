// The speed benchmark behind `polar bench`: prefill and batched decode of a model, each measured against
// its floor. Decode is memory-bound, so its floor is the bytes a step must read (weights + KV cache) over
// the measured memory bandwidth; prefill is compute-bound, so its floor is its FLOPs over the measured
// GEMM rate. Times are medians over repeated runs after warm-up.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/model.h"

namespace polar {

struct HostRoofline {
  double read_gbps = 0;     // best parallel streaming read bandwidth over a buffer far larger than caches
  double gemm_gflops = 0;   // best sgemm rate at the prefill shape
};
// Measures the host's limits; m, n, k: the GEMM shape to measure (tokens, outputs, inputs).
HostRoofline measure_host_roofline(int64_t m, int64_t n, int64_t k);

struct BenchOptions {
  std::vector<int64_t> batches = {1, 8};
  int64_t prompt_len = 512;    // prefill length, and the context decode steps start from
  int64_t decode_steps = 16;   // timed decode steps per batch size (after 2 warm-up steps)
  int64_t prefill_reps = 3;
  uint64_t seed = 0;
};

struct BenchRow {
  std::string phase;      // "prefill" or "decode"
  int64_t batch = 0;
  int64_t ctx = 0;        // context length at the measured steps
  double ms = 0;          // median time of one prefill / one decode step
  double tokens_per_s = 0;
  double floor_ms = 0;
  double x_floor = 0;     // ms / floor_ms
  double achieved = 0;    // decode: GB/s of the byte floor's bytes; prefill: GFLOP/s
};

std::vector<BenchRow> run_bench(Model& model, const BenchOptions& options, const HostRoofline& roof,
                                const std::function<void(const std::string&)>& progress = {});

}  // namespace polar
