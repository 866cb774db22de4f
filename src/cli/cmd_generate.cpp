// polar generate: text generation for any number of prompts through the continuous-batching scheduler.
// Streams the first unfinished prompt's continuation to stdout as tokens arrive (later prompts are buffered
// and printed in order); speed goes to stderr.
#include <fmt/core.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "io/json.h"
#include "runtime/generate.h"

namespace polar::cli {

namespace {
struct GenerateArgs {
  ModelOptions model;
  std::vector<std::string> prompts;
  std::string prompts_file;
  int64_t max_tokens = 64;
  int64_t max_seqs = 256;
  int64_t max_batch_tokens = 2048;
  SamplingParams sampling;
  bool echo = false;
  bool json = false;
};

// --prompts-file: one prompt per line (blank lines skipped), or, for a .jsonl file, one JSON object per line
// with a "prompt" string (so prompts may hold newlines).
std::vector<std::string> read_prompts_file(const std::string& path) {
  std::ifstream in(path);
  check(in.good(), "cannot open prompts file {}", path);
  const bool jsonl = path.ends_with(".jsonl");
  std::vector<std::string> prompts;
  std::string line;
  for (int64_t no = 1; std::getline(in, line); ++no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (!jsonl) {
      prompts.push_back(line);
      continue;
    }
    nlohmann::json j;
    try {
      j = parse_json(line);
    } catch (const Error& e) {
      fail("{} line {}: {}", path, no, e.what());
    }
    check(j.is_object() && j.contains("prompt") && j["prompt"].is_string(),
          "{} line {}: expected an object with a \"prompt\" string", path, no);
    prompts.push_back(j["prompt"].get<std::string>());
  }
  check(!prompts.empty(), "prompts file {} holds no prompts", path);
  return prompts;
}

int run_generate(GenerateArgs& a) {
  if (!a.prompts_file.empty()) {
    std::vector<std::string> more = read_prompts_file(a.prompts_file);
    a.prompts.insert(a.prompts.end(), more.begin(), more.end());
  }
  check(!a.prompts.empty(), "no prompts: give --prompt or --prompts-file");
  LoadedModel m = load_model(a.model);
  load_sparsity(m, a.model, /*random_allowed=*/false, 0);
  const Tokenizer& tok = m.tokenizer();
  std::vector<std::vector<int32_t>> prompts;
  for (auto& p : a.prompts) {
    check(!p.empty(), "empty prompt: give some text to continue");
    prompts.push_back(tok.encode(p, tok.add_bos_default()));
  }
  GenerateOptions opt;
  opt.max_new_tokens = a.max_tokens;
  opt.sampling = a.sampling;
  opt.max_seqs = a.max_seqs;
  opt.max_step_tokens = a.max_batch_tokens;
  opt.tokenizer = &tok;
  opt.sparsity = m.sparsity.get();

  // Streaming in prompt order: prompt `current` prints live, later ones collect text until their turn.
  const size_t n = prompts.size();
  std::vector<std::string> pending(n);
  std::vector<bool> finished(n, false);
  size_t current = 0;
  auto begin_prompt = [&](size_t i) {
    if (n > 1) fmt::print("{}=== prompt {} ===\n", i ? "\n" : "", i + 1);
    if (a.echo) fmt::print("{}", a.prompts[i]);
    fmt::print("{}", pending[i]);
  };
  // Once the live prompt is finished, move on to the next, printing what it has collected meanwhile.
  auto advance = [&] {
    while (current < n && finished[current])
      if (++current < n) begin_prompt(current);
  };
  if (!a.json) begin_prompt(0);
  GenerateStats st;
  auto out = generate(*m.model, prompts, opt, [&](size_t i, const RequestEvent& e) {
    if (a.json) return;
    if (i == current) fmt::print("{}", e.text); else pending[i] += e.text;
    if (e.finish) finished[i] = true;
    advance();
    std::fflush(stdout);
  }, &st);
  const SchedulerStats& s = st.scheduler;
  const double output_rate = st.generated_tokens / std::max(st.seconds, 1e-9);
  const double decode_rate = s.decode_only_tokens / std::max(s.decode_only_seconds, 1e-9);
  const double mean_batch = s.steps ? static_cast<double>(s.batch_sum) / static_cast<double>(s.steps) : 0;
  if (a.json) {
    nlohmann::json j = nlohmann::json::array();
    for (size_t i = 0; i < n; ++i) {
      std::vector<int32_t> gen = out[i];
      bool stopped = !gen.empty() && tok.is_eos(gen.back());
      if (stopped) gen.pop_back();
      j.push_back({{"prompt", a.prompts[i]}, {"prompt_ids", prompts[i]}, {"ids", gen}, {"text", tok.decode(gen)},
                   {"stopped_at_eos", stopped}});
    }
    fmt::print("{}\n", nlohmann::json{{"results", j},
                                      {"prompt_tokens", st.prompt_tokens},
                                      {"generated_tokens", st.generated_tokens},
                                      {"seconds", st.seconds},
                                      {"output_tokens_per_s", output_rate},
                                      {"decode_tokens_per_s", decode_rate},
                                      {"mean_ttft_s", st.mean_ttft_seconds},
                                      {"steps", s.steps},
                                      {"mean_batch", mean_batch}}
                               .dump(1));
  } else {
    advance();
    fmt::print("\n");
  }
  std::fflush(stdout);  // the text before the speed line on a terminal
  // decode: the steps that only decode (no prompt chunk beside them), the steady-state speed.
  fmt::print(stderr,
             "{} prompt{}: {} prompt tokens, {} generated in {:.3f} s ({:.1f} tok/s, first token after {:.3f} s "
             "on average); {} steps, mean batch {:.1f}; decode: {} tokens in {} steps, {:.3f} s ({:.1f} tok/s)\n",
             n, n == 1 ? "" : "s", st.prompt_tokens, st.generated_tokens, st.seconds, output_rate,
             st.mean_ttft_seconds, s.steps, mean_batch, s.decode_only_tokens, s.decode_only_steps,
             s.decode_only_seconds, decode_rate);
  report_density_reached(m);
  return 0;
}
}  // namespace

Command generate_command() {
  auto a = std::make_shared<GenerateArgs>();
  return {"generate",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("generate", "Generate text from one or more prompts (continuous batching)");
            a->model.add(*c);
            a->model.add_sparsity(*c);
            c->add_option("--prompt,-p", a->prompts, "Prompt text (repeat for several)");
            c->add_option("--prompts-file", a->prompts_file,
                          "More prompts: one per line, or a .jsonl file of {\"prompt\": ...} objects");
            c->add_option("--max-tokens,-n", a->max_tokens, "Tokens to generate per prompt")->capture_default_str()
                ->check(at_least(0));
            c->add_option("--max-seqs", a->max_seqs, "Sequences decoding together at most (the rest wait their turn)")
                ->capture_default_str()->check(at_least(1));
            c->add_option("--max-batch-tokens", a->max_batch_tokens,
                          "Tokens per engine step at most (decode tokens + prompt chunks)")
                ->capture_default_str()->check(at_least(1));
            c->add_option("--temperature,-t", a->sampling.temperature, "Sampling temperature; 0 = greedy")
                ->capture_default_str()->check(at_least(0));
            c->add_option("--top-k", a->sampling.top_k, "Keep the k most likely tokens (0 = all)")->capture_default_str()
                ->check(at_least(0));
            c->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass")->capture_default_str()
                ->check(between(0.0, 1.0));
            c->add_option("--seed", a->sampling.seed, "Random seed")->capture_default_str();
            c->add_flag("--echo", a->echo, "Print the prompt before its continuation");
            c->add_flag("--json", a->json, "Print one JSON document with ids, text and speed instead of streaming");
          },
          [a] { return run_generate(*a); }};
}

}  // namespace polar::cli
