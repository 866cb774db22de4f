// Zero-shot evaluation of a model on one task: every candidate of every item scored (eval/scoring.h), then
// each item judged by its task's rule and the task's accuracies estimated with standard errors. Results
// keep every item's scores, so runs of one task (at several densities, say) can be compared item by item
// (eval/stats.h: paired_difference over item_values).
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "eval/scoring.h"
#include "eval/stats.h"
#include "eval/tasks.h"

namespace polar {

struct ItemResult {
  int64_t line = 0;           // the item's line in its task file
  std::vector<Score> scores;  // one per candidate, in the task's order
  // acc: the candidate with the highest log-likelihood is the gold one (language modelling: the continuation
  // is the greedy one). acc_norm (multiple choice only): the same by log-likelihood per byte of the
  // continuation text as scored (UTF-8 bytes, its leading space included). Ties go to the lowest index.
  bool correct = false;
  bool correct_norm = false;
};

struct TaskResult {
  std::string task;
  std::string path;
  TaskFormat format = TaskFormat::kMultipleChoice;
  double density = 1.0;  // head density the continuations were scored at; 1 = dense
  std::vector<ItemResult> items;
  // Items skipped (EvalOptions::skip_bad): malformed lines when loading, and items the model cannot score.
  int64_t skipped = 0;
  int64_t truncated = 0;  // requests whose context was cut from the left to fit the model
  Estimate acc;
  std::optional<Estimate> acc_norm;  // multiple choice only
  // Language modelling: exp(-mean over items of the continuation's log-likelihood), as lm-evaluation-harness
  // reports it for LAMBADA (per continuation, not per token).
  std::optional<double> perplexity;
};

enum class Metric { kAcc, kAccNorm };

// 1 for each item the metric counts right, 0 otherwise, in item order. kAccNorm of a task without it is an
// error.
std::vector<double> item_values(const TaskResult& result, Metric metric);

// The index of the largest value; the lowest index among equal ones.
int64_t argmax_first(std::span<const double> values);

struct EvalOptions {
  ScoreOptions scoring = {};
  double density = 1.0;  // recorded in TaskResult::density (the sparsity itself is scoring.sparsity)
  // An item with a candidate the model cannot score (make_request: e.g. a continuation longer than the
  // model's context) is skipped whole, with a warning, instead of failing the task.
  bool skip_bad = false;
  std::function<void(const std::string&)> warn = {};  // receives "FILE:LINE: problem (skipped)"; may be empty
};

// Scores every candidate of `task` (all items' requests batched together) and judges the items.
// progress(done, total) counts requests. Unless options.skip_bad, a candidate the model cannot score is an
// error naming the task file and line.
TaskResult evaluate(Model& model, const Tokenizer& tok, const Task& task, const EvalOptions& options,
                    const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace polar
