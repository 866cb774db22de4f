// Errors: every failure polar reports to a user is a polar::Error carrying a message that names the
// problem (file, tensor, field, value). Programs catch it at the top, print it and exit non-zero.
#pragma once
#include <stdexcept>
#include <string>
#include <fmt/format.h>

namespace polar {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// fail("tensor {} has shape {}", name, shape): throws polar::Error with a formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// check(cond, "..."): fail unless cond holds. For validating input, not for internal invariants.
template <typename... Args>
void check(bool cond, fmt::format_string<Args...> f, Args&&... args) {
  if (!cond) throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace polar
