#include "eval/eval.h"

#include <cmath>

#include "core/error.h"

namespace polar {

int64_t argmax_first(std::span<const double> values) {
  check(!values.empty(), "argmax of no values");
  int64_t best = 0;
  for (size_t i = 1; i < values.size(); ++i)
    if (values[i] > values[best]) best = static_cast<int64_t>(i);
  return best;
}

std::vector<double> item_values(const TaskResult& result, Metric metric) {
  check(metric == Metric::kAcc || result.format == TaskFormat::kMultipleChoice, "{}: acc_norm is not defined for {} tasks",
        result.task, format_name(result.format));
  std::vector<double> v;
  for (const ItemResult& item : result.items)
    v.push_back((metric == Metric::kAcc ? item.correct : item.correct_norm) ? 1.0 : 0.0);
  return v;
}

TaskResult evaluate(Model& model, const Tokenizer& tok, const Task& task, const EvalOptions& options,
                    const std::function<void(int64_t, int64_t)>& progress) {
  TaskResult result;
  result.task = task.name;
  result.path = task.path;
  result.format = task.format;
  result.skipped = task.skipped;
  result.density = options.density;
  std::vector<const TaskItem*> items;  // the items scored
  std::vector<ScoreRequest> requests;  // their candidates, item after item
  for (const TaskItem& item : task.items) {
    std::vector<ScoreRequest> own;
    try {
      for (const Candidate& c : item.candidates)
        own.push_back(make_request(tok, c.context, c.continuation, model.config().max_positions));
    } catch (const Error& e) {
      const std::string where = fmt::format("{}:{}: {}", task.path, item.line, e.what());
      if (!options.skip_bad) fail("{}", where);
      ++result.skipped;
      if (options.warn) options.warn(where + " (skipped)");
      continue;
    }
    for (ScoreRequest& r : own) {
      if (r.truncated) ++result.truncated;
      requests.push_back(std::move(r));
    }
    items.push_back(&item);
  }
  check(!items.empty(), "{}: none of its {} items can be scored by this model", task.path, task.items.size());
  const std::vector<Score> scores = score(model, requests, options.scoring, progress);
  const bool by_choice = task.format != TaskFormat::kLanguageModel;
  const bool normalised = task.format == TaskFormat::kMultipleChoice;
  double loglik_sum = 0;
  size_t next = 0;
  for (const TaskItem* item : items) {
    ItemResult r;
    r.line = item->line;
    std::vector<double> loglik, per_byte;
    for (const Candidate& c : item->candidates) {
      const Score& s = scores[next++];
      r.scores.push_back(s);
      loglik.push_back(s.logprob);
      per_byte.push_back(s.logprob / static_cast<double>(c.continuation.size()));
    }
    r.correct = by_choice ? argmax_first(loglik) == item->gold : r.scores[0].greedy;
    r.correct_norm = normalised && argmax_first(per_byte) == item->gold;
    if (!by_choice) loglik_sum += r.scores[0].logprob;
    result.items.push_back(std::move(r));
  }
  result.acc = mean_with_se(item_values(result, Metric::kAcc));
  if (normalised) result.acc_norm = mean_with_se(item_values(result, Metric::kAccNorm));
  if (!by_choice) result.perplexity = std::exp(-loglik_sum / static_cast<double>(items.size()));
  return result;
}

}  // namespace polar
