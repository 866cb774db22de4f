// Batched generation: prompts are prefilled together (in chunks of at most max_step_tokens tokens), then
// every unfinished sequence decodes one token per step until it reaches EOS or its token limit.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/engine.h"
#include "runtime/sampler.h"

namespace polar {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingParams sampling;
  int64_t max_step_tokens = 2048;  // prefill budget per forward pass (bounds activation memory)
  std::function<bool(int32_t)> is_stop;  // EOS / end-of-generation test; may be empty
  Sparsity* sparsity = nullptr;          // sparse decode steps (EngineOptions::sparsity); null = dense
};

struct GenerateStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t decode_steps = 0;
};

// Returns each prompt's generated tokens (the stop token included when one was produced). on_token, if set,
// is called with (prompt index, token) as soon as each token is sampled.
std::vector<std::vector<int32_t>> generate(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& options,
                                           const std::function<void(size_t, int32_t)>& on_token = {},
                                           GenerateStats* stats = nullptr);

}  // namespace polar
