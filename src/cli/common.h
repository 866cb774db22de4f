// Pieces every subcommand shares: loading a model onto a device, token parsing, progress on stderr.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "io/checkpoint.h"
#include "model/model.h"

namespace polar::cli {

struct ModelOptions {
  std::string model;
  std::string device = "cpu";
  std::string dtype = "f16";
  // --model (required; returned so a command with other model sources can relax that), --device, --dtype
  CLI::Option* add(CLI::App& app);
  DType activation_dtype() const;
};

struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  const Tokenizer& tokenizer() const;  // error if the checkpoint carries none
};

// Loads the checkpoint (opt.model, or what `checkpoint` makes) and builds the model on the device,
// logging to stderr.
LoadedModel load_model(const ModelOptions& opt);
LoadedModel load_model(const ModelOptions& opt, const std::function<Checkpoint()>& checkpoint);

// "5,17,42" -> {5, 17, 42}; anything else is a polar::Error.
std::vector<int32_t> parse_token_list(const std::string& s);

// Reads a whole text file; error naming the path if it cannot be read.
std::string read_text_file(const std::string& path);

}  // namespace polar::cli
