#pragma once
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace polar::cli {

// A subcommand: `add` declares its options on the app (capturing its own option storage), `run` executes
// it after parsing and returns the exit status.
struct Command {
  std::string name;
  std::function<void(CLI::App&)> add;
  std::function<int()> run;
};

std::vector<Command> all_commands();

}  // namespace polar::cli
