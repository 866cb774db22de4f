// Helpers shared by the tests: where the shared fixtures are, temporary files, running the polar binary.
#pragma once
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace polar::test {

// Path under the shared material (../shared beside the repo, or $POLAR_SHARED).
inline std::string shared_path(const std::string& rel) {
  const char* env = std::getenv("POLAR_SHARED");
  std::filesystem::path base = env && *env ? env : POLAR_DEFAULT_SHARED;
  return (base / rel).string();
}

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  std::filesystem::path dir_;
};

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes);
std::vector<uint8_t> read_bytes(const std::string& path);

struct RunResult {
  int exit_code;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs the built polar binary with the given arguments (no shell), capturing stdout and stderr.
RunResult run_polar(const std::vector<std::string>& args);

// The message of the polar::Error that f throws, or "(no error)".
std::string error_of(const std::function<void()>& f);

}  // namespace polar::test
