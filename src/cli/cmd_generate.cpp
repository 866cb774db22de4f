// polar generate: batched text generation. Streams the first unfinished prompt's continuation to stdout as
// tokens arrive (later prompts are buffered and printed in order); speed goes to stderr.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "runtime/generate.h"

namespace polar::cli {

namespace {
struct GenerateArgs {
  ModelOptions model;
  std::vector<std::string> prompts;
  int64_t max_tokens = 64;
  SamplingParams sampling;
  bool echo = false;
  bool json = false;
};

int run_generate(const GenerateArgs& a) {
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
  opt.is_stop = [&](int32_t id) { return tok.is_eos(id); };
  opt.sparsity = m.sparsity.get();

  // Streaming in prompt order: prompt `current` prints live, later ones collect text until their turn.
  const size_t n = prompts.size();
  std::vector<StreamDecoder> decoders(n, StreamDecoder(tok));
  std::vector<std::string> pending(n);
  std::vector<int64_t> produced(n, 0);
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
  auto out = generate(*m.model, prompts, opt, [&](size_t i, int32_t id) {
    if (a.json) return;
    std::string text = tok.is_eos(id) ? "" : decoders[i].push(id);
    if (tok.is_eos(id) || ++produced[i] >= a.max_tokens) {
      text += decoders[i].flush();
      finished[i] = true;
    }
    if (i == current) fmt::print("{}", text); else pending[i] += text;
    advance();
    std::fflush(stdout);
  }, &st);
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
                                      {"prefill_tokens_per_s", st.prompt_tokens / std::max(st.prefill_seconds, 1e-9)},
                                      {"decode_tokens_per_s",
                                       (st.generated_tokens - static_cast<int64_t>(n)) / std::max(st.decode_seconds, 1e-9)}}
                               .dump(1));
  } else {
    for (size_t i = 0; i < n; ++i) finished[i] = true;  // max_tokens == 0 produces no callbacks
    advance();
    fmt::print("\n");
  }
  fmt::print(stderr, "prefill: {} tokens in {:.3f} s ({:.1f} tok/s); decode: {} tokens in {} steps, {:.3f} s ({:.1f} tok/s)\n",
             st.prompt_tokens, st.prefill_seconds, st.prompt_tokens / std::max(st.prefill_seconds, 1e-9),
             st.generated_tokens - static_cast<int64_t>(n), st.decode_steps, st.decode_seconds,
             (st.generated_tokens - static_cast<int64_t>(n)) / std::max(st.decode_seconds, 1e-9));
  return 0;
}
}  // namespace

Command generate_command() {
  auto a = std::make_shared<GenerateArgs>();
  return {"generate",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("generate", "Generate text from one or more prompts (batched)");
            a->model.add(*c);
            a->model.add_sparsity(*c);
            c->add_option("--prompt,-p", a->prompts, "Prompt text (repeat for a batch)")->required();
            c->add_option("--max-tokens,-n", a->max_tokens, "Tokens to generate per prompt")->capture_default_str()
                ->check(at_least(0));
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
