// Eval task files (JSON Lines, load_task): strictly, and skipping bad lines with a limit.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "eval/tasks.h"
#include "fuzz_util.h"

using namespace polar;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_file("task.jsonl", fuzz::as_text(data, size));
  for (bool skip_bad : {false, true}) try {
      TaskLoadOptions options;
      options.skip_bad = skip_bad;
      options.limit = skip_bad ? 3 : 0;
      options.warn = [](const std::string&) {};
      const Task t = load_task(path, options);
      for (const TaskItem& item : t.items) {
        fuzz::require(!item.candidates.empty(), "every item has a candidate");
        fuzz::require(item.gold >= 0 && item.gold < static_cast<int64_t>(item.candidates.size()),
                      "gold indexes a candidate");
      }
    } catch (const Error&) {
    }
  return 0;
}
