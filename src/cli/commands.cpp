#include "cli/commands.h"

namespace polar::cli {

Command generate_command();
Command logits_command();
Command perplexity_command();
Command info_command();
Command bench_command();
Command bench_serve_command();
Command bench_kernels_command();
Command routers_command();
Command eval_command();
Command calibrate_command();
Command chat_template_command();
#ifdef POLAR_HAVE_SERVE
Command serve_command();
#endif

std::vector<Command> all_commands() {
  std::vector<Command> commands = {generate_command(),     logits_command(),        perplexity_command(),
                                   info_command(),         bench_command(),         bench_serve_command(),
                                   bench_kernels_command(), routers_command(),      calibrate_command(),
                                   eval_command(),         chat_template_command()};
#ifdef POLAR_HAVE_SERVE
  commands.push_back(serve_command());
#endif
  return commands;
}

}  // namespace polar::cli
