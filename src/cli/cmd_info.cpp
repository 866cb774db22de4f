// polar info: what a checkpoint is: architecture, dimensions, weight types, parameters, tokenizer.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "ops/cuda_devices.h"

namespace polar::cli {

namespace {
struct InfoArgs {
  std::string model;
  bool devices = false;
  bool json = false;
};

int print_devices(bool json) {
  std::string why;
  std::vector<CudaDevice> devices = cuda_devices(&why);
  nlohmann::json j = nlohmann::json::array();
  for (auto& d : devices)
    j.push_back({{"index", d.index}, {"name", d.name}, {"compute_capability", fmt::format("{}.{}", d.sm_major, d.sm_minor)},
                 {"memory_bytes", d.memory_bytes}, {"sms", d.sm_count}});
  if (json) {
    fmt::print("{}\n", nlohmann::json{{"cuda_devices", j}, {"note", devices.empty() ? why : ""}}.dump(1));
    return 0;
  }
  fmt::print("cpu         available\n");
  if (devices.empty()) fmt::print("cuda        none: {}\n", why);
  for (auto& d : devices)
    fmt::print("cuda:{}      {} (sm_{}{}, {} SMs, {:.1f} GiB)\n", d.index, d.name, d.sm_major, d.sm_minor, d.sm_count,
               d.memory_bytes / double(1 << 30));
  return 0;
}

int run_info(const InfoArgs& a) {
  if (a.devices) return print_devices(a.json);
  check(!a.model.empty(), "info needs --model PATH (or --devices)");
  Checkpoint ck = load_checkpoint(a.model);
  const ModelConfig& c = ck.config;
  nlohmann::json j = {
      {"path", ck.path}, {"format", ck.format}, {"model_type", c.model_type}, {"layers", c.n_layers},
      {"hidden", c.hidden}, {"heads", c.n_heads}, {"kv_heads", c.n_kv_heads}, {"head_dim", c.head_dim},
      {"ffn", c.ffn}, {"vocab", c.vocab_size}, {"max_context", c.max_positions}, {"weights", ck.weight_types},
      {"parameters", ck.n_params()}, {"tied_embeddings", c.tie_embeddings}};
  if (ck.tokenizer)
    j["tokenizer"] = {{"kind", ck.tokenizer->kind()}, {"vocab", ck.tokenizer->vocab_size()},
                      {"bos", ck.tokenizer->bos_id()}, {"eos", ck.tokenizer->eos_id()},
                      {"add_bos", ck.tokenizer->add_bos_default()}};
  if (a.json) {
    fmt::print("{}\n", j.dump(1));
    return 0;
  }
  fmt::print("model       {}\nformat      {}\narch        {}\nweights     {}\nparameters  {} ({:.1f} M)\n", ck.path,
             ck.format, c.describe(), ck.weight_types, ck.n_params(), ck.n_params() / 1e6);
  if (ck.tokenizer)
    fmt::print("tokenizer   {} vocab={} bos={} eos={} add_bos={}\n", ck.tokenizer->kind(), ck.tokenizer->vocab_size(),
               ck.tokenizer->bos_id(), ck.tokenizer->eos_id(), ck.tokenizer->add_bos_default());
  else
    fmt::print("tokenizer   none\n");
  return 0;
}
}  // namespace

Command info_command() {
  auto a = std::make_shared<InfoArgs>();
  return {"info",
          [a](CLI::App& app) {
            auto* c = app.add_subcommand("info", "Describe a checkpoint: architecture, sizes, weights, tokenizer");
            c->add_option("--model,-m", a->model, "Model: a Hugging Face directory or a GGUF file");
            c->add_flag("--devices", a->devices, "List the compute devices instead");
            c->add_flag("--json", a->json, "Print as JSON");
          },
          [a] { return run_info(*a); }};
}

}  // namespace polar::cli
