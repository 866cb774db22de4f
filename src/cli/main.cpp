// polar: one binary, one subcommand per job. Each subcommand lives in its own file (cmd_*.cpp) and
// registers itself here; errors surface as polar::Error and exit with status 1.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include "cli/commands.h"
#include "cli/openmp_defaults.h"
#include "core/error.h"

int main(int argc, char** argv) {
  polar::cli::choose_openmp_wait_policy(argv);
  CLI::App app{"polar: batched LLM inference with scalable contextual sparsity"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every subcommand");
  std::vector<polar::cli::Command> commands = polar::cli::all_commands();
  for (auto& c : commands) c.add(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& c : commands)
      if (app.got_subcommand(c.name)) return c.run();
  } catch (const polar::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {  // a bug or an input no check caught: still a message, not an abort
    fmt::print(stderr, "error: internal error: {}\n", e.what());
    return 1;
  }
  return 1;
}
