// Generation for a fixed set of prompts, through the continuous-batching Scheduler: every prompt is submitted
// at once, at most max_seqs of them run together (the rest wait and join as others finish), long prompts are
// read in chunks under a per-step token budget, and each sequence stops at EOS or its token limit.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/scheduler.h"

namespace polar {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingParams sampling;  // prompt i draws from Sampler stream i, so seeded runs repeat whatever the batching
  int64_t max_seqs = 256;   // running batch at most; capped at max_step_tokens (each running sequence decodes each step)
  int64_t max_step_tokens = 2048;     // tokens per engine step at most (bounds activation memory)
  const Tokenizer* tokenizer = nullptr;  // its EOS tokens end a sequence and events carry text; null: neither
  Sparsity* sparsity = nullptr;          // sparse decode tokens (EngineOptions::sparsity); null = dense
};

struct GenerateStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double seconds = 0;  // submission to the last token
  double mean_ttft_seconds = 0;  // arrival to first token, over the prompts that produced one
  SchedulerStats scheduler;
};

// Returns each prompt's generated tokens (the stop token included when one was produced). on_event, if set, is
// called on this thread with (prompt index, event) as each prompt's events arrive: one per token, with its
// newly complete text, and a last one with the finish reason.
std::vector<std::vector<int32_t>> generate(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& options,
                                           const std::function<void(size_t, const RequestEvent&)>& on_event = {},
                                           GenerateStats* stats = nullptr);

}  // namespace polar
