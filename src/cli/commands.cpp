#include "cli/commands.h"

namespace polar::cli {

std::vector<Command> all_commands() { return {}; }

}  // namespace polar::cli
